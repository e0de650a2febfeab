"""Point the official ``fal_client`` Python package at a fluxserve server, over http or https, in one line::

    import fluxserve.compat.fal
    fluxserve.compat.fal.use("http://127.0.0.1:8000", key="key_...:...")  # key: optional on loopback

It patches the module globals fal_client reads on every call (its own tests do the same): the run and queue
URL formats (``{server}/run/`` and ``{server}/queue/``) and the REST and CDN URLs used by ``upload_file``, and
sets ``FAL_KEY``. Clients created before the call keep their cached credentials; create them after.
"""

from __future__ import annotations

import os


def use(server: str = "http://127.0.0.1:8000", key: str | None = None) -> None:
    """Send every ``fal_client`` call of this process to ``server``."""
    from fal_client import client

    server = server.rstrip("/")
    if "://" not in server:
        server = "http://" + server
    client.RUN_URL_FORMAT = f"{server}/run/"
    client.QUEUE_URL_FORMAT = f"{server}/queue/"
    client.REALTIME_URL_FORMAT = server.replace("http", "ws", 1) + "/run/"
    client.REST_URL = server
    client.CDN_URL = server
    os.environ["FAL_KEY"] = key or os.environ.get("FAL_KEY") or "fluxserve-local"
    # fal_client's module-level clients cache credentials, the HTTP client and the upload-token URL on first
    # use: forget them so the next call sees the new key and URLs.
    import fal_client

    for default in (fal_client.sync_client, fal_client.async_client):
        for name in ("_auth", "_client", "_token_manager"):
            default.__dict__.pop(name, None)
