"""The session's PostgreSQL server (tests/unit's fixture), for the simulation's run on it."""

from tests.unit.conftest import postgres  # noqa: F401
