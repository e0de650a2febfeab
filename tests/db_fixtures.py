"""Job-store fixtures shared by the job-store tests: every test runs on SQLite (a temporary file) and on
PostgreSQL (``FLUXSERVE_TEST_PG``, in a schema of its own for this test session, dropped afterwards).
PostgreSQL being unreachable is a test failure, never a skip.

Use them from a test module with ``pytest_plugins = ["db_fixtures"]``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from fluxserve.jobs.store import JobStore, normalize_db_url

PG_URL = os.environ.get("FLUXSERVE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = ("webhook_events", "webhook_keys", "webhook_deliveries", "job_logs", "files", "secrets", "api_keys",
          "jobs", "job_usage", "upstream_calls")


@contextmanager
def fresh_schema(url: str, prefix: str = "fluxserve_test") -> Iterator[str]:
    """``url`` with its search_path set to a new schema, dropped afterwards."""
    base = make_url(normalize_db_url(url))
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema for this session."""
    with fresh_schema(PG_URL) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = request.getfixturevalue("pg_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        existing = set(inspect(conn).get_table_names())
        names = ", ".join(t for t in TABLES if t in existing)
        if names:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def store(db_url):
    store = JobStore(db_url)
    yield store
    store.close()
