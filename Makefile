# batchgate: the two set-up commands are `make serve` and `make test`.
#
# One virtual environment, installed in two steps that add up:
#   make serve, make demo         serving only: `pip install -e .` (about 320 MB; no torch, no test tools)
#   make test, lint, bench*, fuzz everything: `pip install -e '.[test,bench]'` (about 2 GB, torch included)
# `make serve` then `make test` adds the extras to the same .venv; nothing is rebuilt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO   ?= demo_models
# Extra flags for `batchgate serve` under `make serve`, e.g. make serve ARGS="--http-port 9000 --grpc-port 9001"
# (`.venv/bin/batchgate serve --help` lists them; BATCHGATE_<NAME> variables work too).
ARGS   ?=
SERVE_STAMP := $(VENV)/.installed-serve
FULL_STAMP  := $(VENV)/.installed-full
INSTALL_DEPS := pyproject.toml setup.py proto/batchgate/admin/v1/admin.proto
# pip's own progress: each package as it is collected, download bars, then the install step.
PIP_INSTALL := $(PIP) install --progress-bar on --disable-pip-version-check

.PHONY: install install-serve serve test test-grpcio fuzz drift-sweep demo bench bench-serving bench-batching bench-remote bench-grpc-engines \
	bench-overload bench-scrape bench-large-answers bench-routing bench-drift bench-workers bench-score bench-observability bench-tracing bench-tools test-tools dashboard-preview lint clean soak

$(PY):
	@echo "==> creating the virtual environment $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip in $(VENV)"
	$(PIP_INSTALL) --upgrade pip

$(SERVE_STAMP): $(INSTALL_DEPS) | $(PY)
	@echo "==> installing batchgate for serving: pip install -e . (about 55 packages, 320 MB; one to two minutes)"
	$(PIP_INSTALL) -e .
	@touch $@
	@echo "==> serving install done ($$(du -sh $(VENV) | cut -f1) in $(VENV))"

# The full install holds the serving one, so it marks that one done too.
$(FULL_STAMP): $(INSTALL_DEPS) | $(PY)
	@echo "==> installing batchgate with every extra the tests, lint and benchmarks use: pip install -e '.[test,bench]'"
	@echo "    (torch, scikit-learn, scipy, pyarrow, pytest, ruff, mypy...: about 2 GB, torch 750 MB of it; a few minutes)"
	$(PIP_INSTALL) -e '.[test,bench]'
	@touch $@ $(SERVE_STAMP)
	@echo "==> full install done ($$(du -sh $(VENV) | cut -f1) in $(VENV))"

install-serve: $(SERVE_STAMP)

install: $(FULL_STAMP)

$(DEMO)/.built: $(SERVE_STAMP) server/demo.py
	$(VENV)/bin/batchgate demo-repo --force $(DEMO)
	touch $@

demo: $(DEMO)/.built

# Ports: HTTP 8000, gRPC 8001, metrics 8002, admin gRPC 8003 and admin HTTP 8005 (these two on 127.0.0.1).
serve: demo
	@echo "==> serving $(DEMO)/: HTTP :8000, gRPC :8001, metrics :8002 unless ARGS or BATCHGATE_* say otherwise"
	$(VENV)/bin/batchgate serve --model-repository $(DEMO) $(ARGS)

# ruff's rules and formatting, then mypy (tools/typecheck.py runs it on the package laid out as
# installed: see [tool.mypy] in pyproject.toml).
LINT_PATHS := server converters loadtest tests bench tools

