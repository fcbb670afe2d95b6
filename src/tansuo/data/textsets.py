"""Labelled text for classification: CSV, TSV (GLUE / SST-2 layout) and JSONL readers.

Each file has one example per row (or JSON object per line) with a text column, an optional second text
column (for sentence pairs) and a label column. Labels are kept as strings (``1`` and ``"1"`` are the same
label). TSV is read with ``csv.QUOTE_NONE``: SST-2's ``train.tsv`` holds unbalanced quote characters that
ordinary CSV quoting would treat as the start of a field spanning several lines.

Every error is a :class:`~tansuo.errors.DataError` naming the file and line and saying how to fix it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from tansuo.errors import DataError

TextFormat = Literal["csv", "tsv", "jsonl"]
FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl")


class LabelledRow(NamedTuple):
    """One example and the line of the file it starts on (1-based)."""

    text: str
    pair: str | None
    label: str
    line: int


def text_format(path: str | Path, format: str | None = None) -> TextFormat:
    """The format of ``path``: ``format`` when given, else from the extension (.csv, .tsv, .jsonl)."""
    if format is None:
        suffix = Path(path).suffix.lower().lstrip(".")
        format = {"json": "jsonl", "ndjson": "jsonl", "txt": "tsv"}.get(suffix, suffix)
    if format not in FORMATS:
        raise DataError(
            f"{path}: cannot tell the format of this file; name it .csv, .tsv or .jsonl "
            f"or set data.format to one of {list(FORMATS)}"
        )
    return format  # type: ignore[return-value]


def iter_labelled_rows(
    path: str | Path,
    *,
    text_column: str = "sentence",
    label_column: str | None = "label",
    text_pair_column: str | None = None,
    format: str | None = None,
) -> Iterator[LabelledRow]:
    """Yield every example of a labelled text file with its line number (see :func:`read_labelled_text`).

    ``label_column=None`` reads unlabelled texts (to predict on); every label is then "".
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass the path to a .csv, .tsv or .jsonl file")
    fmt = text_format(path, format)
    wanted = [c for c in (text_column, label_column, text_pair_column) if c]
    if fmt == "jsonl":
        yield from _iter_jsonl(path, wanted, text_column, label_column, text_pair_column)
    else:
        yield from _iter_delimited(path, fmt, wanted, text_column, label_column, text_pair_column)


def read_labelled_text(
    path: str | Path,
    *,
    text_column: str = "sentence",
    label_column: str = "label",
    text_pair_column: str | None = None,
    format: str | None = None,
) -> list[tuple[str, str | None, str]]:
    """Read a labelled text file into ``(text, pair, label)`` tuples.

    Args:
        path: A .csv, .tsv or .jsonl file (the first row of CSV / TSV is a header naming the columns).
        text_column: Column (or JSON key) holding the text.
        label_column: Column holding the label; read as a string.
        text_pair_column: Column holding the second text of a pair, or None for single texts (pair None).
        format: "csv", "tsv" or "jsonl"; None: from the file's extension.

    Returns:
        One tuple per example, in file order. Empty texts are kept.

    Raises:
        DataError: The file is missing or empty, a column is missing (the message lists those found), a
            CSV / TSV row has the wrong number of fields, or a JSONL line is not a JSON object.
    """
    return [
        (row.text, row.pair, row.label)
        for row in iter_labelled_rows(
            path,
            text_column=text_column,
            label_column=label_column,
            text_pair_column=text_pair_column,
            format=format,
        )
    ]


def _missing(path: Path, line: int, wanted: list[str], found: list[str], what: str) -> DataError:
    missing = [c for c in wanted if c not in found]
    return DataError(
        f"{path}:{line}: {what} has no column {', '.join(repr(c) for c in missing)}; "
        f"the columns found are {found}; set data.text_column / data.label_column / "
        "data.text_pair_column to match"
    )


def _iter_delimited(
    path: Path,
    fmt: str,
    wanted: list[str],
    text_column: str,
    label_column: str | None,
    pair_column: str | None,
) -> Iterator[LabelledRow]:
    kwargs: dict = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, **kwargs)
        try:
            header = next(reader, None)
            while header is not None and not header:  # leading blank lines
                header = next(reader, None)
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: malformed header ({error})") from error
        if header is None:
            raise DataError(f"{path}: the file is empty; it needs a header row naming the columns")
        header = [h.strip() for h in header]
        if any(c not in header for c in wanted):
            raise _missing(path, reader.line_num, wanted, header, "the header")
        ti = header.index(text_column)
        li = header.index(label_column) if label_column else None
        pi = header.index(pair_column) if pair_column else None
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise DataError(f"{path}:{start}: malformed row ({error})") from error
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{line}: malformed row: {len(fields)} fields but the header has {len(header)} "
                    f"({header}); fix the row"
                    + (" (a tab inside a text?)" if fmt == "tsv" else " (quote texts holding commas)")
                )
            label = "" if li is None else fields[li].strip()
            yield LabelledRow(fields[ti], None if pi is None else fields[pi], label, line)


def _iter_jsonl(
    path: Path, wanted: list[str], text_column: str, label_column: str | None, pair_column: str | None
) -> Iterator[LabelledRow]:
    seen = False
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen = True
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_no}: malformed row: not valid JSON ({error.msg}); "
                    "each line must be one JSON object"
                ) from error
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{line_no}: malformed row: a JSON {type(obj).__name__}, not an object; "
                    "each line must be one JSON object"
                )
            if any(c not in obj for c in wanted):
                raise _missing(path, line_no, wanted, list(obj), "the object")
            label = obj[label_column] if label_column else ""
            if isinstance(label, (dict, list)) or label is None:
                raise DataError(f"{path}:{line_no}: the label {label!r} must be a string or a number")
            yield LabelledRow(
                _text(obj[text_column], path, line_no),
                None if pair_column is None else _text(obj[pair_column], path, line_no),
                str(label).strip(),
                line_no,
            )
    if not seen:
        raise DataError(f"{path}: the file is empty; it needs one JSON object per line")


def _text(value: object, path: Path, line: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: the text {value!r} is not a string")
    return value
