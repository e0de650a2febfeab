"""Point the official ``replicate`` package at a fluxserve server::

    from fluxserve.compat.replicate import client
    url = client("http://127.0.0.1:8000", key="...").run("black-forest-labs/flux-2-dev", input={"prompt": "..."})

The v1 client prefixes ``/v1`` itself, so its base URL is the bare server (``REPLICATE_BASE_URL`` works the
same); the v2 client's base URL is the server + ``/v1``. Both land on the same routes.
"""

from __future__ import annotations

from typing import Any


def client(server: str = "http://127.0.0.1:8000", key: str | None = None, **kwargs: Any):
    """A ``replicate.Client`` for ``server``."""
    import replicate

    server = server.rstrip("/")
    if "://" not in server:
        server = "http://" + server
    return replicate.Client(api_token=key or "fluxserve-local", base_url=server.removesuffix("/v1"), **kwargs)