lint: $(FULL_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(PY) tools/typecheck.py

# helm for the chart tests comes from PyPI (tools/fetch_helm.py), cached in .cache/helm.
# The suite mostly waits (servers starting, subprocesses, timeouts), so it runs in TEST_WORKERS
# processes side by side (pytest-xdist; a test file stays on one process, its module fixtures
# started once); then the tests marked serial, which compare timings, run alone.
TEST_WORKERS ?= 4
XDIST = -n $(TEST_WORKERS) --dist loadfile -m "not serial"
# The project's own modules are compiled first: where PYTHONDONTWRITEBYTECODE is set (as on CI
# images) no process caches them, and each of the suite's hundreds of servers, workers and CLI
# runs compiled them again (~0.4 s of CPU each; test_cli.py 39 s -> 33 s).
test: $(FULL_STAMP) lint test-tools
	$(PY) tools/fetch_helm.py >/dev/null
	$(PY) -m compileall -q -j 0 server converters loadtest tests bench tools >/dev/null
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) tests
	$(PY) -m pytest -q -p no:cacheprovider -m serial tests
	@mkdir -p .cache; echo "==> the gRPC tests on the grpcio engine, beside them the remote backend's on grpc.aio's client"
	BATCHGATE_TEST_REMOTE_CLIENT=grpcio $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_remote_backend.py \
	  >.cache/test-remote-grpcio.log 2>&1 & client=$$!; \
	BATCHGATE_TEST_GRPC_ENGINE=grpcio $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(GRPCIO_SUITE); engine=$$?; \
	wait $$client; client=$$?; echo "==> the remote backend's tests on grpc.aio's client:"; \
	cat .cache/test-remote-grpcio.log; test $$engine = 0 && test $$client = 0

# The gRPC protocol tests again on the other gRPC engine (grpc_engine: grpcio; the default is
# batchgate's own, h2), and the remote backend's tests on grpc.aio's client (client=grpcio; the
# default is batchgate's own HTTP/2 client); `make test` ends with them, side by side (the
# remote backend's file takes ~2.5 minutes in one process, the engine's files ~1.5 in four).
GRPCIO_SUITE = tests/integration/test_protocol_infer.py tests/integration/test_protocol_streaming.py \
  tests/integration/test_protocol_metadata.py tests/integration/test_protocol_compression.py \
  tests/integration/test_stream_backpressure.py tests/integration/test_tls.py tests/integration/test_parity.py \
  tests/integration/test_bad_input.py tests/integration/test_api_keys.py tests/integration/test_admission.py
test-grpcio: $(FULL_STAMP)
	BATCHGATE_TEST_GRPC_ENGINE=grpcio $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(GRPCIO_SUITE)
	BATCHGATE_TEST_REMOTE_CLIENT=grpcio $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_remote_backend.py

# The fuzz harness at length (tests/fuzz/conftest.py: ~90,000 examples, about 7 minutes, new seeds
# each run, what a run found replayed first from .cache/hypothesis). `make test` runs a short,
# fixed-seed pass of the same properties.
fuzz: $(FULL_STAMP)
	BATCHGATE_FUZZ=1 $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

# The drift tests' false-alarm sweep at length (tests/unit/test_drift_statistics.py: 2,500 windows
# of 2,000 rows per stream at alpha 0.01, about 4 minutes). `make test` runs 250 windows at 0.05.
drift-sweep: $(FULL_STAMP)
	BATCHGATE_DRIFT_SWEEP=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/unit/test_drift_statistics.py

# promtool (Debian's prometheus package) checks and unit-tests the chart's alert rules; where apt
# cannot install it (not root, no apt) those tests are skipped and say so.
test-tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq prometheus >/dev/null 2>&1; }; } ; } || \
	  echo "==> promtool could not be installed: the chart's rule tests that need it are skipped"

# The chart's dashboard drawn from a recorded run of real gateways (tools/dashboard_preview.py,
# about 2 minutes): docs/dashboard.png. `python tools/dashboard.py` remakes the dashboard's JSON.
dashboard-preview: $(FULL_STAMP)
	$(PY) tools/dashboard.py
	$(PY) tools/dashboard_preview.py

bench-tools:
	@command -v h2load >/dev/null && command -v wrk >/dev/null && (command -v nginx >/dev/null || test -x /usr/sbin/nginx) || \
	  (apt-get update -qq && apt-get install -y -qq nghttp2-client wrk nginx-light >/dev/null)

# One after the other, never in parallel: each benchmark pins its server and load tool to cores.
bench: $(FULL_STAMP) bench-tools
	$(PY) bench/serving.py
	$(PY) bench/batching.py
	$(PY) bench/remote.py

bench-serving: $(FULL_STAMP) bench-tools
	$(PY) bench/serving.py

bench-batching: $(FULL_STAMP) bench-tools
	$(PY) bench/batching.py

