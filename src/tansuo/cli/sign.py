"""``tansuo keygen``, ``tansuo sign``, ``tansuo manifest``: who wrote a bundle, and that nobody changed it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import console, setup_logging


def keygen(
    path: Annotated[
        Path, typer.Argument(help="the private key file to write; the public key goes to PATH.pub")
    ],
) -> None:
    """Write a new Ed25519 key pair for signing bundles (the private key readable by you only)."""
    setup_logging(False)
    from tansuo.integrity import generate_key

    key, public = generate_key(path)
    console.print(f"private key {key}, public key {public}", markup=False, highlight=False, soft_wrap=True)


def sign(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder")],
    key: Annotated[Path, typer.Option("--key", help="an Ed25519 private key (PEM: tansuo keygen, openssl)")],
) -> None:
    """Sign a bundle: its files are checked against its manifest, then the manifest is signed
    (manifest.sig). `tansuo serve --require-signature PUBKEY` serves only bundles signed by that key."""
    setup_logging(False)
    from tansuo.integrity import sign_folder

    path = sign_folder(bundle, key)
    console.print(f"signed {bundle} -> {path}", markup=False, highlight=False, soft_wrap=True)


def manifest(bundle: Annotated[Path, typer.Argument(help="a bundle folder you trust")]) -> None:
    """Write a bundle's manifest (the sha256 of each file) for its files as they are now: for a bundle from a
    tansuo that wrote none. Loading checks every file against it; a signature it had no longer holds."""
    setup_logging(False)
    from tansuo.errors import BundleError
    from tansuo.integrity import write_manifest

    if not (bundle / "config.json").is_file():
        raise BundleError(f"{bundle} is not a bundle (no config.json); pass the folder a training run wrote")
    write_manifest(bundle)
    console.print(f"wrote {bundle / 'manifest.json'}", markup=False, highlight=False, soft_wrap=True)
