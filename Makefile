# Herald: `make demo` and `make test` are all a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIB := .herald/kafka/lib
APICURIO := .herald/apicurio

.PHONY: demo test lint install kafka-jars registry-jars kafka-up kafka-down postgres proto compose-cli chaos bench clean

$(BIN)/herald: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/herald

# Apache Kafka (broker + console tools) and its classpath, from Maven Central.
$(KAFKA_LIB)/.stamp: kafka/pom.xml
	rm -rf $(KAFKA_LIB) && mkdir -p $(KAFKA_LIB)
	mvn --batch-mode --quiet -f kafka/pom.xml dependency:copy-dependencies \
	    -DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_LIB))
	touch $@

kafka-jars: $(KAFKA_LIB)/.stamp

# Apicurio Registry (a real schema registry; its Quarkus distribution, ~160 MB) from Maven
# Central. Runs with Java 21+: devtools/apicurio.py finds one (or HERALD_APICURIO_JAVA).
$(APICURIO)/.stamp: registry/pom.xml
	rm -rf $(APICURIO) && mkdir -p $(APICURIO)
	mvn --batch-mode --quiet -f registry/pom.xml dependency:unpack \
	    -Dapicurio.home=$(abspath $(APICURIO))
	touch $@

registry-jars: $(APICURIO)/.stamp

kafka-up: install kafka-jars
	$(BIN)/herald kafka up

kafka-down: install
	$(BIN)/herald kafka down

demo: install kafka-jars
	$(BIN)/herald demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pipeline connectors devtools bench tests
	$(BIN)/mypy

# The gRPC API's Python code in pipeline/proto, from proto/ (committed; tests/unit/test_proto.py
# fails when it is stale).
proto: install
	$(BIN)/python -m devtools.gen_proto

# PostgreSQL server binaries for the ledger tests, which start a throwaway server of their own
# (or use HERALD_TEST_POSTGRES_URL). Installs Debian's package when missing (as root).
postgres:
	bash scripts/ensure-postgres.sh

# The Docker Compose CLI, built from its Go module, for `docker compose config` in
# tests/test_compose.py on machines without Docker. Several minutes on two cores the first
# time (the Go module cache makes later builds quick).
COMPOSE_VERSION ?= v5.6.0
compose-cli: .herald/bin/docker-compose
.herald/bin/docker-compose:
	rm -rf .herald/compose-build && mkdir -p .herald/compose-build .herald/bin
	cd .herald/compose-build && go mod init herald-compose-cli \
	    && go get github.com/docker/compose/v5/cmd@$(COMPOSE_VERSION) \
	    && go build -o $(abspath .herald/bin/docker-compose) github.com/docker/compose/v5/cmd
	rm -rf .herald/compose-build

# The test session starts its own broker (or uses KAFKA_BOOTSTRAP_SERVERS), SMTP servers and
# an Apicurio Registry; the compose files are checked with the Compose CLI built above.
test: install kafka-jars registry-jars postgres compose-cli lint
	$(BIN)/pytest

# Fault injection (not part of `make test`; a short version of it is):
#   make chaos EVENTS=100000          single broker, killed and restarted once
#   make chaos CLUSTER=3              3-broker cluster, one broker killed mid-run
EVENTS ?= 100000
CLUSTER ?= 1
chaos: install kafka-jars
	$(BIN)/python -m bench.chaos --events $(EVENTS) --cluster $(CLUSTER)

# Throughput, latency, memory and scaling on a local broker, nginx and smtp-sink; prints a
# table and one RESULT line (bench/README.md). About 10-12 minutes; installs nginx, wrk, postfix
# (for smtp-sink, no MTA left running) and py-spy when missing.
#   make bench                                  the full run
#   make bench BENCH_QUICK=1                    small sizes, a few minutes
#   make bench BENCH_EVENTS=20000 BENCH_BACKLOG=200000
# BENCH_EVENTS: records per row (default 50000, quick 5000); BENCH_BACKLOG: the memory row's
# large backlog (default 1000000, quick 50000); BENCH_ARGS: more options (--help).
BENCH_EVENTS ?=
BENCH_BACKLOG ?=
BENCH_QUICK ?=
BENCH_ARGS ?=
bench: install kafka-jars
	bash scripts/ensure-bench-tools.sh
	$(BIN)/python -m bench.bench $(if $(BENCH_QUICK),--quick) \
	    $(if $(BENCH_EVENTS),--events $(BENCH_EVENTS)) \
	    $(if $(BENCH_BACKLOG),--backlog $(BENCH_BACKLOG)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .herald *.egg-info .pytest_cache .mypy_cache .ruff_cache
