"""Access logs without secrets: query values that carry credentials or callback URLs, and tokens in paths, are
redacted.

fal clients put their webhook URL in the query string (``?fal_webhook=https://...``, which may embed a token of
the caller's own), signed file URLs carry ``?token=...``, and an initiated upload's ``PUT /storage/upload/<token>``
carries its token in the path (whoever holds it may write the file); uvicorn's access log would print them
verbatim.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = re.compile(r"webhook|token|key|secret|signature|sig|credential|password|auth", re.IGNORECASE)
REDACTED = "REDACTED"
# path segments that are tokens: the upload URL of ``POST /storage/upload/initiate`` (api/files.py)
SECRET_SEGMENTS = re.compile(r"(/storage/upload/)(?!initiate(?:$|[/?#]))[^/?#]+")


def redact_path(path: str) -> str:
    """``path`` with the values of secret-looking query parameters, and the tokens in paths, replaced by
    ``REDACTED``."""
    path = SECRET_SEGMENTS.sub(rf"\g<1>{REDACTED}", path)
    parts = urlsplit(path)
    if not parts.query:
        return path
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    redacted = [(name, REDACTED if SECRET_PARAMS.search(name) else value) for name, value in pairs]
    return urlunsplit(parts._replace(query=urlencode(redacted, safe="/:")))


class RedactSecrets(logging.Filter):
    """A filter for uvicorn's access logger, whose records carry (client, method, path, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
