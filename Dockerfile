# The API image: migrate, then serve. Configuration comes from the environment
# (DATABASE_URL, APP_*, ITP_*), never from the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/app
RUN groupadd --system app && useradd --system --gid app --home-dir /srv/app app

COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install .
COPY alembic.ini ./
COPY migrations ./migrations

RUN mkdir -p /srv/app/data && chown app:app /srv/app/data
USER app

ENV DATABASE_URL=sqlite:///data/itp-trial.db \
    WEB_CONCURRENCY=2 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/itp-metrics
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
# Migrate; `python -m app check` then says in one line why the server cannot start (bad
# setting, no token key, database) and exits 2 (it runs without the metrics directory, which
# is then emptied for the workers: a scrape must see only theirs). `python -m app serve`
# starts WEB_CONCURRENCY uvicorn workers, each with a listening socket of its own, so
# connections spread over them (README "Production start"). Logs: JSON lines, uvicorn's
# access log off (it would log raw paths and query strings, which carry ids).
CMD ["sh", "-c", "alembic upgrade head && env -u PROMETHEUS_MULTIPROC_DIR python -m app check && rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec python -m app serve --host 0.0.0.0 --port 8000 --log-config app/logging.json"]
