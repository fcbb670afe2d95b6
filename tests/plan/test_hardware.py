"""The hardware file: the shipped one is valid, a bad one is an error naming the entry and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tansuo.plan.hardware import load_hardware, pick, shipped
from tansuo.plan.points import PlanError


def test_the_shipped_file_has_sourced_entries() -> None:
    accs = load_hardware()
    names = {a.name for a in accs}
    assert {"H100-SXM", "A100-80GB", "L4", "CPU-2core"} <= names
    for a in accs:
        assert a.source and a.price_source and a.peak_fp32_tflops > 0 and a.memory_gb > 0
    h100 = pick(accs, ["h100-sxm"])[0]
    assert h100.peak("bf16") == (989.4e12, "bf16")
    cpu = pick(accs, ["CPU-2core"])[0]
    assert cpu.peak("bf16") == (0.12e12, "fp32")  # no bf16 units: it trains in fp32


def _write(tmp_path: Path, accelerators: list) -> Path:
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump({"accelerators": accelerators}))
    return path


def test_errors_name_the_field(tmp_path: Path) -> None:
    good = yaml.safe_load(shipped().read_text())["accelerators"][0]
    bad = {k: v for k, v in good.items() if k != "peak_fp32_tflops"}
    with pytest.raises(PlanError, match=r"accelerators\.1\.peak_fp32_tflops: Field required"):
        load_hardware(_write(tmp_path, [good, bad]))
    with pytest.raises(PlanError, match=r"accelerators\.0\.memory_gb: .*greater than 0"):
        load_hardware(_write(tmp_path, [{**good, "memory_gb": 0}]))
    with pytest.raises(PlanError, match=r"accelerators\.0\.tflops: unknown field"):
        load_hardware(_write(tmp_path, [{**good, "tflops": 5}]))
    with pytest.raises(PlanError, match="listed twice"):
        load_hardware(_write(tmp_path, [good, good]))
    with pytest.raises(PlanError, match="not found"):
        load_hardware(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("accelerators: [unclosed")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_hardware(tmp_path / "broken.yaml")


def test_an_unknown_accelerator_lists_the_known_ones() -> None:
    with pytest.raises(PlanError, match=r"no accelerator named 'B200'.*H100-SXM"):
        pick(load_hardware(), ["B200"])
