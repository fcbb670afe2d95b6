"""Sequential recommendation (``recommend``): given a user's item history, rank every item as the next one.

Data (:mod:`tansuo.data.interactions`): MovieLens ``u.data``, a CSV / TSV / JSONL log with user, item and
time columns (and a rating column with a threshold), or RecBole's atomic ``.inter`` file; titles optionally
from ``u.item`` or a table. Each user's items are ordered by time and split leave-one-out, as RecBole's
``LS: valid_and_test``: the last item is the test target, the one before it the validation target, the rest
training. Item ids map to indices ``1..N`` (first appearance in the file), kept in the bundle with titles.

Training reads each user's training sequence in windows of ``max_len + 1`` items cut back from its end, so
every item but a user's first is a target exactly once an epoch (an epoch is about one pass over users, not
RecBole's one augmented prefix per target). Models declare their ``objective``:

- ``causal`` (SASRec, GRU4Rec, MF, most-popular): position t of ``window[:-1]`` predicts ``window[t + 1]``;
- ``masked`` (BERT4Rec): items of ``window[1:]`` are hidden behind ``[mask]`` with probability
  ``mask_ratio`` (the last one when none is) and predicted.

``data.loss``: ``ce`` is the softmax cross-entropy over every item (RecBole's ``loss_type: CE``); ``bce`` the
SASRec paper's binary cross-entropy of the target against one sampled negative; ``bpr`` Rendle et al.'s
pairwise ``-log sigmoid(s_target - s_negative)``. Negatives are drawn uniformly from the items outside the
row's window. Batch ``n`` (windows, masking draws, negatives) is a pure function of ``(seed, n)``.

Evaluation, per user with a target in the split: the history before the target (cut to the last
``max_len`` items) scores every item; with ``exclude_seen`` every item the user interacted with before the
target is taken out of the ranking (the target itself never is). ``hr@K``, ``ndcg@K``, ``mrr@K`` for K in
5, 10, 20 (:func:`~tansuo.tasks.metrics.ranking_metrics`), and the sampled protocol of the SASRec paper:
the target ranked against ``sampled_negatives`` items the user never interacted with, drawn once per user
and split with a fixed seed, as ``sampled_hr@K`` etc. Validation ``ndcg@10`` picks the best bundle.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tansuo.atomic import atomic_write_text
from tansuo.data.interactions import (
    Columns,
    Split,
    cut_history,
    leave_one_out,
    read_interactions,
    read_titles,
)
from tansuo.errors import BundleError, DataError, TansuoError
from tansuo.tasks.base import Batch, TaskBase, batch_seed, register_task
from tansuo.tasks.metrics import RANKING_KS, ranking_metrics, target_ranks
from tansuo.tasks.recommend_inputs import format_recommendation, parse_history, recommend

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NEGATIVE_DRAWS = 4  # rounds of redrawing a training negative that fell inside its row's window


class RecommendDataConfig(BaseModel):
    """The ``data:`` section of a ``recommend`` recipe."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    path_fields: ClassVar[tuple[str, ...]] = ("path", "titles")

    path: str | None = Field(
        None,
        validation_alias=AliasChoices("path", "train"),
        description="the interaction log: MovieLens u.data, a .csv/.tsv/.jsonl log or a RecBole .inter file",
    )
    format: Literal["movielens", "csv", "tsv", "jsonl", "inter"] | None = Field(
        None, description="None: from the file name (.data movielens, .inter, .csv, .tsv, .jsonl)"
    )
    user_column: str = Field("user_id", min_length=1)
    item_column: str = Field("item_id", min_length=1)
    time_column: str | None = Field("timestamp", description="None: the file order is the time order")
    rating_column: str | None = Field(None, description="with rating_threshold: which rows count")
    rating_threshold: float | None = Field(None, description="keep interactions rated at least this")
    titles: str | None = Field(None, description="item titles: MovieLens u.item or a table (item, title)")
    title_column: str = Field("title", min_length=1, description="a titles table's title column")
    max_len: int = Field(50, ge=1, description="histories are cut to their last max_len items")
    loss: Literal["ce", "bce", "bpr"] = Field("ce", description="softmax CE over all items, or sampled")
    mask_ratio: float = Field(0.2, gt=0, lt=1, description="items hidden per row for masked models")
    sampled_negatives: int = Field(100, ge=0, description="negatives of the sampled protocol; 0: off")
    exclude_seen: bool = Field(True, description="take the items a user has seen out of its ranking")

    @model_validator(mode="after")
    def _threshold_needs_ratings(self) -> RecommendDataConfig:
        if self.rating_threshold is not None and self.rating_column is None:
            raise ValueError("rating_threshold needs rating_column (the column holding the ratings)")
        return self

    def columns(self) -> Columns:
        return Columns(
            self.user_column, self.item_column, self.time_column, self.rating_column, self.rating_threshold
        )


