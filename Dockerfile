# Herald's image: the `herald` command, with the schemas and config it reads at run time.
#
#   docker build -t herald:local .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 herald:local topics ensure
#
# docker-compose.yml beside this file builds it and runs the whole pipeline.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in a layer of their own that is rebuilt only when pyproject.toml changes:
# the core, the `grpc` extra (`herald run api` serves gRPC too) and the `otel` extra (spans
# when OTEL_EXPORTER_OTLP_ENDPOINT is set).
COPY pyproject.toml /tmp/herald/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/herald/pyproject.toml', 'rb'))['project']; o = p['optional-dependencies']; print('\n'.join(p['dependencies'] + o['grpc'] + o['otel']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself, installed (not editable) into site-packages; the source is not kept.
COPY pipeline/ /tmp/herald/pipeline/
COPY connectors/ /tmp/herald/connectors/
RUN pip install --no-deps /tmp/herald && rm -rf /tmp/herald

# What Herald reads and writes at run time. Its defaults are relative to the source checkout,
# which an installed package does not have, so the settings point into /app instead.
WORKDIR /app
COPY schemas/ /app/schemas/
COPY config/ /app/config/
ENV HERALD_SCHEMAS_DIR=/app/schemas \
    HERALD_RULES_FILE=/app/config/rules.toml \
    HERALD_TEMPLATES_DIR=/app/config/templates \
    HERALD_ROUTER_DATA_DIR=/app/.herald/router \
    HERALD_LEDGER_URL=sqlite:////app/.herald/ledger.db

# Run as an unprivileged user; only /app/.herald (router data, sink ledger) is writable.
RUN groupadd --system --gid 10001 herald \
 && useradd --system --uid 10001 --gid herald --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin herald \
 && mkdir -p /app/.herald/router \
 && chown -R herald:herald /app/.herald
USER 10001:10001

# /metrics, /healthz and /readyz of `herald run router|sink|all` (HERALD_OBSERVE_PORT; set
# HERALD_OBSERVE_HOST=0.0.0.0 to reach them from outside the container).
EXPOSE 9464

ENTRYPOINT ["herald"]
CMD ["--help"]
