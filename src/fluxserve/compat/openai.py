"""Point the official ``openai`` package at a fluxserve server::

    from fluxserve.compat.openai import client
    images = client("http://127.0.0.1:8000", key="...").images.generate(model="flux-2-dev", prompt="...")

Nothing is patched: the SDK only needs ``base_url`` (the server + ``/v1``) and an API key (always sent as
``Authorization: Bearer``; on loopback without keys any string passes). ``OPENAI_BASE_URL`` works the same.
"""

from __future__ import annotations

from typing import Any


def base_url(server: str) -> str:
    server = server.rstrip("/")
    if "://" not in server:
        server = "http://" + server
    return server if server.endswith("/v1") else server + "/v1"


def client(server: str = "http://127.0.0.1:8000", key: str | None = None, **kwargs: Any):
    """An ``openai.OpenAI`` client for ``server``."""
    from openai import OpenAI

    return OpenAI(base_url=base_url(server), api_key=key or "fluxserve-local", **kwargs)
