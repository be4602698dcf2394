# funnel-tracer image: the canary by default; `sandbox`, `check`, `demo` via the command.
#   docker build -t funnel-tracer .
#   docker run --rm -p 9464:9464 -e OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 \
#     -v "$PWD/my-funnel.yaml:/app/examples/compose.yaml:ro" funnel-tracer
FROM python:3.12-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The build context is filtered by .dockerignore (no .venv, .git, caches, test artifacts).
COPY . /app
RUN pip install --no-cache-dir . \
    && rm -rf /app/build /app/*.egg-info

# Unprivileged runtime user; the app files stay root-owned and read-only to it.
RUN groupadd --system --gid 10001 funnel \
    && useradd --system --uid 10001 --gid funnel --create-home --home-dir /home/funnel \
       --shell /usr/sbin/nologin funnel
USER funnel:funnel

# The canary's /healthz and /metrics (--http-port, default 9464).
EXPOSE 9464

# No curl in slim images: probe /healthz with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["funnel-tracer"]
CMD ["canary", "-c", "/app/examples/compose.yaml"]
