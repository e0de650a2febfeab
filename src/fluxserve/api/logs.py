"""Access logs without secrets: query values that carry credentials or callback URLs are redacted.

fal clients put their webhook URL in the query string (``?fal_webhook=https://...``, which may embed a token of
the caller's own), signed file URLs carry ``?token=...``; uvicorn's access log would print them verbatim.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = re.compile(r"webhook|token|key|secret|signature|sig|credential|password|auth", re.IGNORECASE)
REDACTED = "REDACTED"


def redact_query(path: str) -> str:
    """``path`` with the values of secret-looking query parameters replaced by ``REDACTED``."""
    parts = urlsplit(path)
    if not parts.query:
        return path
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    redacted = [(name, REDACTED if SECRET_PARAMS.search(name) else value) for name, value in pairs]
    return urlunsplit(parts._replace(query=urlencode(redacted, safe="/:")))


class RedactQuery(logging.Filter):
    """A filter for uvicorn's access logger, whose records carry (client, method, path, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())
