"""The job-store tables (SQLAlchemy Core): the same schema on SQLite and PostgreSQL.

Times are stored as naive UTC (``UTCDateTime``) and come back timezone-aware, so comparisons in SQL are
plain and identical on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData()

# priority -> rank; a lower rank runs first
PRIORITY_RANKS = {"normal": 0, "low": 1}


class UTCDateTime(TypeDecorator):
    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


# an integer primary key that autoincrements on both databases (SQLite needs INTEGER for its rowid alias)
AutoId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("endpoint", String(200), nullable=False),
    Column("dialect", String(32), nullable=False),
    Column("model", String(100), nullable=False, default=""),
    Column("status", String(16), nullable=False),  # queued | running | completed | failed | cancelled
    Column("priority", String(16), nullable=False, default="normal"),
    Column("priority_rank", SmallInteger, nullable=False, default=0),
    Column("request", JSON(none_as_null=True), nullable=True),
    Column("input", JSON(none_as_null=True), nullable=True),
    Column("result", JSON(none_as_null=True), nullable=True),
    Column("error", Text, nullable=True),
    Column("error_type", String(64), nullable=True),
    Column("error_detail", JSON(none_as_null=True), nullable=True),  # e.g. {"field": ..., "message": ...} for validation errors
    Column("step", Integer, nullable=True),
    Column("total_steps", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("worker_id", String(200), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_s", Float, nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("timeout_at", UTCDateTime, nullable=True),
    Column("store_io", Boolean, nullable=False, default=True),
    Column("webhook", JSON(none_as_null=True), nullable=True),
    # the API key that submitted the job (its id); NULL when the API ran without keys (single-user local use)
    Column("owner", String(64), nullable=True),
    # the server process holding a synchronous caller's connection (None: the caller polls, or may come back)
    Column("caller", String(200), nullable=True),
    # when the worker reported the job's first progress event (its first progress log line)
    Column("first_progress_at", UTCDateTime, nullable=True),
    # what a worker does with it: "generate" (a GenerationRequest) or "train" (a TrainingRequest)
    Column("kind", String(16), nullable=False, server_default=text("'generate'")),
    Index("ix_jobs_claim", "status", "priority_rank", "created_at"),
    Index("ix_jobs_dialect_created", "dialect", "created_at"),
    Index("ix_jobs_created", "created_at"),
    Index("ix_jobs_endpoint_created", "endpoint", "created_at"),  # a request history by endpoint
    Index("ix_jobs_owner_created", "owner", "created_at"),  # one key's jobs
    # fair scheduling (fluxserve.jobs.fairness): the keys with queued jobs, each one's oldest, its last start
    # (partial on PostgreSQL: only queued jobs, small however long the history, so its planner takes it; SQLite's
    # planner, without statistics, prefers the claim index over a partial one and takes this one whole)
    Index("ix_jobs_owner_queue", "status", "owner", "priority_rank", "created_at", "id",
          postgresql_where=text("status = 'queued'")),
    Index("ix_jobs_owner_started", "owner", "started_at"),
)

job_logs = Table(
    "job_logs",
    metadata,
    Column("seq", AutoId, primary_key=True, autoincrement=True),  # increases across all jobs
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("timestamp", UTCDateTime, nullable=False),
    Column("level", String(16), nullable=False, default="INFO"),
    Column("message", Text, nullable=False),
    Column("preview_key", String(512), nullable=True),
    Index("ix_job_logs_job_seq", "job_id", "seq"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, default=""),
    Column("secret_hash", String(128), nullable=False, unique=True),  # sha256 hex of the secret
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    # a revoked key the operator released (``fluxserve keys keyless``): a loopback server needs keys while any
    # key is not released, so revoking every key never makes it keyless by itself
    Column("released_at", UTCDateTime, nullable=True),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("admin", Boolean, nullable=False, server_default=text("false")),  # sees every key's jobs and files
    # quotas (fluxserve.jobs.quotas); NULL: unlimited
    Column("max_concurrent", Integer, nullable=True),  # queued + running jobs at once
    Column("rpm", Integer, nullable=True),  # jobs submitted in any 60 s
    Column("mp_per_day", Integer, nullable=True),  # billed megapixels in any 24 h
)

# Files that belong to a key: uploads, and the outputs and previews of its jobs (``owner`` NULL: no keys).
files = Table(
    "files",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("owner", String(64), nullable=True),
    Column("job_id", String(64), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("size", BigInteger, nullable=True),  # bytes, for the storage quota (jobs.file_quota); NULL: unknown
    Index("ix_files_created", "created_at"),
    Index("ix_files_owner", "owner"),
)

# Server-side secrets shared by every API replica (e.g. the key that signs file URLs).
secrets = Table(
    "secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("dialect", String(32), nullable=False),
    Column("status", String(16), nullable=False, default="pending"),  # pending | delivered | failed | skipped
    Column("url", Text, nullable=True),  # filled from the payload builder on the first attempt
    Column("body", JSON(none_as_null=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Index("ix_webhook_due", "status", "next_attempt_at"),
)


# Replicate's ``start`` / ``logs`` / ``output`` webhooks: each a durable delivery like the terminal one, sent in
# order per job (a row waits while an earlier row of its job is pending). ``body`` is the prediction as it was
# when the event happened; a pending ``logs`` row not yet attempted is updated in place by newer logs.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("dialect", String(32), nullable=False),
    Column("event", String(16), nullable=False),  # start | logs | output
    Column("status", String(16), nullable=False, default="pending"),  # pending | delivered | failed | skipped
    Column("url", Text, nullable=False),
    Column("body", JSON(none_as_null=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Index("ix_webhook_events_due", "status", "next_attempt_at"),
    Index("ix_webhook_events_job", "job_id", "id"),
)

# Webhook signing keys, generated on first use and shared by every process on the store: the fal ED25519
# private key and the Replicate (Standard Webhooks) ``whsec_`` secret.
webhook_keys = Table(
    "webhook_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)


# What each finished job bills (fluxserve.usage's rules), written in the transaction that makes the job terminal.
# Kept when retention deletes the job (no foreign key): usage reports outlive the requests and their files.
job_usage = Table(
    "job_usage",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("owner", String(64), nullable=True),  # the API key's id; NULL when the API ran without keys
    Column("endpoint", String(200), nullable=False),
    Column("model", String(100), nullable=False, default=""),
    Column("dialect", String(32), nullable=False),
    Column("status", String(16), nullable=False),  # completed | failed | cancelled
    Column("finished_at", UTCDateTime, nullable=False),
    Column("input_images", Integer, nullable=False, default=0),
    Column("input_megapixels", Integer, nullable=False, default=0),
    Column("output_images", Integer, nullable=False, default=0),
    Column("output_megapixels", Integer, nullable=False, default=0),
    Column("megapixels", Integer, nullable=False, default=0),  # input + output; 0 unless completed
    Column("gpu_seconds", Float, nullable=False, default=0.0),  # the engine's time on the job, billed or not
    Column("steps", Integer, nullable=False, default=0),  # denoising steps run
    # who served it: "local" (this server's GPUs) or the gateway's upstream provider; NULL for a request the
    # gateway could not get served, and for rows written before the column existed
    Column("provider", String(32), nullable=True),
    Index("ix_job_usage_finished", "finished_at"),
    Index("ix_job_usage_owner_finished", "owner", "finished_at"),
)

# One row per request the gateway sent to a provider (a route tried): what /api/stats?group_by=provider reads.
upstream_calls = Table(
    "upstream_calls",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False),
    Column("owner", String(64), nullable=True),
    Column("endpoint", String(200), nullable=False),
    Column("provider", String(32), nullable=False),  # fal | replicate
    Column("target", String(200), nullable=False),  # the provider's endpoint or model
    Column("started_at", UTCDateTime, nullable=False),
    Column("answered_at", UTCDateTime, nullable=True),  # the provider's result was ready (before the download)
    Column("ended_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),  # served | failed (next route tried) | refused (4xx) | cancelled
    Column("error", Text, nullable=True),
    Index("ix_upstream_calls_started", "started_at"),
)

# Columns added to a table after it first shipped: ``JobStore`` adds each one that an existing database lacks
# (``ALTER TABLE ... ADD COLUMN``), so a data directory or PostgreSQL database made by an older fluxserve keeps
# working. Every entry must be nullable or have a ``server_default``; declare the column in its table above too.
ADDED_COLUMNS: list[tuple[str, str]] = [  # (table, column)
    ("jobs", "owner"), ("api_keys", "admin"), ("jobs", "caller"), ("jobs", "first_progress_at"),
    ("api_keys", "max_concurrent"), ("api_keys", "rpm"), ("api_keys", "mp_per_day"), ("jobs", "kind"),
    ("job_usage", "provider"), ("api_keys", "released_at"), ("files", "size"),
]