bench-remote: $(FULL_STAMP) bench-tools
	$(PY) bench/remote.py

# Worker processes (bench/workers.py, about 4 minutes): 1 process against --workers 2, replicate and
# front, over gRPC and HTTP: req/s ratios, rows per execution, CPU per request, RSS per process.
bench-workers: $(FULL_STAMP) bench-tools
	$(PY) bench/workers.py

# Batch scoring (bench/score.py, about 4 minutes): batchgate score (local repository, and through a
# server over gRPC) against a plain pyarrow -> ONNX Runtime -> pyarrow script; rows/s and peak RSS.
bench-score: $(FULL_STAMP)
	$(PY) bench/score.py

# Observability cost (bench/observability.py, about 5 minutes): the demo simple model with the access
# log off, at its default (sampled) and on for every request, over gRPC and HTTP; req/s and CPU ratios.
bench-observability: $(FULL_STAMP) bench-tools
	$(PY) bench/observability.py

# What a /metrics scrape costs (bench/scrape.py, about a minute): the page written directly against
# prometheus_client's generate_latest, 5, 50 and 200 models.
bench-scrape: $(FULL_STAMP)
	$(PY) bench/scrape.py

# Large answers beside small requests (bench/large_answers.py, about a minute): a prober's latency
# alone and while other clients ask for 300,000-element BYTES answers.
bench-large-answers: $(FULL_STAMP)
	$(PY) bench/large_answers.py

# Tracing cost (bench/tracing.py, about 5 minutes): tracing off, at its default ratio (0.001) and at
# 1.0, exporting to an OTLP sink, over gRPC and HTTP; req/s and CPU ratios, in-process costs.
bench-tracing: $(FULL_STAMP) bench-tools
	$(PY) bench/tracing.py

# Overload (bench/overload.py, about 5 minutes): default settings, the demo mlp at 3x its measured
# capacity (gRPC and HTTP open loop) and 5,000 connections (HTTP, gRPC); goodput, p99s, CANCELLED;
# then the same loads against nginx refusing everything (the floor under refusal latency), and
# the CPU of one refusal alone (a second server that refuses everything).
bench-overload: $(FULL_STAMP) bench-tools
	$(PY) bench/overload.py

# The two gRPC engines (bench/grpc_engines.py, about 5 minutes): CPU per answer, per refusal and per
# tiny call on grpcio and on batchgate's own h2 engine, interleaved rounds.
bench-grpc-engines: $(FULL_STAMP) bench-tools
	$(PY) bench/grpc_engines.py

# Routing (bench/routing.py, about 9 minutes): a route's overhead against the model directly, a
# remote and a local shadow's cost to the primary's p99 at half of capacity, two rollouts
# (promoted, rolled back) plotted to bench/results/routing.png.
bench-routing: $(FULL_STAMP) bench-tools
	$(PY) bench/routing.py

# Drift monitoring's cost (bench/drift.py, about 12 minutes; --quick about 1): mlp and tiny at off / 0.1 / 1.0,
# over HTTP (wrk) and through the data plane in process.
bench-drift: $(FULL_STAMP) bench-tools
	$(PY) bench/drift.py

# The soak test: 10^6 mixed requests, good and bad, over HTTP and gRPC against one server process
# (about 7 minutes on 2 cores; `$(PY) bench/soak.py --quick` for 20,000). Fails when the server's
# RSS grows 5% or more after the warm-up, its open fds grow, or any answer is a 5xx / INTERNAL.
soak: $(FULL_STAMP)
	$(PY) bench/soak.py

# Does a change regress serving speed? Two commits' benchmarks alternated (bench/compare.py):
#   make bench-compare BEFORE=HEAD~1 [AFTER=HEAD] [COMPARE_ARGS="--bench serving --rounds 7"]
.PHONY: bench-compare
AFTER ?= HEAD
bench-compare: $(FULL_STAMP) bench-tools
	$(if $(BEFORE),,$(error BEFORE=<rev> is required, e.g. make bench-compare BEFORE=HEAD~1))
	$(PY) bench/compare.py --before '$(BEFORE)' --after '$(AFTER)' $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info bench/results .cache
