"""The service's init gate, one per process, shared by the seed steps and the app."""

from __future__ import annotations

from initgate import InitGate

__all__ = ["gate"]

# Read from the environment at import (INITGATE_*, or DATABASE_URL), so that a
# worker with a bad setting fails at once, naming the variable, before it
# starts serving.
gate = InitGate.from_env()
