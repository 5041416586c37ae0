# pi-agent: make check runs every test that needs no engine, and the lints
# (seconds: the loop before each commit); make test runs every test
# (integration tests need a Docker engine: sudo tests/setup-engine.sh
# prepares one); make bench runs the benchmarks.
PYTHON ?= python3
# Two workers when pytest-xdist is there: the tests mostly wait on the engine.
XDIST := $(shell $(PYTHON) -c 'import xdist' 2>/dev/null && echo "-n 2 --dist worksteal")

.PHONY: check test test-all integration lint setup test-image test-agents test-engines bench bench-quick \
	bench-engines clean-test-images chaos chaos-nested

check:
	$(PYTHON) -m pytest -q -m "not integration" tests/
	@if command -v shellcheck >/dev/null 2>&1; then $(MAKE) --no-print-directory lint; \
	else echo "shellcheck is not installed: lint skipped"; fi

test:
	$(PYTHON) -m pytest -q $(XDIST) -m "not hostile and not long" tests/

# make test, and the attacks' reproductions and the long tests (faults,
# soaks, the real Pi's install): what CI runs.
test-all:
	$(PYTHON) -m pytest -q $(XDIST) tests/

integration:
	$(PYTHON) -m pytest -q -m integration tests/

# Root only: the lifecycle's tests on the other engines CI runs (Docker 26
# with the containerd store, rootless Docker, rootless Podman), each brought
# up first (tests/engines/); NAMES=podman for one.
test-engines:
	sh tests/engines/run $(NAMES)

# Installs Claude Code, Codex, aider and opencode from the network, each in
# a new image line, and runs its --version through pi (minutes, and network).
test-agents:
	PI_AGENT_TEST_AGENTS=1 $(PYTHON) -m pytest -q $(XDIST) -m agents tests/test_agents.py

lint:
	shellcheck -s bash shell/pi.sh
	shellcheck -s sh install.sh tests/setup-engine.sh .ci/run tests/engines/run tests/engines/up tests/engines/*.sh

# Root only: engine, local base image, zsh/dash/shellcheck, the test user.
setup:
	sh tests/setup-engine.sh

# Root only: the soak of issue 28 (tests/chaos.py): N changing runs (300
# unless N=...) killed at random moments, the saver and docker clients
# killed, terminals closed, the engine restarted; then recovery and the
# checks (nothing lost, nothing left). make chaos restarts this machine's
# engine (it refuses while other containers run on it); make chaos-nested
# runs the soak in a container with an engine of its own. SEED=... repeats
# a soak's plan.
CHAOS_ARGS = $(if $(N),-n $(N)) $(if $(SEED),--seed $(SEED))

chaos:
	$(PYTHON) tests/chaos.py $(CHAOS_ARGS)

chaos-nested:
	$(PYTHON) tests/chaos.py --nested $(CHAOS_ARGS)

# Build the tests' base images ahead of time (the tests build them if absent).
test-image:
	$(PYTHON) tests/images.py

# Everything, the 1000-run soak included (about 30 minutes here);
# bench-quick: fewer repetitions, a 100-run soak.
bench:
	$(PYTHON) tests/bench.py

bench-quick:
	$(PYTHON) tests/bench.py --quick

# Root only: the prompt's row on each engine CI runs, against that engine's
# own floor (each brought up first; a rootless engine's bench runs as its user).
bench-engines:
	for engine in $(or $(NAMES),docker docker26 rootless-docker podman); do \
		sh tests/engines/up $$engine && \
		PI_AGENT_TEST_ENGINE=$$engine $(PYTHON) tests/bench.py --only prompt || exit 1; done

# The tests' images: the bases (pi-agent-test/base:*), any a test left, and
# the untagged ones an earlier Dockerfile's bases became.
clean-test-images:
	docker images --format '{{.Repository}}:{{.Tag}}' | grep '^pi-agent-test/' | xargs -r docker rmi -f
	docker image prune -f --filter label=pi-agent.repo=test
