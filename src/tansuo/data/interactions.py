"""Interaction logs for sequential recommendation: readers, item ids, per-user sequences, leave-one-out.

Formats (``format``; None: from the file name):

- ``movielens``: MovieLens ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``, no header); a file named
  ``*.data``;
- ``csv`` / ``tsv``: a header row naming the columns; ``jsonl``: one JSON object per line;
- ``inter``: RecBole's atomic files (``*.inter``: tab-separated, a header of ``name:type`` fields such as
  ``user_id:token  item_id:token  rating:float  timestamp:float``); columns are named without the type.

The user, item and (optional) time and rating columns are named by the caller. With a rating column and a
threshold, only interactions rated at least the threshold count (RecBole's ``threshold``). Each user's items
are ordered by time, ties kept in file order (a stable sort, as RecBole sorts by user and time); without a
time column the file order is the time order.

Items are mapped to indices ``1..N`` in order of first appearance (RecBole's remapping order); 0 is padding.
Titles come from MovieLens ``u.item`` (``id|title|...``, latin-1) or a CSV / TSV / JSONL table with the item
and title columns.

:func:`leave_one_out` is RecBole's ``LS: valid_and_test`` split: the last item of each user is the test
target, the one before it the validation target, the rest training; a user with two interactions gives one
training item and a test target, a user with one a training item only.

Every error is a :class:`~tansuo.errors.DataError` naming the file, line and column and how to fix it.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tansuo.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("movielens", "csv", "tsv", "jsonl", "inter")
MOVIELENS_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass(frozen=True)
class Columns:
    """Which columns hold what (``time`` None: file order; ``rating`` None: every row counts)."""

    user: str = "user_id"
    item: str = "item_id"
    time: str | None = "timestamp"
    rating: str | None = None
    threshold: float | None = None


@dataclass
class InteractionLog:
    """A log as per-user item sequences in time order (raw ids), with where it came from."""

    users: list[str]
    sequences: list[list[str]]  # raw item ids of each user, oldest first
    items: list[str]  # raw item ids in order of first appearance in the file
    origin: str
    rows: int  # interactions read (after the rating threshold)


def log_format(path: Path, format: str | None) -> str:
    """The format of ``path``: ``format`` when given, else from its name."""
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"data.format must be one of {list(FORMATS)}, got {format!r}")
        return format
    suffix = path.suffix.lower().lstrip(".")
    found = {"data": "movielens", "inter": "inter", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl"}.get(suffix)
    if found is None:
        raise DataError(
            f"{path}: cannot tell the format of this file from its name; set data.format to one of "
            f"{list(FORMATS)} (u.data is movielens, RecBole's .inter files are inter)"
        )
    return found


def _number(value: str, path: Path, line: int, column: str, hint: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:  # ISO 8601 dates and times are times too
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise DataError(
            f"{path}:{line}: column {column!r} holds {value!r}, not a number (or an ISO date); {hint}"
        ) from None


def _rows(path: Path, fmt: str, wanted: list[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line, {column: value})`` for each data row, with the wanted columns checked."""
    if fmt == "movielens":
        out = []
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                fields = text.rstrip("\n").split("\t")
                if len(fields) != 4:
                    raise DataError(
                        f"{path}:{line}: expected 4 tab-separated fields (user item rating timestamp) as "
                        f"in MovieLens u.data, found {len(fields)}; fix the line or set data.format"
                    )
                out.append((line, dict(zip(MOVIELENS_COLUMNS, fields, strict=True))))
        return out
    if fmt == "jsonl":
        out = []
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: not valid JSON ({e.msg}); one object per line") from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{line}: expected a JSON object per line, got {type(obj).__name__}"
                    )
                lacking = [c for c in wanted if c not in obj or obj[c] is None]
                if lacking:
                    raise DataError(
                        f"{path}:{line}: no key {lacking[0]!r} (keys: {sorted(obj)}); add it or set "
                        "data.user_column / item_column / time_column / rating_column"
                    )
                out.append((line, {c: str(obj[c]) for c in wanted}))
        return out
    delimiter = "," if fmt == "csv" else "\t"
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty; give a header row and one interaction per row")
        names = [h.split(":", 1)[0].strip() if fmt == "inter" else h.strip() for h in header]
        lacking = [c for c in wanted if c not in names]
        if lacking:
            raise DataError(
                f"{path}:1: no column {lacking[0]!r} in the header (columns: {names}); rename it or set "
                "data.user_column / item_column / time_column / rating_column"
            )
        index = {c: names.index(c) for c in wanted}
        out = []
        for fields in reader:
            line = reader.line_num
            if not fields or not any(v.strip() for v in fields):
                continue
            if len(fields) != len(names):
                raise DataError(
                    f"{path}:{line}: {len(fields)} fields, the header has {len(names)}; fix the row "
                    f"(is data.format right? this file is read as {fmt})"
                )
            out.append((line, {c: fields[i].strip() for c, i in index.items()}))
        return out


