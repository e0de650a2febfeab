"""The durable job queue: ``JobStore`` (SQLite or PostgreSQL), ``Worker`` threads and webhook delivery."""

from fluxserve.jobs.store import ApiKey, Job, JobStore, LogLine

__all__ = ["ApiKey", "Job", "JobStore", "LogLine"]
