# Herald's image: the `herald` command with every channel's connector; the schemas, default
# rules and templates are inside the package (pipeline/_data).
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
# the core, every channel's extra, the `grpc` extra (`herald run api` serves gRPC too) and the
# `otel` extra (spans when OTEL_EXPORTER_OTLP_ENDPOINT is set).
COPY pyproject.toml /tmp/herald/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/herald/pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + [r for e in ('sms', 'fcm', 'apns', 'webpush', 'grpc', 'otel') for r in x[e]]))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself, installed (not editable) into site-packages with the channel extras;
# the source is not kept. setup.py copies schemas/ and config/ into the package.
COPY setup.py MANIFEST.in README.md /tmp/herald/
COPY pipeline/ /tmp/herald/pipeline/
COPY connectors/ /tmp/herald/connectors/
COPY schemas/ /tmp/herald/schemas/
COPY config/ /tmp/herald/config/
RUN pip install '/tmp/herald[channels]' && rm -rf /tmp/herald

# Herald keeps local state (router data, a SQLite ledger) in .herald/ of the working
# directory. Rules, templates and schemas of your own: `herald init /app/config`, mount
# the directory, and set HERALD_RULES_FILE, HERALD_TEMPLATES_DIR and HERALD_SCHEMAS_DIR.
WORKDIR /app

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