def read_interactions(
    path: str | Path, columns: Columns = Columns(), format: str | None = None
) -> InteractionLog:
    """Reads a log into per-user sequences ordered by time (see the module doc).

    Raises:
        DataError: A missing file or column, a bad value, or no interaction left.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"interaction file not found: {path}; pass MovieLens u.data, a .csv/.tsv/.jsonl log or a "
            "RecBole .inter file (data.path or --data)"
        )
    fmt = log_format(path, format)
    if fmt == "movielens":
        known = set(MOVIELENS_COLUMNS)
        given = [c for c in (columns.user, columns.item, columns.time, columns.rating) if c]
        wrong = [c for c in given if c not in known]
        if wrong:
            raise DataError(
                f"{path}: u.data has the columns {list(MOVIELENS_COLUMNS)}, not {wrong[0]!r}; leave "
                "data.user_column / item_column / time_column / rating_column at their defaults"
            )
    if columns.threshold is not None and columns.rating is None:
        raise DataError("data.rating_threshold needs data.rating_column (the column holding the ratings)")
    wanted = [c for c in (columns.user, columns.item, columns.time, columns.rating) if c]
    order: dict[str, int] = {}
    items: dict[str, None] = {}
    events: list[tuple[int, float, int, str]] = []  # (user index, time, file position, item)
    for position, (line, row) in enumerate(_rows(path, fmt, wanted)):
        user, item = row[columns.user], row[columns.item]
        for name, value in ((columns.user, user), (columns.item, item)):
            if not value:
                raise DataError(
                    f"{path}:{line}: column {name!r} is empty; every row needs a user and an item"
                )
        if columns.rating is not None:
            rating = _number(row[columns.rating], path, line, columns.rating, "fix the row or unset rating")
            if columns.threshold is not None and rating < columns.threshold:
                continue
        time = 0.0
        if columns.time is not None:
            hint = "fix the row, or set data.time_column: null to take the file order as the time order"
            time = _number(row[columns.time], path, line, columns.time, hint)
        items.setdefault(item, None)
        events.append((order.setdefault(user, len(order)), time, position, item))
    if not events:
        kept = f" rated at least {columns.threshold}" if columns.threshold is not None else ""
        raise DataError(f"{path}: no interactions{kept}; check the file and data.rating_threshold")
    events.sort()  # by user, time, then file position: ties keep the file's order
    sequences: list[list[str]] = [[] for _ in order]
    for user, _, _, item in events:
        sequences[user].append(item)
    return InteractionLog(list(order), sequences, list(items), str(path), len(events))


def read_titles(
    path: str | Path, item_column: str = "item_id", title_column: str = "title", format: str | None = None
) -> dict[str, str]:
    """Item titles by raw id: MovieLens ``u.item`` (``id|title|...``, latin-1; a file named ``*.item``) or a
    CSV / TSV / JSONL table with ``item_column`` and ``title_column``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"titles file not found: {path}; pass MovieLens u.item or a table of item and title")
    if format == "movielens" or (format is None and path.suffix.lower() == ".item"):
        titles = {}
        with path.open(encoding="latin-1") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                fields = text.rstrip("\n").split("|")
                if len(fields) < 2:
                    raise DataError(f"{path}:{line}: expected 'id|title|...' as in MovieLens u.item")
                titles[fields[0]] = fields[1]
        return titles
    fmt = log_format(path, None if format in (None, "movielens") else format)
    return {row[item_column]: row[title_column] for _, row in _rows(path, fmt, [item_column, title_column])}


@dataclass
class Split:
    """Leave-one-out split of index sequences: each user's training items and held-out targets."""

    train: list[list[int]]  # per user, oldest first
    val: list[int]  # per user, the validation target (0: none)
    test: list[int]  # per user, the test target (0: none)

    def history(self, split: str, user: int) -> list[int]:
        """Everything user ``user`` saw before the ``split`` target (val: training items; test: and val)."""
        if split == "test" and self.val[user]:
            return [*self.train[user], self.val[user]]
        return self.train[user]


def leave_one_out(sequences: list[list[int]]) -> Split:
    """RecBole's ``LS: valid_and_test`` split of time-ordered sequences (see the module doc)."""
    train, val, test = [], [], []
    for seq in sequences:
        held = min(2, len(seq) - 1)
        keep = len(seq) - held
        train.append(list(seq[:keep]))
        val.append(seq[keep] if held == 2 else 0)
        test.append(seq[-1] if held >= 1 else 0)
    return Split(train, val, test)


def cut_history(items: list[int], max_len: int) -> list[int]:
    """The last ``max_len`` items of a history (SASRec's and RecBole's ``MAX_ITEM_LIST_LENGTH``)."""
    return list(items[-max_len:]) if max_len > 0 else []
