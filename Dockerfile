# The demo service: one container runs uvicorn with 4 worker processes, and
# docker-compose.yml starts 3 of them, so 12 workers race through the gate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv

# .dockerignore keeps the build context to what the service needs.
COPY . .
RUN pip install . \
    && useradd --system --no-create-home initgate
USER initgate

EXPOSE 8000

# Exec form, so uvicorn is PID 1 and gets the SIGTERM of `docker stop`
# itself: it then shuts its workers down cleanly, each through its lifespan.
# The working directory holds alembic.ini and migrations/, which the gate
# reads from there (INITGATE_ALEMBIC_CONFIG defaults to ./alembic.ini).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
