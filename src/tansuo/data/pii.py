"""Personal data out of text before anything learns from it: Presidio's recognizers find it, Presidio's
anonymizer puts a typed placeholder in its place (``<EMAIL>``), and a count per type says what was found.

``data.scrub_pii: [email, phone, credit_card, iban, ip, url]`` scrubs a text task's data before its tokenizer
is trained; ``tansuo scrub INPUT --output OUTPUT`` scrubs a file (plain text, CSV/TSV, JSONL: every string
value); ``tansuo serve --redact-output`` scrubs what a model generates.

The recognizers are Presidio's pattern recognizers, which need no language model: e-mail addresses and URLs
(with a domain that has a public suffix), phone numbers (Google's libphonenumber, through ``phonenumbers``),
credit card numbers (Luhn checksum), IBANs (their own checksum) and IPv4/IPv6 addresses. Names of people
need a named-entity model (spaCy's ``en_core_web_lg``, Presidio's default), which cannot be installed from
the package registries these machines reach, so ``person`` is refused with that reason rather than done
badly. presidio is imported only when scrubbing is asked for.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from tansuo.errors import DataError

log = logging.getLogger(__name__)

#: the types a recipe or the command may name -> (Presidio's entity, the placeholder)
PII_TYPES: dict[str, tuple[str, str]] = {
    "email": ("EMAIL_ADDRESS", "<EMAIL>"),
    "phone": ("PHONE_NUMBER", "<PHONE>"),
    "credit_card": ("CREDIT_CARD", "<CREDIT_CARD>"),
    "iban": ("IBAN_CODE", "<IBAN>"),
    "ip": ("IP_ADDRESS", "<IP>"),
    "url": ("URL", "<URL>"),
}
_UNAVAILABLE = {
    "person": "names of people need a named-entity model (spaCy's en_core_web_lg for Presidio), which cannot "
    "be installed from the package registries here; remove 'person'",
}
#: phone regions whose national formats are recognised besides international (+CC) numbers
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "CN", "JP", "BR", "AU", "CA")


def check_types(types: Iterable[str]) -> list[str]:
    """The types, checked; unknown or unavailable ones are a DataError naming them."""
    types = list(dict.fromkeys(types))
    for t in types:
        if t in _UNAVAILABLE:
            raise DataError(f"data.scrub_pii: {t!r}: {_UNAVAILABLE[t]}")
        if t not in PII_TYPES:
            raise DataError(f"data.scrub_pii: unknown type {t!r}; choose from {', '.join(PII_TYPES)}")
    return types


@cache
def _offline_tldextract() -> None:
    # presidio validates e-mail and URL domains with tldextract, whose default extractor fetches the public
    # suffix list from the internet first; its bundled snapshot is what an offline machine has
    import tldextract

    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())


def _recognizers(types: Sequence[str]) -> list[Any]:
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
    )

    _offline_tldextract()
    made = {
        "email": EmailRecognizer,
        "phone": lambda: PhoneRecognizer(supported_regions=PHONE_REGIONS),
        "credit_card": CreditCardRecognizer,
        "iban": IbanRecognizer,
        "ip": IpRecognizer,
        "url": UrlRecognizer,
    }
    return [made[t]() for t in types]


class Scrubber:
    """Replaces the PII of the given types in texts by placeholders; ``counts`` adds up what it replaced."""

    def __init__(self, types: Iterable[str]) -> None:
        self.types = check_types(types)
        try:
            from presidio_anonymizer import AnonymizerEngine
            from presidio_anonymizer.entities import OperatorConfig
        except ImportError as e:
            raise DataError(
                f"scrubbing PII needs Presidio ({e.name} is missing): pip install 'tansuo[pii]'"
            ) from None

        self._recognizers = _recognizers(self.types)
        self._entities = {PII_TYPES[t][0]: t for t in self.types}
        self._anonymizer = AnonymizerEngine()
        self._operators = {
            PII_TYPES[t][0]: OperatorConfig("replace", {"new_value": PII_TYPES[t][1]}) for t in self.types
        }
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        found = []
        for recognizer in self._recognizers:
            found += recognizer.analyze(text, recognizer.supported_entities, None)
        found = [r for r in found if r.entity_type in self._entities]
        if not found:
            return text
        found = _without_overlaps(found)
        self.counts.update(self._entities[r.entity_type] for r in found)
        return self._anonymizer.anonymize(text, found, self._operators).text

    def scrub_all(self, texts: Iterable[str]) -> list[str]:
        return [self(t) for t in texts]


def _without_overlaps(results: list[Any]) -> list[Any]:
    """Of overlapping findings keep the longer, then the more certain one (an e-mail address over the domain
    inside it that the URL recognizer also reports)."""
    kept: list[Any] = []
    for r in sorted(results, key=lambda r: (-(r.end - r.start), -r.score, r.start)):
        if all(r.end <= k.start or r.start >= k.end for k in kept):
            kept.append(r)
    return sorted(kept, key=lambda r: r.start)


def scrub_texts(texts: Sequence[str], types: Iterable[str], what: str = "the data") -> tuple[list[str], dict]:
    """``texts`` with the PII of ``types`` replaced, and the count per type (also logged)."""
    scrubber = Scrubber(types)
    out = scrubber.scrub_all(texts)
    counts = {t: scrubber.counts.get(t, 0) for t in scrubber.types}
    log.info("scrubbed %s: %s", what, ", ".join(f"{n} {t}" for t, n in counts.items()))
    return out, counts


def _format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    return {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "text")


def _scrub_json(value: Any, scrub: Scrubber) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_json(v, scrub) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_json(v, scrub) for k, v in value.items()}  # keys are field names: kept
    return value


def scrub_file(
    src: str | Path, dst: str | Path, types: Iterable[str], fmt: str | None = None
) -> dict[str, int]:
    """Write ``src`` with its PII of ``types`` replaced to ``dst`` (atomically) and return the count per type.

    Plain text is scrubbed line by line; CSV and TSV cell by cell (the header row kept); JSONL every string
    value of every object (keys kept). ``fmt``: text, csv, tsv or jsonl; default from the file's extension.

    Raises:
        DataError: The file is missing, not UTF-8, or a JSONL line is not JSON (naming the line).
    """
    import csv
    import io
    import json

    from tansuo.atomic import atomic_write_text

    src, dst = Path(src), Path(dst)
    kind = _format(src, fmt)
    if kind not in ("text", "csv", "tsv", "jsonl"):
        raise DataError(f"--format {kind!r} is unknown; use text, csv, tsv or jsonl")
    try:
        text = src.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{src} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{src} cannot be read as UTF-8 text ({e})") from e
    scrub = Scrubber(types)
    if kind == "text":
        out = "".join(scrub(line) for line in text.splitlines(keepends=True))
    elif kind == "jsonl":
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                lines.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{src}, line {n}: not JSON ({e.msg})") from None
            lines.append(json.dumps(_scrub_json(obj, scrub), ensure_ascii=False))
        out = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    else:
        delimiter = "," if kind == "csv" else "\t"
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
        writer.writerows([rows[0], *([scrub(cell) for cell in row] for row in rows[1:])] if rows else [])
        out = buffer.getvalue()
    atomic_write_text(dst, out)
    counts = {t: scrub.counts.get(t, 0) for t in scrub.types}
    log.info("scrubbed %s -> %s: %s", src, dst, ", ".join(f"{n} {t}" for t, n in counts.items()))
    return counts


def scrubbed_copy(src: Path, types: Sequence[str], work_dir: Path) -> tuple[Path, dict[str, int]]:
    """``src`` scrubbed into ``work_dir`` (what a task trains on when ``data.scrub_pii`` is set); a copy made
    from the same file (size and time) for the same types is reused. Returns the copy and the counts."""
    import json

    from tansuo.atomic import atomic_write_json

    types = check_types(types)
    dst = Path(work_dir) / f"scrubbed-{src.name}"
    record = dst.with_name(dst.name + ".json")
    stat = src.stat()
    key = {"source": str(src.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, "types": types}
    if dst.is_file() and record.is_file():
        seen = json.loads(record.read_text(encoding="utf-8"))
        if seen.get("key") == key:
            return dst, seen["counts"]
    counts = scrub_file(src, dst, types)
    atomic_write_json(record, {"key": key, "counts": counts})
    return dst, counts


def _checked(types: list[str]) -> list[str]:
    try:
        return check_types(types)
    except DataError as e:  # pydantic reports ValueErrors under the field's name
        raise ValueError(str(e).removeprefix("data.scrub_pii: ")) from None


#: the ``data.scrub_pii`` field of a text task's recipe
ScrubTypes = Annotated[list[str], AfterValidator(_checked)]
SCRUB_HELP = f"PII replaced by placeholders before anything trains: any of {', '.join(PII_TYPES)}"
