"""The storage quota per API key: bytes of files the key keeps stored on the server.

What counts: every row of ``files`` the key owns, by its ``size`` (uploads through any dialect, the data URIs
and multipart images stored for its requests, training datasets). Outputs are not counted (the megapixel
quota bounds them); rows written before sizes were recorded count 0. A file is counted from the moment it is recorded, before its bytes are written, so concurrent uploads
of one key cannot pass the limit together: the check and the insert run in one write transaction (SQLite's
write lock serializes them; on PostgreSQL the key's row is locked ``FOR UPDATE``, as ``quotas.check`` does).
Servers without keys (owner NULL) and admin keys are not limited. Deleting files (retention, a deleted request)
frees the quota.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1024**2


class StorageQuotaExceeded(Exception):
    """Storing ``needed`` more bytes would take the key over ``limit`` (it holds ``used``)."""

    def __init__(self, used: int, needed: int, limit: int):
        self.used, self.needed, self.limit = used, needed, limit
        self.message = (f"This API key stores {used / MIB:.1f} MiB of files; {needed / MIB:.1f} MiB more would pass "
                        f"its storage quota of {limit / MIB:.1f} MiB (FLUXSERVE_MAX_STORAGE_MB_PER_KEY). Files are "
                        "freed when their requests are deleted or by retention (FLUXSERVE_RETENTION_HOURS).")
        super().__init__(self.message)


@dataclass(frozen=True)
class Usage:
    used: int  # bytes the key's files hold, this file's earlier size excluded
    exempt: bool  # an admin key, or no key


def usage(raw: Any, owner: str | None, key: str) -> Usage:
    """What ``owner`` stores apart from file ``key`` (on the store's raw write transaction ``raw``)."""
    if owner is None:
        return Usage(0, True)
    row = raw.execute("SELECT admin FROM api_keys WHERE id = ?", (owner,)).fetchone()
    if row is not None and row[0]:
        return Usage(0, True)
    if raw.postgres and row is not None:  # this key's other uploads wait here until this one commits
        raw.execute("SELECT id FROM api_keys WHERE id = ? FOR UPDATE", (owner,))
    used = raw.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE owner = ? AND key <> ?",
                       (owner, key)).fetchone()[0]
    return Usage(int(used), False)


def check(raw: Any, owner: str | None, key: str, size: int, limit: int | None) -> None:
    """Raise ``StorageQuotaExceeded`` unless ``owner`` may keep file ``key`` of ``size`` bytes."""
    if limit is None:
        return
    current = usage(raw, owner, key)
    if not current.exempt and current.used + size > limit:
        raise StorageQuotaExceeded(current.used, size, limit)
