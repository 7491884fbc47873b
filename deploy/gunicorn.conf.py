"""gunicorn settings for an app behind initgate, with uvicorn workers.

    gunicorn -c deploy/gunicorn.conf.py app.main:app

Every worker runs the app's lifespan, so every worker passes the gate; one
of them runs init and the others wait for it, as under uvicorn --workers.
"""

from __future__ import annotations

import os

worker_class = "uvicorn_worker.UvicornWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
bind = [os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")]

# The master only forks: the app (and with it the gate's settings) is
# imported in each worker, after the fork.
preload_app = False

# gunicorn kills a worker that stops checking in for `timeout` seconds, and a
# uvicorn worker checks in from its event loop, which starts only after the
# lifespan (and so the gate) is done. In gunicorn 27 that clock starts at a
# worker's first check-in: a worker that sat 10 s at the gate under
# --timeout 4 was not killed. Older gunicorn versions may count from the
# fork; there, raise this above INITGATE_CONNECT_TIMEOUT +
# INITGATE_WAIT_TIMEOUT, or run `initgate run` first (deploy/prestart.sh).
timeout = 30

# A worker whose gate fails exits with gunicorn's "failed to boot" status,
# and the master then stops with exit code 3: the deploy fails visibly.
# (uvicorn --workers N exits 0 in that case; see the README.)
