#!/usr/bin/env bash
# Start the TRUSCA portal on one machine with no database or broker server: the web admin
# (gunicorn, static files served by whitenoise), a Celery worker and Celery beat, on the embedded
# defaults (SQLite and a filesystem broker under var/). Creates .venv and installs the pinned
# requirements when needed, migrates, and on first start creates the admin login and demo data.
#
# Environment: PORT (default 8000) or BIND (default 127.0.0.1:$PORT) for the web server,
# WEB_CONCURRENCY (default 2) gunicorn processes, plus every setting README.md lists.
# The three processes run as one unit: Ctrl-C or SIGTERM stops them all, and when one of them
# dies the others are stopped and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8000}"
BIND="${BIND:-127.0.0.1:${PORT}}"
PY=.venv/bin/python

say() { printf '==> %s\n' "$*"; }

# Whether something accepts connections on BIND's host and port (gunicorn's unix: and fd:
# binds are not checked).
TCP_BIND=yes
case "$BIND" in
    unix:* | fd:*) TCP_BIND=no ;;
esac
port_answers() {
    local host port
    port="${BIND##*:}"
    host="${BIND%:*}"
    host="${host#[}"
    host="${host%]}"
    case "$host" in
        0.0.0.0 | :: | "") host=127.0.0.1 ;;
    esac
    (exec 3<>"/dev/tcp/${host}/${port}") 2>/dev/null
}
if [ "$TCP_BIND" = yes ] && port_answers; then
    echo "run.sh: something already listens on ${BIND}. Stop it, or choose another port:" >&2
    echo "    PORT=8001 $0" >&2
    exit 1
fi

if [ ! -x "$PY" ]; then
    say "Creating the virtualenv in .venv"
    python3 -m venv .venv
fi
say "Installing the pinned requirements (requirements.txt)"
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt

say "Checking the configuration and migrating the database"
"$PY" manage.py check --fail-level ERROR >/dev/null
"$PY" manage.py migrate --noinput
"$PY" manage.py collectstatic --noinput >/dev/null

# First start: an admin login with a random password kept in VAR_DIR/admin-password (mode 600),
# and the broker's folders. The password is generated and written inside Python, so it never
# passes through a command line or the environment. Prints the sign-in lines for the banner.
SIGN_IN="$("$PY" manage.py shell --no-imports -c '
import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model

options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
    if key in options:
        os.makedirs(options[key], exist_ok=True)

User = get_user_model()
password_file = settings.VAR_DIR / "admin-password"
if not User.objects.filter(username="admin").exists():
    password = secrets.token_urlsafe(18)
    settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
    password_file.unlink(missing_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    User.objects.create_superuser("admin", email="", password=password)
    print("created")
    print(password_file)
    print(password)
elif password_file.exists():
    print("existing")
    print(password_file)
else:
    print("custom")
')"
{
    read -r ADMIN_STATE
    read -r ADMIN_PASSWORD_FILE || true
    read -r ADMIN_PASSWORD || true
} <<<"$SIGN_IN"

# Demo data only on the very first start (the one that created the admin login), never into a
# database that already had users: a real installation pointed at this script stays clean.
if [ "$ADMIN_STATE" = created ]; then
    "$PY" manage.py seed_demo --if-empty
fi

case "$BIND" in
    0.0.0.0:* | \[::\]:*) URL="http://127.0.0.1:${BIND##*:}/admin/" ;;
    unix:*) URL="(gunicorn listens on ${BIND})" ;;
    *) URL="http://${BIND}/admin/" ;;
esac

banner() {
    echo
    echo "================================================================================"
    echo " TRUSCA is running: web admin at ${URL}"
    case "$ADMIN_STATE" in
        created)
            echo " An admin login was created for this first start:"
            echo "   user:      admin"
            echo "   password:  ${ADMIN_PASSWORD}"
            echo "   (kept in ${ADMIN_PASSWORD_FILE}, readable by you only)"
            ;;
        existing)
            echo " Sign in as user admin with the password kept in ${ADMIN_PASSWORD_FILE}"
            echo "   (show it with: cat ${ADMIN_PASSWORD_FILE})"
            ;;
        *)
            echo " Sign in with your admin account (reset its password with:"
            echo "   .venv/bin/python manage.py changepassword admin)"
            ;;
    esac
    echo " Press Ctrl-C to stop the web server, the worker and beat together."
    echo "================================================================================"
    echo
}

pids=()
names=()
start() {
    local name="$1"
    shift
    "$@" &
    pids+=("$!")
    names+=("$name")
}

stopping=0
stop_all() {
    stopping=1
    # A second Ctrl-C while the others shut down (a worker finishing a backup) kills them at once.
    trap 'kill -KILL "${pids[@]}" 2>/dev/null || true' INT TERM
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
# Piped through grep or tail, Ctrl-C ends the reader too: writing "Stopping" to the closed pipe
# must not kill this script before it has stopped its children, so SIGPIPE is ignored, the
# children are stopped first, and whatever way the script ends, they end with it.
trap '' PIPE
trap 'stop_all; say "Stopped" 2>/dev/null; exit 130' INT
trap 'stop_all; say "Stopped" 2>/dev/null; exit 143' TERM
trap '[ "$stopping" -eq 1 ] || stop_all' EXIT

start web .venv/bin/gunicorn trusca.wsgi:application \
    --bind "$BIND" \
    --workers "${WEB_CONCURRENCY:-2}" \
    --worker-class gthread --threads 4 \
    --access-logfile - \
    --error-logfile - \
    --no-control-socket
start worker .venv/bin/celery -A trusca worker -Q backups,default --concurrency 1 --loglevel INFO
start beat .venv/bin/celery -A trusca beat --loglevel INFO

# The sign-in banner comes once the web server answers and the worker replies, below the
# start-up logs of all three, where it is seen.
all_alive() {
    local pid
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || return 1
    done
}
for _ in $(seq 120); do
    [ "$TCP_BIND" = yes ] || break
    port_answers && break
    all_alive || break
    sleep 0.5
done
for _ in $(seq 30); do
    all_alive || break
    .venv/bin/celery -A trusca inspect ping --timeout 1 >/dev/null 2>&1 && break
done
if all_alive; then
    banner
fi
ADMIN_PASSWORD=""
SIGN_IN=""

# wait -n returns when any one of them exits; the traps above handle Ctrl-C and SIGTERM.
status=0
wait -n || status=$?
if [ "$stopping" -eq 0 ]; then
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "run.sh: the ${names[$i]} process exited (status ${status}); stopping the others" >&2
        fi
    done
    stop_all
    exit $((status == 0 ? 1 : status))
fi
