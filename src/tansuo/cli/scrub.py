"""``tansuo scrub``: personal data out of a text file before it is used."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import console, setup_logging


def scrub(
    input: Annotated[Path, typer.Argument(help="a text file: plain text, .csv, .tsv or .jsonl")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the scrubbed file to write")],
    types: Annotated[
        str, typer.Option(help="comma-separated PII types to replace")
    ] = "email,phone,credit_card,iban,ip,url",
    format: Annotated[
        str | None, typer.Option(help="text, csv, tsv or jsonl (default: from the file's extension)")
    ] = None,
) -> None:
    """Replace e-mail addresses, phone numbers, credit card numbers, IBANs, IP addresses and URLs by typed
    placeholders (<EMAIL>, <PHONE>, ...), with Presidio's recognizers; prints the count per type. CSV and
    TSV are scrubbed cell by cell (the header kept), JSONL in every string value."""
    setup_logging(False)
    from tansuo.data.pii import scrub_file
    from tansuo.errors import DataError

    if input.resolve() == output.resolve():
        raise DataError(
            f"--output {output} is the input; write the scrubbed copy elsewhere (nothing is lost)"
        )
    counts = scrub_file(input, output, [t.strip() for t in types.split(",") if t.strip()], format)
    found = ", ".join(f"{n} {t}" for t, n in counts.items())
    console.print(f"scrubbed {input} -> {output}: {found}", markup=False, highlight=False, soft_wrap=True)
