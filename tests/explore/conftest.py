"""Explore test fixtures: a throwaway PostgreSQL server. The plain helpers (explore recipes, made-up
studies) are in ``tests/explore/helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (Debian's binaries, as the postgres user when run as root); the test is
    skipped, with the reason printed, only when none can be started. TANSUO_TEST_POSTGRES_URL names an
    existing server instead."""
    import glob
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    given = os.environ.get("TANSUO_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not initdb[-1]:
        reason = "no PostgreSQL server to start: install Debian's postgresql package (.ci/run does)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    bindir = Path(initdb[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="tansuo-pg-"))
    as_root = os.geteuid() == 0

    def sh(cmd: str) -> subprocess.CompletedProcess:
        full = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if as_root else ["sh", "-c", cmd]
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    if as_root:
        shutil.chown(root, "postgres")
    port = free_port()
    data, log = root / "data", root / "server.log"
    steps = [
        f"{bindir}/initdb -D {data} -A trust -U postgres -E UTF8 --no-sync",
        f"{bindir}/pg_ctl -D {data} -l {log} -w -o '-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c max_connections=50' start",
        f"{bindir}/createdb -h 127.0.0.1 -p {port} -U postgres tansuo",
    ]
    for cmd in steps:
        done = sh(cmd)
        if done.returncode != 0:
            sh(f"{bindir}/pg_ctl -D {data} -m immediate stop")
            shutil.rmtree(root, ignore_errors=True)
            said = (done.stderr or done.stdout).strip()[:300]
            reason = f"cannot start a PostgreSQL server ({cmd.split()[0]}): {said}"
            print(f"SKIP: {reason}", file=sys.stderr)
            pytest.skip(reason)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/tansuo"
    finally:
        sh(f"{bindir}/pg_ctl -D {data} -m immediate stop")
        shutil.rmtree(root, ignore_errors=True)
