"""The durable job store: requests, status, progress, logs, results, leases, API keys and webhook deliveries.

One class, ``JobStore``, over SQLAlchemy Core; the same SQL on SQLite (embedded; WAL, busy timeout, writes in
``BEGIN IMMEDIATE`` transactions) and PostgreSQL (``SELECT ... FOR UPDATE SKIP LOCKED``). Workers claim jobs
with a lease and keep it alive with heartbeats; a job whose worker stopped heartbeating is claimed again, up to
``max_attempts`` times. State changes made through one ``JobStore`` wake its waiters at once; changes made by
other processes are seen by polling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    Text,
    and_,
    case,
    cast,
    create_engine,
    event,
    func,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from fluxserve import jsonsafe
from fluxserve.config import masked_url
from fluxserve.jobs import fairness, file_quota, ledger, outbox, quotas
from fluxserve.jobs.models import (
    ADDED_COLUMNS,
    PRIORITY_RANKS,
    UTCDateTime,
    api_keys,
    files,
    job_logs,
    jobs,
    metadata,
    upstream_calls,
    webhook_deliveries,
    webhook_events,
    webhook_keys,
)
from fluxserve.jobs.models import secrets as secrets_table

log = logging.getLogger(__name__)

JOB_KINDS = ("generate", "train", "upstream")
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
TERMINAL = frozenset(("completed", "failed", "cancelled"))
ACTIVE = ("queued", "running")

TIMEOUT_ERROR = "Request timed out"
TIMEOUT_ERROR_TYPE = "request_timeout"
CANCELLED_ERROR = "Request was cancelled"
CANCELLED_ERROR_TYPE = "cancelled"
BLOCKED_ERROR_TYPE = "content_policy_violation"  # fal's name for content a checker refused
# failures the caller caused (refused input): fal's request history counts them, and cancellations, as user_error
USER_ERROR_TYPES = ("validation_error", "input_error", "invalid_input")
# what requests still in flight sort by in the request history: they end last and take longest
NOT_ENDED = datetime(9999, 12, 31, tzinfo=UTC)
NOT_ENDED_DURATION = 1e18
CALLER_GONE_ERROR = "Request was cancelled: the server holding the caller's connection stopped"

# A running job whose worker lives in the server process that holds its synchronous caller's connection (worker
# ids there are "<process id>/<n>"): when its lease expires that process is gone, and so is the caller.
_CALLER_GONE_SQL = ("(caller IS NOT NULL AND worker_id IS NOT NULL AND "
                    "substr(worker_id, 1, length(caller) + 1) = caller || '/')")

# how often a store looks for expired queued jobs and dead workers' jobs (seconds)
SWEEP_INTERVAL = 0.5
# how long an API key's last_used_at may lag (seconds): avoids a write on every request
KEY_USE_RESOLUTION = 60.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def db_time(value: datetime | None, postgres: bool) -> Any:
    """A timestamp as the raw driver wants it: naive UTC for PostgreSQL, SQLAlchemy's text format for SQLite."""
    if value is None:
        return None
    value = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value
    return value if postgres else value.strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass
class LogLine:
    seq: int
    timestamp: datetime
    level: str
    message: str
    preview_key: str | None = None


@dataclass
class Job:
    id: str
    endpoint: str
    dialect: str
    status: str
    priority: str = "normal"
    request: dict = field(default_factory=dict)
    input: dict | None = None
    result: dict | None = None
    error: str | None = None
    error_type: str | None = None
    error_detail: dict | None = None
    step: int | None = None
    total_steps: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    worker_id: str | None = None
    attempts: int = 0
    lease_s: float | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    timeout_at: datetime | None = None
    store_io: bool = True
    webhook: dict | None = None
    model: str = ""
    owner: str | None = None  # the submitting API key's id; None when the API ran without keys
    caller: str | None = None  # the server process holding a synchronous caller's connection
    first_progress_at: datetime | None = None  # when the worker reported the first progress event
    kind: str = "generate"  # "generate" | "train" | "upstream" (a request the gateway sends to a provider)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: Any) -> Job:
        """A job as every reader sees it: text an older server stored that no answer can hold (an unpaired
        surrogate, U+0000, NaN) is made safe here (``jsonsafe.scrub``), once for all readers."""
        data = {f.name: getattr(row, f.name) for f in fields(cls) if f.name != "priority_rank"}
        for name in _JSON_FIELDS:
            data[name] = jsonsafe.scrub(data[name])
        data["error"] = jsonsafe.storable(data["error"])
        data["request"] = data["request"] or {}
        data["cancel_requested"] = bool(data["cancel_requested"])
        data["store_io"] = bool(data["store_io"])
        return cls(**data)


_JSON_FIELDS = ("request", "input", "result", "error_detail", "webhook")


@dataclass
class JobStatus:
    """What a status answer needs, read in one query without the request/input/result bodies
    (``JobStore.status``). ``queue_position`` is set only for queued jobs (0 = next)."""

    id: str
    endpoint: str
    dialect: str
    status: str
    error: str | None
    error_type: str | None
    step: int | None
    total_steps: int | None
    started_at: datetime | None
    completed_at: datetime | None
    inference: float | None  # the result's ``timings.inference``
    queue_position: int | None
    owner: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


# One read: the status fields, the result's inference time and (for a queued job) its queue position, where it
# stands in the API keys' turns (``fairness.POSITION``). Plain SQL run on the DBAPI connection: SQLAlchemy's
# execution path costs ~20x the query itself on SQLite. ``j`` has a LIMIT and the outer query a WHERE so that
# neither database merges ``j`` into it: ``ahead`` (a count) is then computed once, not at each use.
_STATUS_SQL = """
WITH j AS (
    SELECT t.id, t.endpoint, t.dialect, t.status, t.error, t.error_type, t.step, t.total_steps, t.started_at,
           t.completed_at, {inference} AS inference, t.timeout_at, t.lease_expires_at, t.attempts,
           t.cancel_requested, t.owner, t.priority_rank, """ + fairness.AHEAD + """ AS ahead
    FROM jobs t WHERE t.id = {param} LIMIT 1
)
SELECT j.id, j.endpoint, j.dialect, j.status, j.error, j.error_type, j.step, j.total_steps, j.started_at,
       j.completed_at, j.inference, j.timeout_at, j.lease_expires_at, j.attempts, j.cancel_requested,
       """ + fairness.POSITION + """, j.owner
FROM j WHERE j.id IS NOT NULL
"""
_STATUS_SQL_SQLITE = _STATUS_SQL.format(inference="json_extract(t.result, '$.timings.inference')", param="?")
# PostgreSQL's JSON operators fail on a whole value holding \u0000 or an unpaired surrogate escape (rows an
# older server stored): such a value is not taken apart (its inference time reads as unknown)
_PG_UNSAFE_JSON = (r"(strpos({0}::text, '\u0000') > 0 OR {0}::text ~* "
                   r"'\\ud[89ab][0-9a-f]{{2}}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{{2}})\\ud[c-f]')")
_STATUS_SQL_POSTGRES = _STATUS_SQL.format(
    inference=f"CASE WHEN NOT {_PG_UNSAFE_JSON.format('t.result')} THEN t.result #>> '{{timings,inference}}' END",
    param="%s")


def _caller_gone(job: Any) -> bool:
    """``_CALLER_GONE_SQL`` for one job (with ``caller`` and ``worker_id``)."""
    return bool(job.caller and job.worker_id and job.worker_id.startswith(job.caller + "/"))


