"""Starting a run of several processes: torchrun's launcher (``torch.distributed.run``) called as a library,
its flags (``LaunchConfig``) and the error that names the rank that failed (``WorkerFailed``). What each
process then does is ``distributed.py``'s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from tansuo.errors import TansuoError

log = logging.getLogger(__name__)


class WorkerFailed(Exception):
    """A rank of a launched run ended with an error; the others were stopped by torchrun's agent."""

    def __init__(self, rank: int, exitcode: int, detail: str) -> None:
        self.rank, self.exitcode = rank, exitcode
        super().__init__(f"rank {rank} failed (exit code {exitcode}): {detail}")


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how many processes ``torch.distributed.run`` starts (torchrun's own flags)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None on one node: torchrun picks a free port

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise TansuoError(f"{flag} must be 1 or more (got {getattr(self, name)})")
        if not 0 <= self.node_rank < self.nnodes:
            raise TansuoError(
                f"--node-rank must be between 0 and --nnodes - 1 = {self.nnodes - 1} (got {self.node_rank})"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise TansuoError(
                "with --nnodes above 1 give --master-addr HOST and --master-port PORT of node 0"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise TansuoError(f"--master-port must be a TCP port, 1-65535 (got {self.master_port})")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check_device(self, device: torch.device) -> None:
        """On CUDA each process of this machine needs a GPU of its own.

        Raises:
            TansuoError: Fewer GPUs than ``nproc_per_node``.
        """
        if device.type == "cuda" and self.nproc_per_node > torch.cuda.device_count():
            raise TansuoError(
                f"--nproc-per-node {self.nproc_per_node} on CUDA needs as many GPUs, and this machine has "
                f"{torch.cuda.device_count()}; lower --nproc-per-node or train on --device cpu"
            )

    def torchrun_args(self) -> list[str]:
        """The flags ``torchrun`` takes for this launch."""
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}"]
        if self.nnodes == 1 and self.master_port is None:
            return [*args, "--standalone"]
        return [
            *args,
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
        ]


def launch(config: LaunchConfig, module_args: list[str], *, module: str = "tansuo") -> None:
    """Run ``python -m MODULE *module_args`` in ``config.nproc_per_node`` processes on this node through
    torchrun's launcher (``torch.distributed.run``): each gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    the rendezvous address; when one exits with an error the agent stops the others.

    Threads: unless ``OMP_NUM_THREADS`` is set, each process gets this machine's cores divided among them.

    Raises:
        WorkerFailed: A rank failed; names the first one that did and its exit code.
        KeyboardInterrupt: The launcher was interrupted (Ctrl-C, SIGTERM); the ranks were stopped.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = [*config.torchrun_args(), "-m", module, *module_args]
    log.info("launching: torchrun %s", " ".join(argv))
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # the workers inherit it; this process's environment is restored afterwards
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.nproc_per_node))
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        detail = failure.message or "see its error above"
        others = sorted(r for r in e.failures if r != rank)
        if others:
            detail += (
                f"; then {'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))} (peer lost)"
            )
        raise WorkerFailed(rank, failure.exitcode, detail) from None
    except SignalException as e:
        raise KeyboardInterrupt(str(e)) from None
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
