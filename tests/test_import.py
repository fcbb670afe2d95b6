import subprocess
import sys

HEAVY = (
    "fastapi",
    "uvicorn",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "kornia",
    "transformers",
    "sklearn",
    "optuna",
    "opacus",
)


def test_import_stays_light() -> None:
    code = (
        "import sys, tansuo, tansuo.models, tansuo.tasks, tansuo.train.trainer, tansuo.cli, tansuo.audit\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