def _as_utc(value: Any) -> datetime | None:
    """A raw DBAPI time value (SQLite: ISO text; PostgreSQL: naive datetime) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_JOB_COLUMNS = tuple(column.name for column in jobs.c)
_JOB_COLUMNS_SQL = ", ".join(f'"{name}"' for name in _JOB_COLUMNS)
_JSON_COLUMNS = tuple(column.name for column in jobs.c if isinstance(column.type, JSON))
_TIME_COLUMNS = tuple(column.name for column in jobs.c if isinstance(column.type, UTCDateTime))
_INSERT_LINE_SQL = 'INSERT INTO job_logs (job_id, "timestamp", level, message, preview_key) VALUES (?, ?, ?, ?, ?)'


def _is_integrity_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "IntegrityError" for cls in type(exc).__mro__)


class _Raw:
    """A DBAPI connection inside one transaction, with the SQL written once with ``?`` placeholders and
    values in the form SQLAlchemy stores them (SQLite: times as text, JSON as text; PostgreSQL: native)."""

    def __init__(self, conn: Any, postgres: bool):
        self.conn, self.postgres = conn, postgres

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql.replace("?", "%s") if self.postgres else sql, params)
        return cursor

    def executemany(self, sql: str, rows: list) -> None:
        cursor = self.conn.cursor()
        cursor.executemany(sql.replace("?", "%s") if self.postgres else sql, rows)

    def time(self, value: datetime | None) -> Any:
        return db_time(value, self.postgres)

    def json(self, value: Any) -> Any:
        if value is None:
            return None
        if self.postgres:
            from psycopg.types.json import Json

            return Json(value)
        return json.dumps(value)

    def job(self, row: Any) -> Job:
        data = dict(zip(_JOB_COLUMNS, row))
        for name in _TIME_COLUMNS:
            data[name] = _as_utc(data[name])
        if not self.postgres:  # psycopg decodes JSON itself
            for name in _JSON_COLUMNS:
                if isinstance(data[name], str):
                    data[name] = json.loads(data[name])
        return Job.from_row(SimpleNamespace(**data))


def _as_float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class ApiKey:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    admin: bool = False
    limits: quotas.Limits = field(default_factory=quotas.Limits)
    released_at: datetime | None = None  # revoked, then released by ``fluxserve keys keyless``

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def from_row(cls, r: Any) -> ApiKey:
        return cls(r.id, r.name, r.created_at, r.revoked_at, r.last_used_at, bool(r.admin),
                   quotas.Limits(r.max_concurrent, r.rpm, r.mp_per_day), r.released_at)


@dataclass(frozen=True)
class KeyCounts:
    """How many API keys were ever created, revoked and released (``JobStore.key_counts``). Every change to
    the keys that matters to authentication changes one of the three, so API processes compare them to notice
    a change made by any process."""

    created: int = 0
    revoked: int = 0
    released: int = 0

    @property
    def keyed(self) -> bool:
        """A key exists that the operator has not released: revoking every key leaves a server keyed."""
        return self.created > self.released

    @property
    def active(self) -> int:
        return self.created - self.revoked


class QueueFull(Exception):
    """A submit over a queue-depth limit (``JobStore.max_queued`` or ``max_queued_per_owner``)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class QuotaExceeded(QueueFull):
    """A submit over a limit of its API key (``fluxserve.jobs.quotas``); ``limit`` names it."""

    def __init__(self, message: str, retry_after_s: int, limit: str):
        super().__init__(message, retry_after_s)
        self.limit = limit


# how long a client refused by a full queue is asked to wait before trying again (seconds)
QUEUE_FULL_RETRY_AFTER_S = 10


@dataclass
class Delivery:
    id: int
    job_id: str
    dialect: str
    url: str | None
    body: Any
    attempts: int
    owner: str | None = None  # the API key of the job (None: a server without keys)


@dataclass
class EventDelivery:
    """A pending per-event webhook (Replicate's ``start``, ``logs``, ``output``); its body is built when it is
    queued, or (``None``: a ``logs`` event the store queued as the job logged) when it is first delivered."""
    id: int
    job_id: str
    dialect: str
    event: str
    url: str
    body: Any
    attempts: int
    owner: str | None = None  # the API key of the job (None: a server without keys)


