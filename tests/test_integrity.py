"""Bundles carry a manifest that loading checks, and an optional Ed25519 signature (tansuo.integrity)."""

import json
from pathlib import Path

import pytest

from tansuo.bundle import load_bundle, save_bundle, update_bundle_metrics
from tansuo.errors import BundleError, TansuoError
from tansuo.integrity import generate_key, sign_folder, verify_manifest, verify_signature, write_manifest
from tansuo.models import create_model
from tests.helpers import image_recipe, recipe_and_task, run


@pytest.fixture
def bundle(tmp_path: Path, image_npz: Path) -> Path:
    _, task = recipe_and_task(image_recipe(image_npz, tmp_path))
    return save_bundle(tmp_path / "b", create_model("vit_test", **task.model_overrides()), task, {"val": {}})


def test_a_saved_bundle_lists_every_file_with_its_hash(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files and "model.safetensors" in files
    verify_manifest(bundle)
    load_bundle(bundle)


def _flip_one_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: _flip_one_byte(b / "model.safetensors"), r"model.safetensors differs from the manifest"),
        (
            lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:-100]),
            r"model.safetensors has \d+ bytes where the manifest says \d+",
        ),
        (lambda b: (b / "metrics.json").unlink(), r"metrics.json is missing"),
        (lambda b: (b / "extra.py").write_text("import os"), r"does not list: extra.py"),
        (lambda b: (b / "manifest.json").unlink(), r"has no manifest.json.*tansuo manifest"),
        (lambda b: (b / "manifest.json").write_text("{"), r"manifest.json is unreadable"),
    ],
    ids=["flipped byte", "truncated", "missing", "foreign", "no manifest", "bad manifest"],
)
def test_a_damaged_bundle_is_refused_naming_the_file(bundle: Path, damage, message: str) -> None:
    damage(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_the_cli_refuses_a_tampered_bundle_with_exit_2(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _flip_one_byte(bundle / "model.safetensors")
    code, _, err = run(["eval", str(bundle)], monkeypatch, capsys)
    assert code == 2 and "model.safetensors differs" in err


def test_updating_metrics_rewrites_the_manifest(bundle: Path) -> None:
    update_bundle_metrics(bundle, {"test": {"accuracy": 0.5}})
    assert load_bundle(bundle).metrics == {"test": {"accuracy": 0.5}}


def test_a_signed_bundle_verifies_only_with_its_key(bundle: Path, tmp_path: Path) -> None:
    key, pub = generate_key(tmp_path / "keys" / "k")
    _, other = generate_key(tmp_path / "keys" / "other")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle, public_key=pub)
    sign_folder(bundle, key)
    load_bundle(bundle, public_key=pub)
    with pytest.raises(BundleError, match="signed by another key"):
        verify_signature(bundle, other)
    # a new manifest for changed files (what an attacker without the key can write) breaks the signature
    sig = (bundle / "manifest.sig").read_bytes()
    (bundle / "metrics.json").write_text("{}")
    write_manifest(bundle)
    (bundle / "manifest.sig").write_bytes(sig)
    with pytest.raises(BundleError, match="manifest changed after signing"):
        load_bundle(bundle, public_key=pub)


def test_a_bundle_whose_files_changed_is_not_signed(bundle: Path, tmp_path: Path) -> None:
    key, _ = generate_key(tmp_path / "k")
    _flip_one_byte(bundle / "model.safetensors")
    with pytest.raises(BundleError, match="differs from the manifest"):
        sign_folder(bundle, key)
    assert not (bundle / "manifest.sig").exists()


def test_keys_are_never_overwritten_and_bad_keys_are_named(tmp_path: Path, bundle: Path) -> None:
    generate_key(tmp_path / "k")
    with pytest.raises(BundleError, match="exists"):
        generate_key(tmp_path / "k")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(BundleError, match="junk.pem is not an unencrypted PEM private key"):
        sign_folder(bundle, tmp_path / "junk.pem")
    with pytest.raises(BundleError, match="junk.pem is not a PEM or OpenSSH public key"):
        verify_signature(bundle, tmp_path / "junk.pem")


def test_keygen_sign_and_serve_require_signature_from_the_cli(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tansuo.serve.app import ServeConfig, serve_bundle

    key = tmp_path / "keys" / "signer"
    assert run(["keygen", str(key)], monkeypatch, capsys)[0] == 0
    pub = Path(f"{key}.pub")
    code, _, err = run(["serve", str(bundle), "--require-signature", str(pub)], monkeypatch, capsys)
    assert code == 2 and "is not signed" in err
    code, out, _ = run(["sign", str(bundle), "--key", str(key)], monkeypatch, capsys)
    assert code == 0 and "manifest.sig" in out
    server, _ = serve_bundle(bundle, ServeConfig("torch", 1, 0.0), "cpu", public_key=pub)
    assert server.bundle.task.name == "image"
    with pytest.raises(TansuoError, match="not an --adapter folder"):
        serve_bundle(bundle, ServeConfig("torch", 1, 0.0), "cpu", adapter=tmp_path, public_key=pub)


def test_manifest_command_blesses_a_bundle_without_one(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (bundle / "manifest.json").unlink()
    assert run(["eval", str(bundle)], monkeypatch, capsys)[0] == 2
    assert run(["manifest", str(bundle)], monkeypatch, capsys)[0] == 0
    load_bundle(bundle)
    code, _, err = run(["manifest", str(bundle.parent)], monkeypatch, capsys)
    assert code == 2 and "is not a bundle" in err
