"""Parallel text (translation pairs): aligned line files and pair tables.

Two layouts, as fairseq's ``preprocess`` and Marian read them:

- **aligned line files**: a prefix ``P`` and two languages name ``P.<src>`` and ``P.<tgt>`` (``train.de`` and
  ``train.en``), UTF-8, one sentence a line, line i of one the translation of line i of the other;
- **a table**: CSV, TSV or JSONL with a source column and a target column (read by
  :func:`~tansuo.data.textsets.iter_labelled_rows`).

Every error is a :class:`~tansuo.errors.DataError` that names the files and says how to fix it: line files
of different lengths (both files and both counts), an empty sentence (file and line), a direction whose
file is missing (which one, and the languages found beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tansuo.data.textsets import iter_labelled_rows
from tansuo.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class ParallelText:
    """Aligned sentences and where they came from (for error messages and logs)."""

    sources: list[str]
    targets: list[str]
    origin: str  # "train.de / train.en" or "pairs.tsv"

    def __len__(self) -> int:
        return len(self.sources)


def is_table(path: str | Path, format: str | None = None) -> bool:
    """Whether ``path`` is a pair table (by ``format``, else by its extension) rather than a prefix of line
    files."""
    if format is not None:
        return format != "lines"
    return Path(path).suffix.lower() in TABLE_SUFFIXES and Path(path).is_file()


def read_parallel(
    path: str | Path,
    src_lang: str,
    tgt_lang: str,
    *,
    source_column: str | None = None,
    target_column: str | None = None,
    format: str | None = None,
) -> ParallelText:
    """Read one split of parallel text.

    Args:
        path: A prefix of aligned line files (``data/train`` for ``data/train.de`` and ``data/train.en``) or a
            ``.csv`` / ``.tsv`` / ``.jsonl`` table.
        src_lang: The source language's suffix (``de``).
        tgt_lang: The target language's suffix (``en``).
        source_column: A table's source column; default ``src_lang``.
        target_column: A table's target column; default ``tgt_lang``.
        format: ``lines``, ``csv``, ``tsv`` or ``jsonl``; None: a table when the path ends so and exists.

    Raises:
        DataError: Missing files, misaligned line files, empty sentences, missing columns.
    """
    path = Path(path).expanduser()
    if is_table(path, format):
        source_column, target_column = source_column or src_lang, target_column or tgt_lang
        rows = list(
            iter_labelled_rows(
                path,
                text_column=source_column,
                label_column=target_column,
                format=None if format in (None, "lines") else format,
            )
        )
        for row in rows:
            for column, text in ((source_column, row.text), (target_column, row.label)):
                if not text.strip():
                    raise DataError(
                        f"{path}:{row.line}: the {column!r} text is empty; remove the row or fill it in"
                    )
        return ParallelText([r.text.strip() for r in rows], [r.label.strip() for r in rows], str(path))
    src_file, tgt_file = (path.with_name(f"{path.name}.{lang}") for lang in (src_lang, tgt_lang))
    missing = [f for f in (src_file, tgt_file) if not f.is_file()]
    if missing:
        found = (
            sorted(p.suffix.lstrip(".") for p in path.parent.glob(f"{path.name}.*"))
            if path.parent.is_dir()
            else []
        )
        seen = f"; beside it: {', '.join(f'{path.name}.{s}' for s in found)}" if found else ""
        raise DataError(
            f"{' and '.join(str(f) for f in missing)} not found for the direction {src_lang} -> {tgt_lang}"
            f"{seen}. Set data.src_lang / data.tgt_lang (--set data.src_lang=..) to languages with files, "
            "or point data.train/val/test at the prefix of the files (train for train.de and train.en)"
        )
    sources, targets = _lines(src_file), _lines(tgt_file)
    if len(sources) != len(targets):
        raise DataError(
            f"{src_file} has {len(sources):,} lines but {tgt_file} has {len(targets):,}: line i of one "
            "must be the translation of line i of the other; fix the files so that they align"
        )
    for file, lines in ((src_file, sources), (tgt_file, targets)):
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise DataError(
                f"{file}:{empty[0]}: empty line{more}; remove it and its partner line in the other file"
            )
    return ParallelText(
        [s.strip() for s in sources], [t.strip() for t in targets], f"{src_file} / {tgt_file}"
    )


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.rstrip("\r") for line in lines]