def normalize_db_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3; everything else is passed through."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def create_db_engine(url: str) -> Engine:
    url = normalize_db_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    database = parsed.database or ""
    memory = database in ("", ":memory:") or "mode=memory" in str(parsed.query)
    if not memory:
        from pathlib import Path

        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # writers take the write lock up front, so two writers never deadlock upgrading a read lock
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class JobStore:
    """The job store. Thread-safe; one per process is enough (workers and the API share it)."""

    def __init__(self, url: str, *, max_attempts: int = 3, poll_s: float = 0.1):
        self.url = normalize_db_url(url)
        self.engine = create_db_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_engine = (
            self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        )
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        # endpoint -> the kind of job a request for it makes (the gateway's "upstream"), None for the default
        self.endpoint_kind: Callable[[str], str | None] | None = None
        self._cond = threading.Condition()
        self._version = 0  # bumped on every state change made through this object
        self._job_versions: dict[str, int] = {}  # per job, only while someone waits on it
        self._waiters: dict[str, int] = {}
        self._submits = 0  # bumped when work may have become available
        self._local_cancels: set[str] = set()
        self._leases: dict[str, float] = {}
        self._last_sweep = 0.0
        self._terminal_listeners: list[Callable[[str], None]] = []
        self._change_listeners: list[Callable[[tuple[str, ...]], None]] = []
        self._raw_local = threading.local()  # per-thread DBAPI connection for hot reads (file SQLite)
        self._raw_path = self._sqlite_file_path()
        self._status_cache: dict[str, tuple[int, float, JobStatus]] = {}
        self.key_changes = 0  # bumped when this object creates, revokes or releases an API key
        self.max_queued: int | None = None  # queued jobs in all; None: no limit
        self.max_queued_per_owner: int | None = None  # queued jobs per API key; None: no limit
        self._create_tables()

    def __repr__(self) -> str:
        return f"JobStore({masked_url(self.url)!r})"

    def close(self) -> None:
        for name in ("conn", "pg"):
            conn = getattr(self._raw_local, name, None)
            if conn is not None:
                conn.close()
                setattr(self._raw_local, name, None)
        self.engine.dispose()

    def _sqlite_file_path(self) -> str | None:
        if not self.is_sqlite:
            return None
        parsed = make_url(self.url)
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query:
            return None  # in-memory (one shared connection) or URI options: use the pool
        from pathlib import Path

        return str(Path(database).expanduser())

    def _thread_connection(self) -> Any:
        """This thread's own DBAPI connection to the SQLite file (autocommit mode: BEGIN is explicit)."""
        conn = getattr(self._raw_local, "conn", None)
        if conn is None:
            import sqlite3

            conn = sqlite3.connect(self._raw_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._raw_local.conn = conn
        return conn

    def _postgres_connection(self) -> Any:
        """This thread's own autocommit PostgreSQL connection (opened on first use; dropped when broken)."""
        conn = getattr(self._raw_local, "pg", None)
        if conn is None or conn.closed:
            import psycopg

            dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            conn = self._raw_local.pg = psycopg.connect(dsn, autocommit=True)
        return conn

    def _postgres_read(self, sql: str, params: tuple) -> Any:
        """A read on this thread's own autocommit PostgreSQL connection: one round trip (a pooled connection
        adds a ping and a rollback). A broken connection is dropped and the read tried once more."""
        for attempt in (1, 2):
            conn = self._postgres_connection()
            try:
                with conn.cursor() as cursor:
                    return cursor.execute(sql, params).fetchone()
            except Exception:
                if not conn.closed and not conn.broken or attempt == 2:
                    raise
                self._raw_local.pg = None
        return None

    @contextmanager
    def _raw_write(self) -> Iterator[_Raw]:
        """A write transaction on a DBAPI connection, for the hot paths (submit, claim, progress, finish):
        SQLAlchemy's statement building and execution cost ~1-2 ms per statement on a small CPU, the SQL itself
        ~50 us. SQLite: ``BEGIN IMMEDIATE`` (the write lock up front, as ``_write``)."""
        if not self.is_sqlite:  # this thread's autocommit connection, with an explicit transaction
            conn = self._postgres_connection()
            conn.execute("BEGIN")
            try:
                yield _Raw(conn, True)
            except BaseException:
                if conn.broken:
                    self._raw_local.pg = None
                else:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return
        pooled = self._raw_path is None  # in-memory SQLite: the pool's one shared connection
        conn = self.engine.raw_connection() if pooled else self._thread_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Raw(conn, False)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if pooled:
                conn.close()

    def _raw_query(self, sqlite_sql: str, postgres_sql: str, params: tuple) -> Any:
        """One row of a plain SQL read, executed on a DBAPI connection (no SQLAlchemy statement machinery):
        a per-thread connection for SQLite files (autocommit: the SELECT is its own snapshot), else a pooled
        one."""
        if self._raw_path is not None:
            return self._thread_connection().execute(sqlite_sql, params).fetchone()
        if not self.is_sqlite:
            return self._postgres_read(postgres_sql, params)
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(sqlite_sql if self.is_sqlite else postgres_sql, params)
                return cursor.fetchone()
            finally:
                cursor.close()
        finally:
            conn.close()  # back to the pool (which rolls the read transaction back)

    # --- plumbing -------------------------------------------------------------------------------------

    def _create_tables(self) -> None:
        with self._write_engine.begin() as conn:
            if not self.is_sqlite:
                # several processes may start at once; one creates the tables, the others wait
                conn.execute(text("SELECT pg_advisory_xact_lock(7261553)"))
            metadata.create_all(conn)
            self._add_missing_columns(conn)
            for table in metadata.tables.values():  # indexes added since an older database was made
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    @staticmethod
    def _add_missing_columns(conn: Connection) -> None:
        """``ALTER TABLE ... ADD COLUMN`` for each of ``models.ADDED_COLUMNS`` an older database lacks."""
        from sqlalchemy import inspect

        if not ADDED_COLUMNS:
            return
        inspector = inspect(conn)
        present = {name: {c["name"] for c in inspector.get_columns(name)} for name, _ in ADDED_COLUMNS}
        for table_name, column_name in ADDED_COLUMNS:
            if column_name in present[table_name]:
                continue
            column = metadata.tables[table_name].c[column_name]
            ddl = f"ALTER TABLE {table_name} ADD COLUMN {column_name} {column.type.compile(conn.dialect)}"
            if column.server_default is not None:
                ddl += f" DEFAULT {column.server_default.arg}"
            conn.execute(text(ddl))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _changed(self, *job_ids: str, work: bool = False) -> None:
        with self._cond:
            self._version += 1
            for job_id in job_ids:
                if job_id in self._job_versions:
                    self._job_versions[job_id] += 1
            if work:
                self._submits += 1
            self._cond.notify_all()
        for fn in self._change_listeners:
            try:
                fn(job_ids)
            except Exception:  # a listener must never break the store
                log.exception("change listener %r failed", fn)

    def add_change_listener(self, fn: Callable[[tuple[str, ...]], None]) -> None:
        """``fn(job_ids)`` is called (from the changing thread, outside any transaction) after every state change
        made through this store; ``job_ids`` is empty for a submit (every queue position may have changed)."""
        self._change_listeners = [*self._change_listeners, fn]

    def remove_change_listener(self, fn: Callable[[tuple[str, ...]], None]) -> None:
        self._change_listeners = [f for f in self._change_listeners if f != fn]

    def add_terminal_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(job_id)`` is called (outside any transaction) whenever this store makes a job terminal."""
        self._terminal_listeners.append(fn)

    def _terminated(self, job_ids: list[str]) -> None:
        self._changed(*job_ids, work=True)
        for job_id in job_ids:
            self._local_cancels.discard(job_id)
            self._leases.pop(job_id, None)
            for fn in self._terminal_listeners:
                try:
                    fn(job_id)
                except Exception:  # a listener must never break the store
                    log.exception("terminal listener %r failed for job %s", fn, job_id)

    def _finish(self, raw: _Raw, job_id: str, now: datetime, *, status: str, error: str | None = None,
                error_type: str | None = None, result: dict | None = None, error_detail: dict | None = None,
                worker_id: str | None = None, lines: list[dict] | None = None,
                usage: dict | None = None) -> Job | None:
        """Make an active job terminal (with its last log lines and its usage row, and queue its webhook) inside
        ``raw``'s transaction; the terminal job, or None when it was not active (or not held by ``worker_id``)."""
        sets = ["status = ?", "error = ?", "error_type = ?", "completed_at = ?", "updated_at = ?",
                "lease_expires_at = NULL"]
        # a failure message may quote what a caller sent (a LoRA URL with a NUL): it must always be storable
        params: list[Any] = [status, jsonsafe.storable(error), error_type, raw.time(now), raw.time(now)]
        if result is not None:
            sets.append("result = ?")
            params.append(raw.json(result))
        if error_detail is not None:
            sets.append("error_detail = ?")
            params.append(raw.json(jsonsafe.scrub(error_detail)))
        if status == "completed":
            sets.append("step = total_steps")
        stamped = [line["timestamp"] for line in lines or [] if line.get("timestamp")]
        if stamped:  # progress lines still pending when the job ended (a job faster than one heartbeat)
            sets.append("first_progress_at = COALESCE(first_progress_at, ?)")
            params.append(raw.time(min(stamped)))
        where = "id = ? AND status IN ('queued', 'running')"
        params.append(job_id)
        if worker_id is not None:
            where += " AND worker_id = ? AND status = 'running'"
            params.append(worker_id)
        row = raw.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where} RETURNING {_JOB_COLUMNS_SQL}",
                          params).fetchone()
        if row is None:
            return None
        job = raw.job(row)
        ledger.record(raw, job, now, usage)
        if lines:
            self._insert_lines(raw, job_id, lines, now)
        outputs = [*(result or {}).get("images", []), *(result or {}).get("files", [])]
        output_keys = [output["key"] for output in outputs if output.get("key")]
        if output_keys:
            raw.executemany("INSERT INTO files (key, owner, job_id, created_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (key) DO NOTHING",
                            [(key, job.owner, job_id, raw.time(now)) for key in output_keys])
        if job.webhook:
            dialect = job.webhook.get("dialect") or job.dialect
            raw.execute("INSERT INTO webhook_deliveries (job_id, dialect, status, attempts, next_attempt_at, "
                        "created_at) VALUES (?, ?, 'pending', 0, ?, ?)", (job_id, dialect, raw.time(now), raw.time(now)))
        return job

    @staticmethod
    def _insert_lines(raw: _Raw, job_id: str, lines: list[dict], now: datetime) -> None:
        raw.executemany(_INSERT_LINE_SQL, [
            (job_id, raw.time(line.get("timestamp") or now), line.get("level") or "INFO",
             jsonsafe.storable(line["message"]), line.get("preview_key"))
            for line in lines
        ])

    # --- jobs -----------------------------------------------------------------------------------------

    def submit(self, *, endpoint: str, dialect: str, request: dict, input: dict | None = None,
               priority: str = "normal", timeout_s: float | None = None, store_io: bool = True,
               webhook: dict | None = None, job_id: str | None = None, owner: str | None = None,
               caller: str | None = None) -> Job:
        """Queue a job for ``owner`` (an API key id; None without keys). Submitting an id that exists returns
        the existing job (an idempotent retry). ``QueueFull`` when a queue-depth limit is reached. ``caller``
        names the server process holding a synchronous caller's connection: if that process stops, nobody
        waits for the result any more and the job is cancelled instead of run again. ``QuotaExceeded`` (a
        ``QueueFull``) when the job would pass a limit of the owner's key."""
        if priority not in PRIORITY_RANKS:
            raise ValueError(f"priority must be one of {sorted(PRIORITY_RANKS)}, not {priority!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        now = utcnow()
        values = {
            "id": job_id or str(uuid.uuid4()), "endpoint": endpoint, "dialect": dialect,
            "model": str(request.get("model", "")), "status": "queued", "priority": priority,
            "priority_rank": PRIORITY_RANKS[priority], "request": request, "input": input,
            "created_at": now, "updated_at": now, "attempts": 0, "cancel_requested": False,
            "timeout_at": now + timedelta(seconds=timeout_s) if timeout_s else None,
            "store_io": store_io, "webhook": webhook, "owner": owner, "caller": caller,
            "kind": str(request.get("kind") or (self.endpoint_kind(endpoint) if self.endpoint_kind else None)
                        or "generate"),
        }
        names = ", ".join(f'"{name}"' for name in values)
        try:
            with self._raw_write() as raw:
                self._check_queue_depth(raw, owner)
                if (refused := quotas.check(raw, owner, request, now)) is not None:
                    raise QuotaExceeded(refused.message, refused.retry_after_s, refused.limit)
                row = [raw.json(v) if k in _JSON_COLUMNS else raw.time(v) if k in _TIME_COLUMNS else v
                       for k, v in values.items()]
                raw.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(values))})", row)
        except Exception as exc:
            if not _is_integrity_error(exc):
                raise
            existing = self.get(values["id"])
            if existing is None:
                raise
            return existing
        self._changed(work=True)
        values.pop("priority_rank")
        return Job(**values)

    def _check_queue_depth(self, raw: _Raw, owner: str | None) -> None:
        """Raise ``QueueFull`` when queuing one more job would pass a limit (inside the submit's transaction)."""
        checks = []
        if self.max_queued is not None:
            checks.append(("SELECT count(*) FROM jobs WHERE status = 'queued'", (), self.max_queued,
                           "The queue is full"))
        if self.max_queued_per_owner is not None and owner:
            checks.append(("SELECT count(*) FROM jobs WHERE status = 'queued' AND owner = ?", (owner,),
                           self.max_queued_per_owner, "This API key has too many queued requests"))
        for sql, params, limit, what in checks:
            if raw.execute(sql, params).fetchone()[0] >= limit:
                raise QueueFull(f"{what} ({limit} queued); try again later.", QUEUE_FULL_RETRY_AFTER_S)

    def get(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        job = Job.from_row(row)
        if self._must_finish(job, utcnow()):
            self._sweep(force=True)
            return self.get(job_id)
        return job

    def _must_finish(self, job: Job, now: datetime) -> bool:
        """The sweep's condition for one job (so a status read never shows a job that can no longer run)."""
        timed_out = job.timeout_at is not None and job.timeout_at <= now
        if job.status == "queued":
            return timed_out
        dead = job.status == "running" and job.lease_expires_at is not None and job.lease_expires_at < now
        return dead and (job.cancel_requested or timed_out or job.attempts >= self.max_attempts
                         or _caller_gone(job))

    def status(self, job_id: str, max_age_s: float = 0.0, *, _swept: bool = False) -> JobStatus | None:
        """The job's status fields and queue position in one cheap read (None if unknown). With ``max_age_s``
        a snapshot read at most that long ago is reused while no change was made through this store; changes
        made by other processes may then show up to ``max_age_s`` late."""
        if max_age_s > 0 and (cached := self.cached_status(job_id, max_age_s)) is not None:
            return cached
        version, read_at = self._version, time.monotonic()  # taken before the read: a later change invalidates
        row = self._raw_query(_STATUS_SQL_SQLITE, _STATUS_SQL_POSTGRES, (job_id,))
        if row is None:
            return None
        (id_, endpoint, dialect, status, error, error_type, step, total, started, completed, inference,
         timeout_at, lease_expires_at, attempts, cancel_requested, position, owner) = row
        if timeout_at is not None or (status == "running" and lease_expires_at is not None):
            # never show a job that can no longer run (the sweep's condition, as in ``get``)
            now, timeout_at, lease_expires_at = utcnow(), _as_utc(timeout_at), _as_utc(lease_expires_at)
            timed_out = timeout_at is not None and timeout_at <= now
            dead = status == "running" and lease_expires_at is not None and lease_expires_at < now
            if not _swept and ((status == "queued" and timed_out) or (
                    dead and (bool(cancel_requested) or timed_out or attempts >= self.max_attempts))):
                self._sweep(force=True)
                return self.status(job_id, _swept=True)
        snapshot = JobStatus(id_, endpoint, dialect, status, error, error_type, step, total, _as_utc(started),
                             _as_utc(completed), _as_float(inference),
                             int(position) if status == "queued" and position is not None else None, owner)
        if max_age_s > 0:
            if len(self._status_cache) > 10_000:
                self._status_cache.clear()
            self._status_cache[job_id] = (version, read_at, snapshot)
        return snapshot

    def cached_status(self, job_id: str, max_age_s: float) -> JobStatus | None:
        """The snapshot ``status(job_id, max_age_s)`` would reuse, without touching the database; else None."""
        cached = self._status_cache.get(job_id)
        if cached is not None and cached[0] == self._version and time.monotonic() - cached[1] <= max_age_s:
            return cached[2]
        return None

    @property
    def version(self) -> int:
        """Bumped by every state change made through this store (cheap to poll: no database read)."""
        return self._version

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0 = next); None when it is not queued."""
        snapshot = self.status(job_id)
        return snapshot.queue_position if snapshot is not None else None

    def claim(self, worker_id: str, lease_s: float = 30.0, models: list[str] | None = None,
              kinds: list[str] | None = None) -> Job | None:
        """Atomically take the next job (of ``models`` and ``kinds`` when given): a running one whose lease
        expired (its worker died), else a queued one by priority, then the API keys' turns (``fairness``), then
        age within the key. None when there is nothing to do (found by a read, without the write lock)."""
        self._sweep()
        if (models is not None and not models) or (kinds is not None and not kinds):
            return None
        now = utcnow()
        postgres = not self.is_sqlite
        when = db_time(now, postgres)
        claimable = "q.cancel_requested = ? AND (q.timeout_at IS NULL OR q.timeout_at > ?)"
        params: list[Any] = [False, when]
        if models is not None:
            claimable += f" AND q.model IN ({', '.join('?' * len(models))})"
            params += list(models)
        if kinds is not None:
            claimable += f" AND q.kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        expired = f"q.lease_expires_at < ? AND q.attempts < ? AND NOT {_CALLER_GONE_SQL} AND {claimable}"
        expired_params = [when, self.max_attempts, *params]
        # in the order of an index (ix_jobs_owner_queue, ix_jobs_claim), so that the probe reads one, not the table
        probe = (f"SELECT COALESCE((SELECT q.id FROM jobs q WHERE q.status = 'queued' AND {claimable} "
                 "ORDER BY q.owner, q.priority_rank, q.created_at LIMIT 1), (SELECT q.id FROM jobs q WHERE "
                 f"q.status = 'running' AND {expired} ORDER BY q.priority_rank, q.created_at LIMIT 1))")
        if self._raw_query(probe, probe.replace("?", "%s"), (*params, *expired_params))[0] is None:
            return None
        with self._raw_write() as raw:
            job_id = fairness.pick(raw, claimable, params, expired, expired_params)
            if job_id is None:
                return None
            row = raw.execute(
                "UPDATE jobs SET status = 'running', worker_id = ?, attempts = attempts + 1, lease_s = ?, "
                "lease_expires_at = ?, started_at = ?, updated_at = ?, step = NULL, total_steps = NULL "
                f"WHERE id = ? RETURNING {_JOB_COLUMNS_SQL}",
                [worker_id, lease_s, raw.time(now + timedelta(seconds=lease_s)), raw.time(now), raw.time(now),
                 job_id],
            ).fetchone()
            job = raw.job(row)
            if job.attempts > 1:
                self._insert_lines(raw, job.id, [{
                    "level": "WARN", "message": f"the worker running this request stopped responding; "
                    f"retrying (attempt {job.attempts} of {self.max_attempts})"}], now)
        self._leases[job.id] = lease_s
        self._changed(job.id)
        return job

    def _sweep(self, force: bool = False) -> None:
        """Finish jobs that must not run: queued past their timeout, and running ones whose worker died
        after a cancel, after their timeout, or too many times."""
        if not force and time.monotonic() - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = time.monotonic()
        now = utcnow()
        postgres = not self.is_sqlite
        when = db_time(now, postgres)
        condition = (
            "FROM jobs WHERE (status = 'queued' AND timeout_at IS NOT NULL AND timeout_at <= ?) OR "
            "(status = 'running' AND lease_expires_at < ? AND "
            f"(cancel_requested = ? OR (timeout_at IS NOT NULL AND timeout_at <= ?) OR attempts >= ? OR "
            f"{_CALLER_GONE_SQL}))"
        )
        params = (when, when, True, when, self.max_attempts)
        probe = f"SELECT id {condition} LIMIT 1"  # the common case finds nothing and takes no write lock
        if self._raw_query(probe, probe.replace("?", "%s"), params) is None:
            return
        finished = []
        with self._raw_write() as raw:
            lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
            for job_id, cancel_requested, timeout_at, attempts, caller, worker_id in raw.execute(
                    f"SELECT id, cancel_requested, timeout_at, attempts, caller, worker_id {condition}{lock}",
                    params).fetchall():
                timeout_at = _as_utc(timeout_at)
                if timeout_at is not None and timeout_at <= now:
                    outcome = {"status": "failed", "error": TIMEOUT_ERROR, "error_type": TIMEOUT_ERROR_TYPE}
                elif cancel_requested:
                    outcome = {"status": "cancelled", "error": CANCELLED_ERROR, "error_type": CANCELLED_ERROR_TYPE}
                elif _caller_gone(SimpleNamespace(caller=caller, worker_id=worker_id)):
                    outcome = {"status": "cancelled", "error": CALLER_GONE_ERROR,
                               "error_type": CANCELLED_ERROR_TYPE}
                else:
                    outcome = {
                        "status": "failed", "error_type": "internal_error",
                        "error": f"The worker running this request stopped responding {attempts} times; "
                                 "giving up.",
                    }
                if self._finish(raw, job_id, now, **outcome) is not None:
                    finished.append(job_id)
        if finished:
            self._terminated(finished)

    def heartbeat(self, job_id: str, worker_id: str, step: int | None = None, total: int | None = None) -> bool:
        """Extend the lease. False = the lease was lost or a cancel was requested: stop the job."""
        return self.report(job_id, worker_id, step, total)

    def progress(self, job_id: str, worker_id: str, step: int, total: int, message: str,
                 preview_key: str | None = None, level: str = "INFO") -> bool:
        """A heartbeat and a log line in one transaction; the same answer as ``heartbeat``."""
        return self.report(job_id, worker_id, step, total,
                           [{"level": level, "message": message, "preview_key": preview_key}])

    def report(self, job_id: str, worker_id: str, step: int | None = None, total: int | None = None,
               lines: list[dict] | None = None) -> bool:
        """A heartbeat with progress and any number of log lines (dicts with ``message`` and optionally
        ``level``, ``preview_key``, ``timestamp``), in one transaction. The same answer as ``heartbeat``;
        the lines are written only while this worker holds the job."""
        now = utcnow()
        with self._raw_write() as raw:
            sets = ["lease_expires_at = ?", "updated_at = ?"]
            params: list[Any] = [raw.time(now + timedelta(seconds=self._leases.get(job_id, 30.0))), raw.time(now)]
            if step is not None:
                sets.append("step = ?")
                params.append(step)
            if total is not None:
                sets.append("total_steps = ?")
                params.append(total)
            if lines:  # the worker stamps each progress line when the engine reports it
                sets.append("first_progress_at = COALESCE(first_progress_at, ?)")
                params.append(raw.time(min(line.get("timestamp") or now for line in lines)))
            if raw.postgres:
                # a heartbeat or log line lost in a database crash is harmless; do not wait for the disk
                raw.execute("SET LOCAL synchronous_commit TO OFF")
            row = raw.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND worker_id = ? AND status = 'running' "
                "RETURNING cancel_requested, webhook", [*params, job_id, worker_id]).fetchone()
            if row is not None and lines:
                self._insert_lines(raw, job_id, lines, now)
        if row is not None and lines:
            self._progress_event(job_id, row[1])
        if lines or step is not None:
            self._changed(job_id)
        return row is not None and not row[0] and job_id not in self._local_cancels

    def _progress_event(self, job_id: str, webhook: Any) -> None:
        """A job whose webhook asks for ``logs`` events (Replicate's) gets one queued when it logs: without a
        body, which the API process that delivers it builds from the job as it is then (so whichever process
        wrote the lines, and whichever API replica is alive, the events go out); a burst leaves one waiting."""
        if isinstance(webhook, str):
            webhook = json.loads(webhook)
        if webhook and webhook.get("url") and "logs" in (webhook.get("events") or ()):
            self.queue_webhook_event(job_id, webhook.get("dialect") or "", "logs", webhook["url"], None,
                                     coalesce=True)

    def cancel_requested(self, job_id: str) -> bool:
        """True when a cancel for this job was requested through this store object (no database read)."""
        return job_id in self._local_cancels

    def log(self, job_id: str, message: str, level: str = "INFO", preview_key: str | None = None) -> None:
        with self._write() as conn:
            conn.execute(insert(job_logs).values(job_id=job_id, timestamp=utcnow(), level=level,
                                                 message=jsonsafe.storable(message), preview_key=preview_key))
            row = conn.execute(select(jobs.c.status, jobs.c.webhook).where(jobs.c.id == job_id)).first()
        if row is not None and row.status == "running":
            self._progress_event(job_id, row.webhook)
        self._changed(job_id)

    def logs(self, job_id: str, after: int = 0) -> list[LogLine]:
        stmt = (
            select(job_logs.c.seq, job_logs.c.timestamp, job_logs.c.level, job_logs.c.message,
                   job_logs.c.preview_key)
            .where(job_logs.c.job_id == job_id, job_logs.c.seq > after)
            .order_by(job_logs.c.seq)
        )
        with self._read() as conn:
            return [LogLine(*row) for row in conn.execute(stmt)]

    def changes(self, job_id: str, after_seq: int = 0) -> tuple[Job | None, list[LogLine]]:
        """The job and its log lines after ``after_seq``: what a status stream sends next."""
        return self.get(job_id), self.logs(job_id, after_seq)

    def complete(self, job_id: str, worker_id: str, result: dict, *, lines: list[dict] | None = None,
                 usage: dict | None = None) -> Job | None:
        """Record a result (the last log lines, and ``usage``: the ``job_usage`` columns the worker measured): the
        completed job, or None when this worker no longer holds the job (nothing is written)."""
        with self._raw_write() as raw:
            job = self._finish(raw, job_id, utcnow(), status="completed", result=result, worker_id=worker_id,
                               lines=lines, usage=usage)
        if job is not None:
            self._terminated([job_id])
        return job

    def fail(self, job_id: str, error: str, error_type: str = "internal_error", status: str = "failed", *,
             worker_id: str | None = None, error_detail: dict | None = None,
             lines: list[dict] | None = None, usage: dict | None = None) -> Job | None:
        """Make an active job ``failed`` (or ``cancelled``): the terminal job, or None when it was no longer
        active (or, given ``worker_id``, no longer held by that worker). ``usage`` keeps the engine time and
        steps spent; such a job bills nothing."""
        if status not in ("failed", "cancelled"):
            raise ValueError(f"fail() sets failed or cancelled, not {status!r}")
        with self._raw_write() as raw:
            job = self._finish(raw, job_id, utcnow(), status=status, error=error, error_type=error_type,
                               error_detail=error_detail, worker_id=worker_id, lines=lines, usage=usage)
        if job is not None:
            self._terminated([job_id])
        return job

    def reroute(self, job_id: str, worker_id: str, kind: str, lines: list[dict] | None = None) -> bool:
        """Give a running job back to the queue as another kind of job (the gateway handing a request to this
        server's GPU workers), with the log lines that say why; it keeps its place by age."""
        if lines:
            self.report(job_id, worker_id, lines=lines)
        return self._requeue(job_id, worker_id, kind=kind)

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a running job back to the queue (a worker shutting down); it keeps its place by age."""
        return self._requeue(job_id, worker_id)

    def _requeue(self, job_id: str, worker_id: str, **values: Any) -> bool:
        """Put a job this worker runs back in the queue, the attempt not counted, setting ``values`` too."""
        with self._write() as conn:
            count = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == "running")
                .values(status="queued", worker_id=None, lease_expires_at=None, updated_at=utcnow(),
                        attempts=jobs.c.attempts - 1, **values)
            ).rowcount
        self._leases.pop(job_id, None)
        self._changed(job_id, work=True)
        return count == 1

    def recover(self, worker_ids: list[str], process_id: str | None = None) -> dict[str, int]:
        """Clean up after a server or worker process that stopped without giving its jobs back (killed, crashed,
        the machine rebooted), as soon as its next incarnation starts instead of a whole lease later.

        The running jobs held by ``worker_ids`` go back to the queue, keeping their place and counting the
        attempt (a job that brought its worker down ``max_attempts`` times fails); those cancelled or past their
        timeout end so. The jobs whose synchronous caller was connected to ``process_id`` are cancelled: nobody
        waits for their result. Only call this for ids no live process uses. Returns how many jobs were
        ``requeued``, ``failed`` and ``cancelled``."""
        counts = {"requeued": 0, "failed": 0, "cancelled": 0}
        if not worker_ids and not process_id:
            return counts
        now = utcnow()
        finished: list[str] = []
        touched: list[str] = []
        held = set(worker_ids)
        with self._raw_write() as raw:
            where = []
            params: list[Any] = []
            if worker_ids:
                where.append(f"(status = 'running' AND worker_id IN ({', '.join('?' * len(worker_ids))}))")
                params += list(worker_ids)
            if process_id:
                where.append("caller = ?")
                params.append(process_id)
            lock = " FOR UPDATE" if raw.postgres else ""
            rows = raw.execute(
                "SELECT id, status, worker_id, cancel_requested, timeout_at, attempts, caller FROM jobs "
                f"WHERE status IN ('queued', 'running') AND ({' OR '.join(where)}){lock}", params).fetchall()
            for job_id, status, worker_id, cancel_requested, timeout_at, attempts, caller in rows:
                timeout_at = _as_utc(timeout_at)
                caller_gone = bool(process_id) and caller == process_id
                if status == "running" and worker_id in held:
                    if timeout_at is not None and timeout_at <= now:
                        outcome = {"status": "failed", "error": TIMEOUT_ERROR, "error_type": TIMEOUT_ERROR_TYPE}
                    elif cancel_requested:
                        outcome = {"status": "cancelled", "error": CANCELLED_ERROR,
                                   "error_type": CANCELLED_ERROR_TYPE}
                    elif caller_gone:
                        outcome = {"status": "cancelled", "error": CALLER_GONE_ERROR,
                                   "error_type": CANCELLED_ERROR_TYPE}
                    elif attempts >= self.max_attempts:
                        outcome = {"status": "failed", "error_type": "internal_error",
                                   "error": f"The worker running this request stopped {attempts} times; giving up."}
                    else:
                        raw.execute("UPDATE jobs SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, "
                                    "step = NULL, total_steps = NULL, updated_at = ? WHERE id = ?",
                                    (raw.time(now), job_id))
                        self._insert_lines(raw, job_id, [{
                            "level": "WARN", "message": "the worker running this request stopped; it restarted "
                            "and put the request back in the queue"}], now)
                        counts["requeued"] += 1
                        touched.append(job_id)
                        continue
                elif status == "queued":
                    outcome = {"status": "cancelled", "error": CALLER_GONE_ERROR, "error_type": CANCELLED_ERROR_TYPE}
                else:  # running on a live worker elsewhere: it stops at its next heartbeat
                    raw.execute("UPDATE jobs SET cancel_requested = ?, updated_at = ? WHERE id = ?",
                                (True, raw.time(now), job_id))
                    self._insert_lines(raw, job_id, [{"message": "cancellation requested: the server holding "
                                                      "the caller's connection stopped"}], now)
                    counts["cancelled"] += 1
                    touched.append(job_id)
                    continue
                if self._finish(raw, job_id, now, **outcome) is not None:
                    counts["cancelled" if outcome["status"] == "cancelled" else "failed"] += 1
                    finished.append(job_id)
        if finished:
            self._terminated(finished)
        if touched:
            self._changed(*touched, work=True)
        return counts

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel the job if it is still queued (a synchronous caller that went away before it started);
        True when it was."""
        now = utcnow()
        with self._raw_write() as raw:
            lock = " FOR UPDATE" if raw.postgres else ""
            row = raw.execute(f"SELECT status FROM jobs WHERE id = ?{lock}", (job_id,)).fetchone()
            job = None
            if row is not None and row[0] == "queued":
                job = self._finish(raw, job_id, now, status="cancelled", error=CANCELLED_ERROR,
                                   error_type=CANCELLED_ERROR_TYPE)
        if job is not None:
            self._terminated([job_id])
        return job is not None

    def request_cancel(self, job_id: str) -> str:
        """"CANCELLATION_REQUESTED" | "ALREADY_COMPLETED" | "NOT_FOUND". A queued job is cancelled at once;
        a running one is flagged and its worker stops it at the next step."""
        now = utcnow()
        with self._raw_write() as raw:
            lock = " FOR UPDATE" if raw.postgres else ""
            row = raw.execute(f"SELECT status FROM jobs WHERE id = ?{lock}", (job_id,)).fetchone()
            if row is None:
                return "NOT_FOUND"
            status = row[0]
            if status in TERMINAL:
                return "ALREADY_COMPLETED"
            if status == "queued":
                self._finish(raw, job_id, now, status="cancelled", error=CANCELLED_ERROR,
                             error_type=CANCELLED_ERROR_TYPE)
            else:
                raw.execute("UPDATE jobs SET cancel_requested = ?, updated_at = ? WHERE id = ?",
                            (True, raw.time(now), job_id))
                self._insert_lines(raw, job_id, [{"message": "cancellation requested"}], now)
        if status == "queued":
            self._terminated([job_id])
        else:
            self._local_cancels.add(job_id)
            self._changed(job_id)
        return "CANCELLATION_REQUESTED"

    def list(self, *, dialect: str | None = None, limit: int = 100, before: datetime | None = None,
             status: str | None = None, endpoint: str | None = None, owner: str | None = None,
             prompt_contains: str | None = None) -> list[Job]:
        """Newest first; given ``owner``, only that API key's jobs; given ``prompt_contains``, only jobs whose
        prompt contains it (ignoring case)."""
        stmt = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if dialect is not None:
            stmt = stmt.where(jobs.c.dialect == dialect)
        if before is not None:
            stmt = stmt.where(jobs.c.created_at < before)
        if status is not None:
            stmt = stmt.where(jobs.c.status == status)
        if endpoint is not None:
            stmt = stmt.where(jobs.c.endpoint == endpoint)
        if owner is not None:
            stmt = stmt.where(jobs.c.owner == owner)
        if prompt_contains:
            prompt = jobs.c.request["prompt"].as_string()
            if not self.is_sqlite:  # a request PostgreSQL cannot take apart is searched as its JSON text
                text_form = cast(jobs.c.request, Text)
                prompt = case((literal_column(_PG_UNSAFE_JSON.format("jobs.request")), text_form), else_=prompt)
            stmt = stmt.where(func.lower(prompt).contains(prompt_contains.lower(), autoescape=True))
        with self._read() as conn:
            return [Job.from_row(row) for row in conn.execute(stmt)]

    def _history_key(self, sort: str) -> Any:
        """The sort key of ``history``: the end time, or the duration in seconds from sent to ended (requests in
        flight as ``NOT_ENDED`` or ``NOT_ENDED_DURATION``: first, so requests sent meanwhile never shift a page)."""
        if sort == "ended_at":
            return func.coalesce(jobs.c.completed_at, literal(NOT_ENDED, UTCDateTime))
        if self.is_sqlite:
            seconds = literal_column("(julianday(jobs.completed_at) - julianday(jobs.created_at)) * 86400.0")
        else:
            seconds = literal_column("EXTRACT(EPOCH FROM (jobs.completed_at - jobs.created_at))")
        return func.coalesce(cast(seconds, Float), NOT_ENDED_DURATION)

    def history(self, *, endpoints: list[str], start: datetime, end: datetime, owner: str | None = None,
                outcome: str | None = None, request_id: str | None = None, sort: str = "ended_at",
                after: tuple[Any, datetime, str] | None = None, limit: int = 50) -> list[tuple[Any, Job]]:
        """fal's request history: the jobs of ``endpoints`` sent in [start, end), as (sort key, job), largest
        key first (``sort``: ``ended_at``, the latest end; ``duration``, the longest), then the latest sent, then
        by id. ``after`` is the (key, sent, id) of the last row of the previous page: requests sent since sort
        before it, so paging neither repeats nor skips a row. ``outcome``: success, error or user_error;
        ``owner`` limits the rows to one key's."""
        key = self._history_key(sort).label("sort_key")
        user_error = or_(jobs.c.status == "cancelled", and_(jobs.c.status == "failed", or_(
            func.coalesce(jobs.c.error_type, "").in_(USER_ERROR_TYPES), jobs.c.error_detail.is_not(None))))
        outcomes = {"success": jobs.c.status == "completed", "user_error": user_error,
                    "error": and_(jobs.c.status == "failed", not_(user_error))}
        stmt = select(jobs, key).where(jobs.c.endpoint.in_(endpoints), jobs.c.created_at >= start,
                                       jobs.c.created_at < end)
        if owner is not None:
            stmt = stmt.where(jobs.c.owner == owner)
        if outcome is not None:
            stmt = stmt.where(outcomes[outcome])
        if request_id is not None:
            stmt = stmt.where(jobs.c.id == request_id)
        if after is not None:
            value, sent, job_id = after
            stmt = stmt.where(or_(key.element < value, and_(key.element == value, or_(
                jobs.c.created_at < sent, and_(jobs.c.created_at == sent, jobs.c.id < job_id)))))
        stmt = stmt.order_by(key.element.desc(), jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [(row.sort_key, Job.from_row(row)) for row in conn.execute(stmt)]

    def counts(self) -> dict[str, int]:
        """Jobs per status (for metrics and /health)."""
        with self._read() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        return {status: 0 for status in STATUSES} | {status: int(n) for status, n in rows}

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is terminal, or as it is when ``timeout`` seconds passed (None if unknown). Woken at
        once by changes to this job made through this store; changes by other processes are polled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters[job_id] = self._waiters.get(job_id, 0) + 1
            self._job_versions.setdefault(job_id, 0)
        try:
            while True:
                with self._cond:
                    version = self._job_versions[job_id]
                job = self.get(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.terminal or remaining <= 0:
                    return job
                with self._cond:
                    self._cond.wait_for(lambda v=version: self._job_versions[job_id] != v, min(remaining, self.poll_s))
        finally:
            with self._cond:
                self._waiters[job_id] -= 1
                if not self._waiters[job_id]:
                    del self._waiters[job_id], self._job_versions[job_id]

    def ended(self, job_ids: list[str]) -> set[str]:
        """The ids among ``job_ids`` whose job is terminal or unknown, in one read per 500 ids (after the
        sweep has finished jobs that can no longer run, as ``get`` would show them). For waiters that poll
        many jobs at once (``fluxserve.api.waits``)."""
        self._sweep()
        active: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start:start + 500]
                active.update(conn.execute(select(jobs.c.id).where(
                    jobs.c.id.in_(chunk), jobs.c.status.in_(ACTIVE))).scalars())
        return set(job_ids) - active

    def work_version(self) -> int:
        with self._cond:
            return self._submits

    def wait_for_work(self, version: int, timeout: float) -> bool:
        """Block until a job may have become available through this store (a submit) or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._submits != version, timeout)

    def wake_all(self) -> None:
        """Wake every waiter (used by workers shutting down)."""
        self._changed(work=True)

    def forget_io(self, job_id: str) -> None:
        """Drop the request, input and result bodies (fal ``X-Fal-Store-IO: 0``, sync mode)."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                request=None, input=None, result=None, updated_at=utcnow()))
        self._changed(job_id)

    @staticmethod
    def _delete_jobs(conn: Connection, ids: Any) -> int:
        """Delete the jobs ``ids`` selects, with their logs, deliveries and events; returns how many."""
        conn.execute(job_logs.delete().where(job_logs.c.job_id.in_(ids)))
        conn.execute(webhook_deliveries.delete().where(webhook_deliveries.c.job_id.in_(ids)))
        conn.execute(webhook_events.delete().where(webhook_events.c.job_id.in_(ids)))
        return conn.execute(jobs.delete().where(jobs.c.id.in_(ids))).rowcount

    def delete_before(self, cutoff: datetime) -> int:
        """Delete terminal jobs (with their logs and deliveries) created before ``cutoff``; returns how many."""
        with self._write() as conn:
            ids = select(jobs.c.id).where(jobs.c.created_at < cutoff, jobs.c.status.in_(TERMINAL))
            return self._delete_jobs(conn, ids)

    def delete_job(self, job_id: str) -> str:
        """Delete one terminal job (with its logs and deliveries): "DELETED", "NOT_FOUND", or "ACTIVE" for a
        queued or running job, which is left alone."""
        with self._write() as conn:
            status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id).with_for_update()).scalar()
            if status is None:
                return "NOT_FOUND"
            if status not in TERMINAL:
                return "ACTIVE"
            self._delete_jobs(conn, [job_id])
        self._status_cache.pop(job_id, None)
        self._changed(job_id)
        return "DELETED"

    # --- webhook deliveries ---------------------------------------------------------------------------

    def claim_deliveries(self, dialects: list[str], limit: int = 8, lease_s: float = 60.0, *,
                         per_owner: int | None = None, busy: Mapping[str | None, int] | None = None,
                         busy_jobs: Collection[str] = ()) -> list[Delivery]:
        """Take due webhook deliveries for these dialects; they are hidden from other senders for ``lease_s``
        (a sender that dies mid-delivery leaves them to be retried after that). ``per_owner``: at most that
        many for one API key, counting the ``busy`` ones it has in flight already; none of ``busy_jobs``
        (``outbox.claim``)."""
        if not dialects:
            return []
        now = utcnow()
        due = and_(webhook_deliveries.c.status == "pending", webhook_deliveries.c.next_attempt_at <= now,
                   webhook_deliveries.c.dialect.in_(dialects))
        with self._read() as conn:
            if conn.execute(select(webhook_deliveries.c.id).where(due).limit(1)).first() is None:
                return []
        with self._write() as conn:
            rows = outbox.claim(conn, webhook_deliveries, due, now=now, limit=limit, lease_s=lease_s,
                                per_owner=per_owner, busy=busy, busy_jobs=busy_jobs)
        return [Delivery(r.id, r.job_id, r.dialect, r.url, jsonsafe.scrub(r.body), r.attempts, owner)
                for r, owner in rows]

    def next_delivery_due(self, dialects: list[str]) -> datetime | None:
        with self._read() as conn:
            return conn.execute(
                select(func.min(webhook_deliveries.c.next_attempt_at))
                .where(webhook_deliveries.c.status == "pending", webhook_deliveries.c.dialect.in_(dialects))
            ).scalar()

    def update_delivery(self, delivery_id: int, **values: Any) -> None:
        if values.get("last_error"):  # an error that quotes a caller's URL must always be storable
            values["last_error"] = jsonsafe.storable(values["last_error"])
        with self._write() as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id).values(**values))

    def delivery(self, job_id: str) -> dict | None:
        """The webhook delivery row of a job, as a dict (for tests and the admin view)."""
        with self._read() as conn:
            row = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)).first()
        return dict(row._mapping) if row is not None else None

    # --- per-event webhooks and signing keys ------------------------------------------------------------

    def queue_webhook_event(self, job_id: str, dialect: str, event: str, url: str, body: Any, *,
                            coalesce: bool = False) -> int:
        """Queue one event webhook for a job (delivered after the job's earlier events); returns its row id.
        With ``coalesce``, a pending row of the same event that is the job's latest and has not been attempted
        yet takes the new body instead, so a burst of events leaves at most one waiting."""
        now = utcnow()
        ev = webhook_events.c
        with self._write() as conn:
            if coalesce:
                latest = select(func.max(ev.id)).where(ev.job_id == job_id).scalar_subquery()
                row = conn.execute(
                    update(webhook_events)
                    .where(ev.id == latest, ev.event == event, ev.status == "pending", ev.attempts == 0,
                           ev.next_attempt_at <= now)
                    .values(body=body, url=url).returning(ev.id)
                ).first()
                if row is not None:
                    return row.id
            return conn.execute(insert(webhook_events).values(
                job_id=job_id, dialect=dialect, event=event, status="pending", url=url, body=body, attempts=0,
                next_attempt_at=now, created_at=now).returning(ev.id)).scalar_one()

    def claim_webhook_events(self, dialects: list[str], limit: int = 8, lease_s: float = 60.0, *,
                             per_owner: int | None = None, busy: Mapping[str | None, int] | None = None,
                             busy_jobs: Collection[str] = ()) -> list[EventDelivery]:
        """Take due event webhooks, only the earliest pending one of each job (so they arrive in order); they
        are hidden from other senders for ``lease_s``. ``per_owner``, ``busy`` and ``busy_jobs`` as
        ``claim_deliveries``."""
        if not dialects:
            return []
        now = utcnow()
        ev = webhook_events.c
        earlier = webhook_events.alias("earlier")
        due = and_(ev.status == "pending", ev.next_attempt_at <= now, ev.dialect.in_(dialects),
                   ~select(earlier.c.id).where(earlier.c.job_id == ev.job_id, earlier.c.id < ev.id,
                                               earlier.c.status == "pending").exists())
        with self._read() as conn:
            if conn.execute(select(ev.id).where(due).limit(1)).first() is None:
                return []
        with self._write() as conn:
            rows = outbox.claim(conn, webhook_events, due, now=now, limit=limit, lease_s=lease_s,
                                per_owner=per_owner, busy=busy, busy_jobs=busy_jobs)
        return [EventDelivery(r.id, r.job_id, r.dialect, r.event, r.url, jsonsafe.scrub(r.body), r.attempts, owner)
                for r, owner in rows]

    def next_webhook_event_due(self, dialects: list[str]) -> datetime | None:
        with self._read() as conn:
            return conn.execute(
                select(func.min(webhook_events.c.next_attempt_at))
                .where(webhook_events.c.status == "pending", webhook_events.c.dialect.in_(dialects))
            ).scalar()

    def update_webhook_event(self, event_id: int, **values: Any) -> None:
        if values.get("last_error"):
            values["last_error"] = jsonsafe.storable(values["last_error"])
        with self._write() as conn:
            conn.execute(update(webhook_events).where(webhook_events.c.id == event_id).values(**values))

    def pending_webhook_event_due(self, job_id: str) -> datetime | None:
        """When the next of a job's waiting event webhooks is due; None when none waits (its terminal webhook
        goes after them)."""
        with self._read() as conn:
            return conn.execute(select(func.min(webhook_events.c.next_attempt_at)).where(
                webhook_events.c.job_id == job_id, webhook_events.c.status == "pending")).scalar()

    def release_final_delivery(self, job_id: str) -> bool:
        """Make a job's terminal webhook due now if it was waiting for event webhooks that are all done."""
        now = utcnow()
        ev = webhook_events.c
        waiting = select(ev.id).where(ev.job_id == job_id, ev.status == "pending").exists()
        with self._write() as conn:
            return conn.execute(update(webhook_deliveries).where(
                webhook_deliveries.c.job_id == job_id, webhook_deliveries.c.status == "pending",
                webhook_deliveries.c.attempts == 0, webhook_deliveries.c.url.is_(None),
                webhook_deliveries.c.next_attempt_at > now, ~waiting).values(next_attempt_at=now)).rowcount == 1

    def webhook_events(self, job_id: str) -> list[dict]:
        """A job's event webhook rows in order, as dicts (for tests and the admin view)."""
        with self._read() as conn:
            rows = conn.execute(select(webhook_events).where(webhook_events.c.job_id == job_id)
                                .order_by(webhook_events.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def webhook_key(self, name: str, generate: Callable[[], str]) -> str:
        """The signing secret called ``name``, made with ``generate`` and stored the first time it is asked
        for; every process on this store gets the same one (the first writer wins a race)."""
        with self._read() as conn:
            found = conn.execute(select(webhook_keys.c.secret).where(webhook_keys.c.name == name)).scalar()
        if found is not None:
            return found
        try:
            with self._write() as conn:
                conn.execute(insert(webhook_keys).values(name=name, secret=generate(), created_at=utcnow()))
        except Exception as exc:
            if not _is_integrity_error(exc):
                raise
        with self._read() as conn:
            return conn.execute(select(webhook_keys.c.secret).where(webhook_keys.c.name == name)).scalar_one()

    def job_owner(self, job_id: str) -> str | None:
        """The API key that made the job (None: made without keys, or no such job); webhooks are signed as it."""
        with self._read() as conn:
            return conn.execute(select(jobs.c.owner).where(jobs.c.id == job_id)).scalar()

    # --- API keys -------------------------------------------------------------------------------------

    @staticmethod
    def _hash(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def create_key(self, name: str = "", admin: bool = False,
                   limits: quotas.Limits | None = None) -> tuple[str, str]:
        """A new API key: (key_id, secret). The secret is ``<key_id>:<random>`` (usable as FAL_KEY, or as
        FAL_KEY_ID + FAL_KEY_SECRET) and is shown only now; only its SHA-256 is stored. An ``admin`` key sees
        every key's jobs, history and files, and is never limited by ``limits``."""
        key_id = "key_" + secrets.token_hex(8)
        secret = f"{key_id}:{secrets.token_urlsafe(32)}"
        limits = limits or quotas.Limits()
        quotas.validate({name: getattr(limits, name) for name in quotas.LIMITS})
        with self._write() as conn:
            conn.execute(insert(api_keys).values(
                id=key_id, name=name, secret_hash=self._hash(secret), created_at=utcnow(), admin=admin,
                **{name: getattr(limits, name) for name in quotas.LIMITS}))
        self.key_changes += 1
        return key_id, secret

    def set_limits(self, key_id: str, **changes: int | None) -> ApiKey | None:
        """Change some of a key's limits (``max_concurrent``, ``rpm``, ``mp_per_day``; None: unlimited); the
        next submit in any process applies them. The key as it is now, or None when no key has this id."""
        quotas.validate(changes)
        with self._write() as conn:
            if changes:
                conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**changes))
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return ApiKey.from_row(row) if row is not None else None

    def verify_key(self, secret: str) -> bool:
        return self.authenticate(secret) is not None

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key with this secret (its id and admin flag), or None."""
        if not secret:
            return None
        digest = self._hash(secret)
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.secret_hash == digest)).first()
        if row is None or row.revoked_at is not None:
            return None
        now = utcnow()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > KEY_USE_RESOLUTION:
            with self._write() as conn:
                conn.execute(update(api_keys).where(api_keys.c.id == row.id).values(last_used_at=now))
        return ApiKey.from_row(row)

    def list_keys(self) -> list[ApiKey]:
        with self._read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [ApiKey.from_row(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """False when no active key has this id. A revoked key stays on record and keeps the server keyed
        (``KeyCounts.keyed``) until the operator releases it (``release_revoked_keys``)."""
        with self._write() as conn:
            revoked = conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            ).rowcount == 1
        self.key_changes += 1
        return revoked

    def release_revoked_keys(self) -> int:
        """Release every revoked key (``fluxserve keys keyless``): once no key is active or unreleased, a loopback
        server runs without keys again. How many keys were released now."""
        with self._write() as conn:
            released = conn.execute(
                update(api_keys).where(api_keys.c.revoked_at.is_not(None), api_keys.c.released_at.is_(None))
                .values(released_at=utcnow())
            ).rowcount
        self.key_changes += 1
        return released

    def key_counts(self) -> KeyCounts:
        """The keys created, revoked and released, in one read: API processes read it at most every 0.1 s and
        forget what they had verified when it changed."""
        sql = "SELECT COUNT(*), COUNT(revoked_at), COUNT(released_at) FROM api_keys"
        created, revoked, released = self._raw_query(sql, sql, ())
        return KeyCounts(int(created), int(revoked), int(released))

    def has_keys(self) -> bool:
        """True when at least one active key exists (the API then requires one)."""
        with self._read() as conn:
            return conn.execute(select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)).limit(1)).first() \
                is not None

    # --- files and secrets ----------------------------------------------------------------------------

    def record_upstream_call(self, job_id: str, owner: str | None, endpoint: str, provider: str, target: str,
                             started_at: datetime, answered_at: datetime | None, ended_at: datetime, outcome: str,
                             error: str | None = None) -> None:
        """One request the gateway sent to a provider (``upstream_calls``)."""
        with self._write() as conn:
            conn.execute(insert(upstream_calls).values(
                job_id=job_id, owner=owner, endpoint=endpoint, provider=provider, target=target,
                started_at=started_at, answered_at=answered_at, ended_at=ended_at, outcome=outcome,
                error=jsonsafe.storable((error or None) and error[:2000])))

    def add_file(self, key: str, owner: str | None, job_id: str | None = None, *, size: int | None = None,
                 limit: int | None = None) -> None:
        """Record who a stored file belongs to (an upload, an input stored for a request) and its ``size``.
        With ``limit``, ``StorageQuotaExceeded`` when the owner's files would pass it (``file_quota``); record
        the file before writing its bytes, so a refused one costs nothing."""
        with self._raw_write() as raw:
            file_quota.check(raw, owner, key, size or 0, limit)
            raw.execute('INSERT INTO files ("key", owner, job_id, created_at, size) VALUES (?, ?, ?, ?, ?)',
                        (key, owner, job_id, raw.time(utcnow()), size))

    def set_file_size(self, key: str, size: int, limit: int | None = None) -> None:
        """A recorded file's new ``size`` (a reserved upload slot receiving its bytes), checked against its
        owner's ``limit`` like ``add_file``; KeyError for a file never recorded."""
        with self._raw_write() as raw:
            row = raw.execute('SELECT owner FROM files WHERE "key" = ?', (key,)).fetchone()
            if row is None:
                raise KeyError(key)
            file_quota.check(raw, row[0], key, size, limit)
            raw.execute('UPDATE files SET size = ? WHERE "key" = ?', (size, key))

    def stored_bytes(self, owner: str | None) -> int:
        """Bytes of the files ``owner`` keeps stored (what its storage quota counts)."""
        with self._read() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(files.c.size), 0))
                                    .where(files.c.owner == owner)).scalar())

    def file_owner(self, key: str) -> tuple[bool, str | None]:
        """(known, owner) of a stored file: known is False for files never recorded (e.g. previews)."""
        with self._read() as conn:
            row = conn.execute(select(files.c.owner).where(files.c.key == key)).first()
        return (False, None) if row is None else (True, row.owner)

    def secret(self, name: str) -> bytes:
        """A random server secret, made once and kept in the database so every replica and restart shares it."""
        with self._read() as conn:
            value = conn.execute(select(secrets_table.c.value).where(secrets_table.c.name == name)).scalar()
        if value is None:
            try:
                with self._write() as conn:
                    conn.execute(insert(secrets_table).values(name=name, value=secrets.token_hex(32),
                                                              created_at=utcnow()))
            except Exception as exc:
                if not _is_integrity_error(exc):
                    raise  # else another replica made it first
            with self._read() as conn:
                value = conn.execute(select(secrets_table.c.value).where(secrets_table.c.name == name)).scalar()
        return bytes.fromhex(value)

    @staticmethod
    def _files_of_jobs(conn: Connection, ids: Any) -> set[str]:
        """Storage keys of the jobs ``ids`` selects: their outputs and previews."""
        keys = set(conn.execute(select(files.c.key).where(files.c.job_id.in_(ids))).scalars())
        for result in conn.execute(select(jobs.c.result).where(jobs.c.id.in_(ids))).scalars():
            keys.update(image["key"] for image in (result or {}).get("images", []) if image.get("key"))
        keys.update(conn.execute(select(job_logs.c.preview_key).where(
            job_logs.c.job_id.in_(ids), job_logs.c.preview_key.is_not(None))).scalars())
        return keys

    def expired_files(self, cutoff: datetime) -> list[str]:
        """Storage keys to delete for retention: files recorded before ``cutoff`` (uploads, outputs) and the
        outputs and previews of terminal jobs created before it."""
        old_jobs = select(jobs.c.id).where(jobs.c.created_at < cutoff, jobs.c.status.in_(TERMINAL))
        with self._read() as conn:
            keys = set(conn.execute(select(files.c.key).where(files.c.created_at < cutoff)).scalars())
            keys |= self._files_of_jobs(conn, old_jobs)
        return sorted(keys)

    def job_files(self, job_id: str) -> list[str]:
        """Storage keys of one job's outputs and previews."""
        with self._read() as conn:
            return sorted(self._files_of_jobs(conn, [job_id]))

    def forget_files(self, keys: list[str]) -> None:
        """Drop the ownership records of deleted files."""
        with self._write() as conn:
            for start in range(0, len(keys), 500):
                conn.execute(files.delete().where(files.c.key.in_(keys[start:start + 500])))
