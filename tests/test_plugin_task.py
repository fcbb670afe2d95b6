"""The seams are open: a task, a model family and two endpoints defined in ONE FILE outside the package
(``tests/plugins/regress.py``) go through train, eval, predict, compress (int8 + measurement), explore and
serve with no change to ``src/``.

The fast test runs the library in this process; the integration test runs the ``tansuo`` commands as a
user would, each in its own process, with the plugin named in ``TANSUO_PLUGINS``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

PLUGINS = Path(__file__).parent / "plugins"
REPO = Path(__file__).parent.parent


def write_data(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = 2.0 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + 0.05 * rng.normal(size=n)
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", fmt="%.5f")
    return path


def recipe(data: Path, out: Path, **train: object) -> dict:
    return {
        "task": "regress",
        "seed": 5,
        "data": {"path": str(data)},
        "model": {"name": "mlp_regress_test", "overrides": {"hidden": 32}},
        "train": {
            "out_dir": str(out),
            "max_steps": 300,
            "batch_size": 32,
            "lr": 1e-2,
            "warmup_steps": 10,
            "log_every": 100,
            "best_metric": "r2",
            **train,
        },
    }


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin, loaded the way a user names it: TANSUO_PLUGINS plus its folder on the path."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("TANSUO_PLUGINS", "regress")


def test_plugin_task_trains_measures_quantizes_and_serves_in_process(plugin, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tansuo.bundle import load_bundle, save_bundle
    from tansuo.compress import Int8DynamicConfig, quantize_
    from tansuo.measure import measure_bundle
    from tansuo.recipe import validate_recipe
    from tansuo.serve.app import ServeConfig, Server, create_app
    from tansuo.train.setup import build_run
    from tansuo.train.trainer import Trainer

    data = write_data(tmp_path / "data.csv")
    rec, data_cfg = validate_recipe(recipe(data, tmp_path / "run"))  # finds `regress` through the plugin
    run = build_run(rec, data_cfg, tmp_path / "run" / "data")
    assert run.model.model_name == "mlp_regress_test" and run.model.config.in_features == 4
    result = Trainer(run.task, run.model, rec.train, seed=rec.seed).fit()
    assert result["test"]["r2"] > 0.8  # it learned, and the held-back split was scored

    b = load_bundle(result["bundle"])
    (row,) = b.task.predict(b.model, ["1 0 0 0"], torch.device("cpu"))
    assert b.task.name == "regress" and abs(row["value"] - 2.0) < 0.5
    figures = measure_bundle(Path(result["bundle"]), reps=5)
    assert figures["metric"] == "r2" and figures["quality"] > 0.8 and figures["latency_ms_p50"] > 0

    quantize_(b.model, Int8DynamicConfig())  # the Python API's record makes the bundle loadable
    save_bundle(tmp_path / "int8", b.model, b.task, b.metrics)
    q = load_bundle(tmp_path / "int8")
    assert q.task.evaluate(q.model, "test", 64, torch.device("cpu"))["r2"] > 0.7

    server = Server(load_bundle(result["bundle"]), ServeConfig(max_wait_ms=0), torch.device("cpu"))
    assert [e.path for e in server.endpoints] == ["/v1/predict", "/v1/regress"]
    with TestClient(create_app(server)) as client:
        one = client.post("/v1/predict", json={"inputs": [1.0, 0.0, 0.0, 0.0]})
        assert one.status_code == 200 and abs(one.json()["predictions"][0]["value"] - 2.0) < 0.5
        two = client.post("/v1/regress", json={"inputs": [[1, 0, 0, 0], [0, 1, 0, 0]]})
        assert two.status_code == 200 and len(two.json()["values"]) == 2
        bad = client.post("/v1/predict", json={"inputs": [1.0, 2.0]})
        assert bad.status_code == 422 and "the model takes 4" in bad.json()["error"]
        card = client.get("/v1/model").json()
        assert card["task"] == "regress" and card["endpoints"] == ["/v1/predict", "/v1/regress"]
        assert card["in_features"] == 4


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "TANSUO_PLUGINS": "regress", "COLUMNS": "200"}


def tansuo(*args: str, cwd: Path) -> str:
    """Run ``tansuo ARGS`` in a fresh process with the plugin named; return its stdout (fail with stderr)."""
    cmd = [sys.executable, "-c", "from tansuo.cli import main; main()", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"tansuo {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.integration
def test_plugin_task_through_every_command(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.csv")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe(data, tmp_path / "run")))
    out = tansuo("train", "recipe.yaml", "-q", cwd=tmp_path)
    assert "test r2:" in out
    bundle = tmp_path / "run" / "bundle"

    metrics = json.loads(tansuo("eval", str(bundle), "--json", cwd=tmp_path))
    assert metrics["test"]["r2"] > 0.8
    assert "->" in tansuo("predict", str(bundle), "1,0,0,0", cwd=tmp_path)

    tansuo("compress", str(bundle), "--quantize", "int8", "--out", "c", cwd=tmp_path)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    original, int8 = report["variants"]
    assert int8["steps"] == ["int8"] and int8["metric"] == "r2" and int8["quality"] > 0.7
    assert original["latency_ms_p50"] > 0 and int8["latency_ms_p50"] > 0

    study = recipe(data, tmp_path / "unused", max_steps=150)
    study["explore"] = {
        "study": str(tmp_path / "study"),
        "candidates": [{"model": "mlp_regress_test", "space": {"hidden": [16, 32]}}],
        "variants": [
            {"name": "plain"},
            {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}]},
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 5},
    }
    (tmp_path / "explore.yaml").write_text(yaml.safe_dump(study))
    tansuo("explore", "explore.yaml", "-q", cwd=tmp_path)
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert results["counts"]["complete"] == 2 and results["recommended"] is not None
    assert (tmp_path / "study" / "best" / "config.json").is_file()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        "from tansuo.cli import main; main()",
        "serve",
        str(bundle),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            time.sleep(0.1)
        answer = httpx.post(f"{url}/v1/predict", json={"inputs": [[1, 0, 0, 0]]}).json()
        assert abs(answer["predictions"][0]["value"] - 2.0) < 0.5
        assert len(httpx.post(f"{url}/v1/regress", json={"inputs": [0, 0, 0, 0]}).json()["values"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