class RecommendPredictOptions(BaseModel):
    """What ``predict`` takes besides the histories (``tansuo predict BUNDLE HISTORY -o k=20``)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="items to recommend per history")
    candidates: str | list[str] | None = Field(
        None, description="items to score as the next one: ids or titles, comma- or |-separated"
    )
    exclude_seen: bool = Field(True, description="recommend only items not in the history")


def objective(model: nn.Module) -> str:
    """The training objective a recommender declares (``causal`` or ``masked``)."""
    found = getattr(model, "objective", None)
    if found not in ("causal", "masked"):
        raise TansuoError(
            f"{type(model).__name__} is not a recommender (it declares no objective); use sasrec_base, "
            "bert4rec_base, gru4rec, mf or pop"
        )
    return found


class _Eval:
    """One evaluation split: users with a target there, their cut histories, targets and seen items."""

    def __init__(
        self,
        histories: list[list[int]],
        targets: list[int],
        seen: list[list[int]],
        negatives: torch.Tensor | None,
    ) -> None:
        self.histories, self.seen, self.negatives = histories, seen, negatives
        self.targets = torch.tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.histories)


def left_pad(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Item lists as a ``(B, width)`` long tensor padded with 0 on the left (width: the longest)."""
    width = width or max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r) :] = torch.tensor(r[-width:], dtype=torch.long)
    return out


