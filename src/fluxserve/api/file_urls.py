"""Signed file URLs: ``/files/{key}?token=<expiry>.<signature>``.

Every file URL the API hands out (results, uploads, previews, history) carries a token that lets anyone holding
the URL download that one file until it expires, without an ``Authorization`` header: ``<img src>`` in the
playground, the official clients' downloads, webhook receivers. The signing secret is kept in the job store
(``JobStore.secret``), so URLs keep working after a restart and on every API replica sharing the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote

DEFAULT_TTL_S = 7 * 24 * 3600.0

_secret: bytes | None = None
_ttl_s = DEFAULT_TTL_S


def configure(secret: bytes, ttl_s: float = DEFAULT_TTL_S) -> None:
    """Set this server's signing secret and how long a signed URL works (``FLUXSERVE_FILE_URL_HOURS``)."""
    global _secret, _ttl_s
    _secret, _ttl_s = secret, ttl_s


def _mac(key: str, expires: int) -> str:
    assert _secret is not None
    digest = hmac.new(_secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token(key: str, ttl_s: float | None = None) -> str | None:
    """A download token for stored file ``key`` (None when no secret is configured)."""
    if _secret is None:
        return None
    expires = int(time.time() + (_ttl_s if ttl_s is None else ttl_s))
    return f"{expires}.{_mac(key, expires)}"


def check(token_value: str | None, key: str) -> bool:
    """True when ``token_value`` was made for ``key`` by this server and has not expired."""
    if not token_value or _secret is None:
        return False
    expires, _, mac = token_value.partition(".")
    if not (expires.isascii() and expires.isdigit()) or int(expires) < time.time():  # int('²') fails
        return False
    return hmac.compare_digest(mac, _mac(key, int(expires)))


def file_url(base: str, key: str) -> str:
    """The absolute, signed URL of a stored file under ``base``."""
    signed = token(key)
    url = f"{base}/files/{quote(key)}"
    return f"{url}?token={signed}" if signed else url
