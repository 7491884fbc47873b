#!/bin/sh
# Pass the init gate once, then become the server.
#
#   deploy/prestart.sh gunicorn -c deploy/gunicorn.conf.py app.main:app
#   deploy/prestart.sh uvicorn app.main:app --host 0.0.0.0 --workers 4
#
# `initgate run` reads the same environment as the app (DATABASE_URL,
# INITGATE_*; INITGATE_APP names the app's InitGate, default app.main:gate).
# If init fails, this exits with its code (see the README) and the server
# never starts. The server's workers still pass the gate themselves, now
# warm: one query each, no lock.
#
# INITGATE_COMMAND overrides how initgate is started (default: initgate).
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 SERVER-COMMAND [ARGUMENTS...]" >&2
    exit 2
fi

# Unquoted on purpose: INITGATE_COMMAND may be several words.
# shellcheck disable=SC2086
${INITGATE_COMMAND:-initgate} run

exec "$@"
