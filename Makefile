# The two commands: `make run` (the whole stack locally) and `make test` (every check).
# Both create or refresh .venv from the hash-pinned requirements first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := libs/svckit services/auth services/wallet services/notifier
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest
SERVICE_TESTS := $(wildcard services/*/tests)

.PHONY: run test venv lint check-k8s test-fuzz fuzz test-chaos test-unit test-auth test-wallet test-notifier test-e2e test-postgres check-compose check-alerts test-compose test-k8s clean bench bench-scale bench-partitioning bench-replica

$(STAMP): requirements/bootstrap.txt requirements/base.txt requirements/dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/bootstrap.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --require-hashes -r requirements/base.txt -r requirements/dev.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation $(foreach p,$(PACKAGES),-e $(p))
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python deploy/local/stack.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/bandit -q -c pyproject.toml -r libs/svckit/src services/auth/src services/wallet/src services/notifier/src deploy/local

check-compose: $(STAMP)
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# docker-compose.yml for real: base images built here from Debian's packages where the
# official ones cannot be pulled (deploy/images/), the services' images from their
# Dockerfiles, `up` until healthy, tests/e2e through its gateway, wallet and Postgres
# restarts with `wallet-audit`, then `down -v`. Skips with the reason where no engine runs.
test-compose: $(STAMP)
	$(BIN)/python tests/compose/run.py

# deploy/k8s for real, with no cluster: the kustomize base rendered in Python, the services'
# images built, a Postgres stand-in and generated Secrets, every pod run by a minimal
# kubelet on Docker (securityContext, volumes, env, probes as the kubelet does), a smoke
# through the gateway pod, the CronJob once. Skips with the reason where no engine runs.
test-k8s: $(STAMP)
	$(BIN)/python tests/k8s/run.py

# Kubernetes manifests: the API schemas shipped in kubernetes-validate (offline), then
# checkov's policies on the base as kustomize renders it (tests/k8s/kube.py; the checks it
# skips are explained in deploy/checkov.yaml). checkov lives in a venv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov
$(CHECKOV): requirements/checkov.txt | $(STAMP)
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(BIN)/uv pip install --quiet --python $(CHECKOV_VENV)/bin/python --require-hashes -r requirements/checkov.txt
	@touch $@

check-k8s: $(STAMP) $(CHECKOV)
	$(BIN)/kubernetes-validate --strict --quiet $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))
	$(BIN)/python tests/k8s/kube.py deploy/k8s var/k8s/rendered/manifests.yaml
	$(BIN)/kubernetes-validate --strict --quiet var/k8s/rendered/manifests.yaml
	$(CHECKOV) --config-file deploy/checkov.yaml -d var/k8s/rendered

# Alert rules: syntax (promtool check) and behaviour (promtool test), with Debian's
# prometheus package installed when promtool is missing.
check-alerts:
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)
	promtool check rules deploy/alerts/rules.yml
	promtool test rules deploy/alerts/tests.yml

test-auth: $(STAMP)
	env -u TEST_DATABASE_URL $(PYTEST) services/auth/tests

test-wallet: $(STAMP)
	env -u TEST_DATABASE_URL $(PYTEST) services/wallet/tests

test-notifier: $(STAMP)
	env -u TEST_DATABASE_URL $(PYTEST) services/notifier/tests

# The inner loop: every service's tests plus the repository checks, no stack. Always on
# SQLite (TEST_DATABASE_URL is for the Postgres pass below).
test-unit: $(STAMP)
	env -u TEST_DATABASE_URL $(PYTEST) libs/svckit/tests $(SERVICE_TESTS) tests/repo

test-e2e: $(STAMP)
	$(PYTEST) tests/e2e

# The service tests again on Postgres: TEST_DATABASE_URL, else a testcontainers Postgres
# when a Docker engine answers, else skipped with the reason.
test-postgres: $(STAMP)
	$(BIN)/python tests/tools/with_postgres.py $(PYTEST) libs/svckit/tests/test_outbox.py libs/svckit/tests/test_retention.py libs/svckit/tests/test_db.py libs/svckit/tests/test_db_sessions.py libs/svckit/tests/test_aiodb.py $(SERVICE_TESTS)

# Fuzzing the public API through the gateway: a bounded pass here, a long one in `make fuzz`.
test-fuzz: $(STAMP)
	$(PYTEST) -s tests/fuzz

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-500} $(PYTEST) -s tests/fuzz

# Faults under load: replicas, Redis, the notifier, the auth service and (with
# TEST_DATABASE_URL) Postgres connections, each ending with exactly-once checks. One stack
# with two wallet replicas for all: on Postgres with TEST_DATABASE_URL, else SQLite.
test-chaos: $(STAMP)
	$(PYTEST) tests/chaos

test: lint check-compose check-k8s check-alerts test-unit test-e2e test-chaos test-fuzz test-postgres test-compose test-k8s

# Benchmarks print figures; they are never pass/fail tests. Needs the local Postgres, and
# wrk (installed from Debian's packages when missing).
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/bench.py

# Scaling curves: transfers at 8..512 connections with 1, 2 and 4 wallet replicas, the
# bottleneck per configuration, and reads up to 10^7 entries (about 15 minutes; figures only).
bench-scale: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/scale.py

# Reads on a streaming replica (a primary and a replica of its own, apart from the local
# Postgres; needs Debian's postgresql-15 binaries and root for runuser; figures only).
bench-replica: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/replica.py

# The time-partitioning trial of deploy/SCALING.md (the local Postgres; figures only).
bench-partitioning: $(STAMP)
	$(BIN)/python bench/partitioning.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .ruff_cache
