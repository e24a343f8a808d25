"""Fixtures the fleet tests share: a real PostgreSQL next to SQLite (tests/fixtures/postgres.py).

    postgres_server  session   one server for the session
    postgres_url     function  a fresh database on it
    store_location   function  parametrized ["sqlite", "postgresql"]: where a FleetStore opens
"""

from tests.fixtures.postgres import postgres_server, postgres_url, store_location  # noqa: F401
