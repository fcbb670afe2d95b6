"""A folder's manifest (the sha256 and size of every file in it) and its Ed25519 signature.

Every bundle carries ``manifest.json``; loading one checks it first, so a flipped byte, a truncated file, a
missing file or a file that was not there when the bundle was written is refused, naming the file, before
anything is parsed. ``manifest.sig`` (written by ``tansuo sign``) signs the manifest's bytes; a server started
with ``--require-signature`` loads only bundles whose signature verifies with the key it was given.

```
manifest.json  {"format": 1, "algorithm": "sha256", "files": {"config.json": {"sha256": .., "size": ..}, ..}}
manifest.sig   {"algorithm": "ed25519", "public_key": <base64 raw 32 bytes>, "signature": <base64 64 bytes>}
```
Keys are PEM files (``tansuo keygen``, or ``openssl genpkey -algorithm ed25519``); public keys may also be
OpenSSH's one-line ``ssh-ed25519`` form. ``cryptography`` is imported only to sign and to verify signatures.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tansuo.atomic import atomic_write, atomic_write_json
from tansuo.errors import BundleError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_OWN = {MANIFEST, SIGNATURE}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    """The folder's files (nested ones too) as sorted POSIX paths relative to it, without the manifest's
    own two files. Links are refused: a bundle holds plain files only."""
    names = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).as_posix()
        if f.is_symlink():
            raise BundleError(f"{f} is a link; a bundle holds plain files only")
        if f.is_file() and rel not in _OWN:
            names.append(rel)
    return sorted(names)


def manifest_of(folder: str | Path) -> dict[str, Any]:
    """The manifest ``folder``'s files have now."""
    folder = Path(folder)
    files = {
        name: {"sha256": _sha256(folder / name), "size": (folder / name).stat().st_size}
        for name in _files(folder)
    }
    return {"format": 1, "algorithm": "sha256", "files": files}


def write_manifest(folder: str | Path) -> None:
    """Write (atomically) ``folder/manifest.json`` for its files as they are; an old signature no longer
    matches and is removed."""
    folder = Path(folder)
    atomic_write_json(folder / MANIFEST, manifest_of(folder))
    (folder / SIGNATURE).unlink(missing_ok=True)


def verify_manifest(folder: str | Path) -> None:
    """Check every file of ``folder`` against its manifest.

    Raises:
        BundleError: The manifest is missing or unreadable, or a file is missing, of another size
            (truncated or extended), of other content, or not in the manifest (foreign); each names the file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{folder} has no {MANIFEST}, so its files cannot be checked; if you trust this bundle (one "
            f"written by a tansuo before manifests), write one with `tansuo manifest {folder}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(listed, dict):
            raise ValueError("not a sha256 manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path} is unreadable ({e}); the bundle is damaged") from e
    for name, entry in sorted(listed.items()):
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file} is missing; the bundle is incomplete (its manifest lists it)")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise BundleError(
                f"{file} has {size} bytes where the manifest says {entry.get('size')}: it was truncated or "
                "changed after the bundle was written; restore it or write the bundle again"
            )
        if _sha256(file) != entry.get("sha256"):
            raise BundleError(
                f"{file} differs from the manifest's sha256: it was changed after the bundle was written; "
                "restore it or write the bundle again"
            )
    foreign = [name for name in _files(folder) if name not in listed]
    if foreign:
        raise BundleError(
            f"{folder} holds files its manifest does not list: {', '.join(foreign)}; remove them (a bundle "
            "is exactly what was written)"
        )


# ------------------------------------------------------------------------------------------ signatures
def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {what} {path} ({e.strerror or e})") from e


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as ``tansuo keygen`` and ``openssl genpkey
    -algorithm ed25519`` write it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    data = _read_key_file(path, "private key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path} is not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__}; bundles are signed with Ed25519 keys")
    return key


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM file or OpenSSH's ``ssh-ed25519 AAAA...`` line."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

    path = Path(path)
    data = _read_key_file(path, "public key")
    try:
        key = load_ssh_public_key(data) if data.lstrip().startswith(b"ssh-") else load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path} is not a PEM or OpenSSH public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__}; bundles are signed with Ed25519 keys")
    return key


def generate_key(path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``path`` (the private key, PEM, readable by its owner only) and
    ``path.pub`` (the public key, PEM). An existing file is never overwritten."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    path = Path(path)
    public = path.with_name(path.name + ".pub")
    for p in (path, public):
        if p.exists():
            raise BundleError(f"{p} exists; choose another name (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    atomic_write(public, lambda p: p.write_bytes(pub))
    return path, public


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_folder(folder: str | Path, private_key: str | Path) -> Path:
    """Check ``folder`` against its manifest, then sign the manifest with ``private_key``: writes
    ``manifest.sig``. A bundle whose files were changed is refused, not blessed."""
    folder = Path(folder)
    verify_manifest(folder)
    key = load_private_key(private_key)
    signature = key.sign((folder / MANIFEST).read_bytes())
    atomic_write_json(
        folder / SIGNATURE,
        {
            "algorithm": "ed25519",
            "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
            "signature": base64.b64encode(signature).decode(),
        },
    )
    return folder / SIGNATURE


def verify_signature(folder: str | Path, public_key: str | Path) -> None:
    """Check that ``folder``'s manifest is signed by ``public_key`` (and, through the manifest, every file).

    Raises:
        BundleError: No signature, one by another key, or one that does not match the manifest.
    """
    from cryptography.exceptions import InvalidSignature

    folder = Path(folder)
    key = load_public_key(public_key)
    path = folder / SIGNATURE
    if not path.is_file():
        raise BundleError(
            f"{folder} is not signed (no {SIGNATURE}); sign it with `tansuo sign {folder} --key KEY`"
        )
    try:
        sig = json.loads(path.read_text(encoding="utf-8"))
        signature = base64.b64decode(sig["signature"], validate=True)
        signer = base64.b64decode(sig.get("public_key", ""), validate=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path} is unreadable ({e}); sign the bundle again") from e
    if signer and signer != _raw_public(key):
        raise BundleError(f"{folder} is signed by another key than {public_key}")
    try:
        key.verify(signature, (folder / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(
            f"{path} does not match {folder / MANIFEST}: the manifest changed after signing"
        ) from None
    verify_manifest(folder)
