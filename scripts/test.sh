#!/usr/bin/env bash
# The whole test suite: lint, then every test on PostgreSQL, then the engine-level tests again on
# SQLite. Creates .venv and installs the pinned requirements when needed; needs a PostgreSQL
# server (TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/trusca) and, for the
# Celery integration tests, Redis (TEST_REDIS_URL, default redis://127.0.0.1:6379/0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt

export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/trusca}"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"

.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "== PostgreSQL and Redis: the whole suite"
DATABASE_URL="$TEST_DATABASE_URL" CELERY_BROKER_URL="$TEST_REDIS_URL" TRUSCA_TEST_ENGINE=postgresql \
    .venv/bin/pytest "$@"
echo "== SQLite: everything but the browser and worker integration tests"
DATABASE_URL="sqlite:///$PWD/var/trusca-test.sqlite3" TRUSCA_TEST_ENGINE=sqlite \
    .venv/bin/pytest -m "not integration and not e2e" "$@"
