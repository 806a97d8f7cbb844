#!/usr/bin/env bash
# manage.py backup for cron and systemd: works from any directory. Arguments pass through
# (--bundle, --no-prune); the last line printed is the backup's path.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    exec .venv/bin/python manage.py backup "$@"
fi
exec python3 manage.py backup "$@"