@register_task
class RecommendTask(TaskBase):
    """Rank items as the next one of a user's history (SASRec, BERT4Rec and baselines)."""

    name: ClassVar[str] = "recommend"
    DataConfig: ClassVar[type[BaseModel]] = RecommendDataConfig
    default_metric: ClassVar[str] = "ndcg@10"
    unit: ClassVar[str] = "samples"
    heldout_split: ClassVar[str] = "test"
    PredictOptions: ClassVar[type[BaseModel]] = RecommendPredictOptions

    def __init__(
        self, data: RecommendDataConfig, seed: int, items: list[str], titles: dict[str, str] | None = None
    ) -> None:
        self.data, self.seed, self.items = data, seed, items
        self.index = {raw: i + 1 for i, raw in enumerate(items)}
        self.titles = titles or {}
        self.by_title = {t.casefold(): self.index[raw] for raw, t in self.titles.items() if raw in self.index}
        self._split: Split | None = None
        self._rows: np.ndarray | None = None  # (R, 3): user, start, end of each training window
        self._eval: dict[str, _Eval] = {}

    @property
    def num_items(self) -> int:
        return len(self.items)

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> RecommendTask:
        assert isinstance(data, RecommendDataConfig)
        if data.path is None:
            raise DataError(
                "data.path is not set; pass an interaction log (u.data, .csv, .inter) with --data"
            )
        log = read_interactions(data.path, data.columns(), data.format)
        titles = read_titles(data.titles, data.item_column, data.title_column) if data.titles else {}
        task = cls(data, seed, log.items, {k: v for k, v in titles.items() if k in set(log.items)})
        task._use(log)
        return task

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> RecommendTask:
        """Rebuild from a bundle (items and titles from ``items.json``); the log is read only when evaluation
        or training needs it. ``data_path``: the log's new place (a file, or a folder holding it)."""
        bundle_dir = Path(bundle_dir)
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = RecommendDataConfig.model_validate(info["data"])
        if data_path is not None:
            moved = Path(data_path).expanduser()
            new = moved / Path(data.path or "").name if moved.is_dir() else moved
            data = data.model_copy(update={"path": str(new)})
        if not (bundle_dir / "items.json").is_file():
            raise BundleError(f"{bundle_dir}: items.json is missing (the item ids and titles of the model)")
        assets = json.loads((bundle_dir / "items.json").read_text(encoding="utf-8"))
        return cls(data, info["seed"], assets["items"], assets.get("titles"))

    def _use(self, log: Any) -> None:
        sequences = [[self.index[i] for i in seq if i in self.index] for seq in log.sequences]
        dropped = sum(map(len, log.sequences)) - sum(map(len, sequences))
        if dropped:
            logger.warning(
                "%s: %d interactions with items the model does not know left out", log.origin, dropped
            )
        self._split = leave_one_out(sequences)
        logger.info(
            "%s: %d users, %d items, %d interactions; %d validation and %d test targets",
            log.origin,
            len(sequences),
            self.num_items,
            sum(map(len, sequences)),
            sum(1 for v in self._split.val if v),
            sum(1 for t in self._split.test if t),
        )

    def split(self) -> Split:
        """The leave-one-out split (the log read on first use)."""
        if self._split is None:
            if self.data.path is None:
                raise DataError("this bundle's task names no data file; pass --data with the interaction log")
            self._use(read_interactions(self.data.path, self.data.columns(), self.data.format))
        assert self._split is not None
        return self._split

    # ------------------------------------------------------------ training batches
    def rows(self) -> np.ndarray:
        """Training windows ``(R, 3)``: user, start, end; windows of ``max_len + 1`` items cut back from the
        end of each training sequence (the first may be shorter), every target in exactly one."""
        if self._rows is None:
            L, out = self.data.max_len, []
            for user, seq in enumerate(self.split().train):
                end = len(seq)
                while end >= 2:
                    out.append((user, max(0, end - L - 1), end))
                    end -= L
            if not out:
                raise DataError(
                    f"{self.data.path}: no user has two training interactions; a recommender needs "
                    "histories (at least 4 interactions per user for leave-one-out)"
                )
            self._rows = np.array(out, dtype=np.int64)
        return self._rows

    def _batch(self, idx: np.ndarray, n: int) -> Batch:
        train = self.split().train
        windows = [train[u][s:e] for u, s, e in self.rows()[idx]]
        window = left_pad(windows)  # (B, W)
        g = torch.Generator().manual_seed(batch_seed(self.seed, n, salt=61))
        noise = torch.rand(window.shape, generator=g)  # masking draws (masked models)
        negatives = torch.randint(1, self.num_items + 1, window.shape, generator=g)
        for _ in range(NEGATIVE_DRAWS):  # redraw negatives that are items of their own window
            inside = (negatives[:, :, None] == window[:, None, :]).any(-1)
            if not bool(inside.any()):
                break
            negatives = torch.where(
                inside, torch.randint(1, self.num_items + 1, window.shape, generator=g), negatives
            )
        return {"window": window, "noise": noise, "negatives": negatives}

    def model_overrides(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "max_seq_len": self.data.max_len}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return math.ceil(len(self.rows()) / batch_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        rows = len(self.rows())
        per_epoch = math.ceil(rows / batch_size)
        epoch, order = -1, np.arange(0)
        for n in count(start):
            e, k = divmod(n, per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(batch_seed(self.seed, e, salt=59))
                epoch, order = e, torch.randperm(rows, generator=g).numpy()
            yield self._batch(order[k * batch_size : (k + 1) * batch_size], n)

    def _inputs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's input ``(B, T)``, targets ``(B, T)`` (0: none) and negatives ``(B, T)``."""
        window = batch["window"]
        if objective(model) == "causal":
            return window[:, :-1], window[:, 1:], batch["negatives"][:, 1:]
        items, real = window[:, 1:], window[:, 1:] != 0
        hidden = (batch["noise"][:, 1:] < self.data.mask_ratio) & real
        hidden[:, -1] |= ~hidden.any(dim=1)  # a row with nothing hidden hides its newest item
        targets = torch.where(hidden, items, torch.zeros_like(items))
        return items.masked_fill(hidden, model.mask_id), targets, batch["negatives"][:, 1:]

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        items, targets, _ = self._inputs(model, batch)
        features = model.forward_features(items)  # (B, T, C)
        real = targets != 0
        return model.forward_head(features[real]), targets[real]  # (N, V), (N,)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``data.loss`` over every target position of the batch (see the module doc)."""
        if self.data.loss == "ce":
            logits, targets = self.logits(model, batch)
            return F.cross_entropy(logits.float(), targets)
        items, targets, negatives = self._inputs(model, batch)
        real = targets != 0
        features = model.forward_features(items)[real]  # (N, C)
        pair = torch.stack([targets[real], negatives[real]], dim=-1)  # (N, 2)
        scores = model.item_scores(features, pair).float()  # (N, 2)
        if self.data.loss == "bpr":
            return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()
        return -(F.logsigmoid(scores[:, 0]) + F.logsigmoid(-scores[:, 1])).mean()

    def count(self, batch: Batch) -> int:
        """The interactions the batch trains on: every item of a window after its first."""
        return int((batch["window"][:, 1:] != 0).sum())

    # ------------------------------------------------------------ evaluation
    def _eval_split(self, split: str) -> _Eval:
        if split not in ("val", "test"):
            raise DataError(f"a recommend task evaluates on val or test, not {split!r}")
        if split not in self._eval:
            data = self.split()
            targets = data.val if split == "val" else data.test
            users = [u for u, t in enumerate(targets) if t]
            if not users:
                raise DataError(f"{self.data.path}: no user has a {split} target; users need 3+ interactions")
            seen = [data.history(split, u) for u in users]
            negatives = self._sampled(split, users) if self.data.sampled_negatives else None
            self._eval[split] = _Eval(
                [cut_history(h, self.data.max_len) for h in seen],
                [targets[u] for u in users],
                seen,
                negatives,
            )
        return self._eval[split]

    def _sampled(self, split: str, users: list[int]) -> torch.Tensor:
        """``(U, sampled_negatives)`` items each user never interacted with, drawn uniformly with
        replacement (as the SASRec paper's code does) with a seed fixed per split."""
        data, n, N = self.split(), self.data.sampled_negatives, self.num_items
        rng = np.random.default_rng(batch_seed(self.seed, SPLITS.index(split), salt=71))
        out = np.zeros((len(users), n), dtype=np.int64)
        for row, u in enumerate(users):
            interacted = np.zeros(N + 1, dtype=bool)
            interacted[[*data.train[u], data.val[u], data.test[u], 0]] = True
            free = np.flatnonzero(~interacted)
            if len(free):  # a user who has seen every item keeps padding (scored last) as negatives
                out[row] = free[rng.integers(0, len(free), size=n)]
        return torch.from_numpy(out)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        """Full-ranking and sampled HR / NDCG / MRR at 5, 10, 20, and the loss, of ``split``."""
        part = self._eval_split(split)
        model.eval()
        ranks, sampled, loss = [], [], 0.0
        for i in range(0, len(part), batch_size):
            sl = slice(i, i + batch_size)
            items = left_pad(part.histories[sl]).to(device)
            scores = model.next_item_scores(items).float().cpu()  # (B, V)
            targets = part.targets[sl]
            loss += F.cross_entropy(scores[:, 1:], targets - 1, reduction="sum").item()
            exclude = torch.zeros_like(scores, dtype=torch.bool)
            exclude[:, 0] = True
            if self.data.exclude_seen:
                for row, seen in enumerate(part.seen[sl]):
                    exclude[row, seen] = True
            ranks.append(target_ranks(scores, targets, exclude))
            if part.negatives is not None:
                candidates = torch.cat([targets[:, None], part.negatives[sl]], dim=1).sort(dim=1).values
                column = (candidates < targets[:, None]).sum(dim=1)  # where the target landed
                cand_scores = scores.gather(1, candidates).masked_fill(candidates == 0, float("-inf"))
                sampled.append(target_ranks(cand_scores, column))
        metrics: dict[str, Any] = {"loss": loss / len(part), **ranking_metrics(torch.cat(ranks), RANKING_KS)}
        if sampled:
            metrics.update(ranking_metrics(torch.cat(sampled), RANKING_KS, prefix="sampled_"))
        metrics["users"] = float(len(part))
        return metrics

    # ------------------------------------------------------------ predictions
    def state(self) -> dict[str, Any]:
        return {"num_items": self.num_items}

    def save_assets(self, bundle_dir: Path) -> None:
        atomic_write_text(
            Path(bundle_dir) / "items.json", json.dumps({"items": self.items, "titles": self.titles}) + "\n"
        )

    def title(self, index: int) -> str | None:
        return self.titles.get(self.items[index - 1])

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        inputs: list[str],
        device: torch.device,
        k: int = 10,
        candidates: str | list[str] | None = None,
        exclude_seen: bool = True,
    ) -> list[dict[str, Any]]:
        """For each history (item ids or titles, see :func:`~tansuo.tasks.recommend_inputs.parse_history`):
        the top ``k`` items with scores and probabilities, and the probability of each of ``candidates``."""
        histories = [parse_history(self, text, f"input {i + 1}") for i, text in enumerate(inputs)]
        wanted = None if candidates is None else parse_history(self, candidates, "candidates")
        return recommend(self, model, inputs, histories, device, k, wanted, exclude_seen)

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return format_recommendation(row)

    def read_inputs(self, path: Path) -> list[str]:
        """Histories, one a line (item ids or titles, comma- or ``|``-separated, or a JSON list)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"input file not found: {path}; give a file with one history a line")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line]

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return (model.example_input(batch_size, seq_len=seq_len),)

    def timed_call(
        self, model: nn.Module, batch_size: int, seq_len: int, calls: int
    ) -> tuple[str, Callable[[], object]]:
        """What a recommendation costs: every item's score after a history of ``seq_len`` items."""
        (items,) = self.example_input(model, batch_size, seq_len)

        @torch.inference_mode()
        def call() -> torch.Tensor:
            return model.next_item_scores(items)

        return f"next-item scores after {items.shape[1]} items", call
