#!/usr/bin/env bash
# manage.py restore from any directory: scripts/restore.sh SOURCE [--yes] [--no-safety-backup].
# SOURCE is a backup directory, a bundle .tar.gz or a backup's name; a relative path is taken
# from the directory you ran this in, not the repository's.
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
    case "$arg" in
        -* | /*) args+=("$arg") ;;
        *) if [ -e "$caller/$arg" ]; then args+=("$caller/$arg"); else args+=("$arg"); fi ;;
    esac
done
if [ -x .venv/bin/python ]; then
    exec .venv/bin/python manage.py restore "${args[@]}"
fi
exec python3 manage.py restore "${args[@]}"
