"""Once a key has been created, a loopback server stays keyed: revoking every key refuses every caller until the
operator runs ``fluxserve keys keyless``; a revoked key stops working at once in the process that revoked it and
within the store's read interval in every other process. Real servers on SQLite and PostgreSQL, keys managed
with the ``fluxserve keys`` command as an operator does (its own store: another process's view)."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest
from fal_helpers import SMALL, Server

from fluxserve.cli import main

pytest_plugins = ["db_fixtures"]

FLASH = "fal-ai/flux-2/flash"


def keys(capsys, db_url: str, *args: str) -> tuple[int, str]:
    """``fluxserve keys ARGS --db DB``: (exit code, stdout + stderr)."""
    code = main(["keys", *args, "--db", db_url])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def create(capsys, db_url: str, name: str) -> tuple[str, str]:
    code = main(["keys", "create", "--name", name, "--db", db_url])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    secret = captured.out.strip()  # the secret alone on stdout
    return secret.split(":", 1)[0], secret


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


def until(predicate, seconds: float, what: str) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


@pytest.fixture
def loopback(db_url, demo_settings, tmp_path):
    """A loopback server that decides by itself whether keys are needed (as ``fluxserve serve`` on 127.0.0.1)."""
    with Server(replace(demo_settings, db=db_url, storage=str(tmp_path / "files"))) as server:
        yield server


def test_revoking_every_key_keeps_a_loopback_server_keyed(loopback, db_url, capsys):
    only_id, only = create(capsys, db_url, "only")
    other_id, other = create(capsys, db_url, "other")
    history = f"{loopback.url}/api/history"
    until(lambda: httpx.get(history).status_code == 401, 10, "the new keys are required")
    submitted = httpx.post(f"{loopback.url}/queue/{FLASH}", json={"prompt": "a secret fox", **SMALL},
                           headers=auth(only), timeout=60)
    assert submitted.status_code == 200, submitted.text
    result_url = submitted.json()["response_url"]
    until(lambda: httpx.get(result_url, headers=auth(only), timeout=60).status_code == 200, 180, "the job ran")

    assert keys(capsys, db_url, "revoke", other_id)[0] == 0
    until(lambda: httpx.get(history, headers=auth(other)).status_code == 401, 10, "the revoked key is refused")
    assert httpx.get(history, headers=auth(only)).status_code == 200
    assert keys(capsys, db_url, "revoke", only_id)[0] == 0

    # longer than any cache the API keeps: nothing opens, neither for callers without a key nor the revoked keys
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert httpx.get(history).status_code == 401
        assert httpx.get(result_url).status_code == 401
        assert httpx.get(history, headers=auth(only)).status_code == 401
        assert httpx.post(f"{loopback.url}/queue/{FLASH}", json={"prompt": "x"}).status_code == 401
        time.sleep(0.2)
    code, out = keys(capsys, db_url, "list")
    assert code == 0 and "fluxserve keys keyless" in out  # the listing says how the server stands

    # the operator says so: keyless again, in every process on the store
    code, out = keys(capsys, db_url, "keyless")
    assert code == 0, out
    until(lambda: httpx.get(history).status_code == 200, 10, "keyless after `fluxserve keys keyless`")
    assert "a secret fox" in httpx.get(history).text
    # a new key makes it keyed again, and `keyless` is refused while a key is active
    _, fresh = create(capsys, db_url, "fresh")
    until(lambda: httpx.get(history).status_code == 401, 10, "keyed again after a new key")
    assert httpx.get(history, headers=auth(fresh)).status_code == 200
    code, out = keys(capsys, db_url, "keyless")
    assert code == 1 and "active" in out
    assert httpx.get(history).status_code == 401


def test_a_key_revoked_in_this_process_fails_at_once(loopback):
    key_id, secret = loopback.store.create_key("team")
    status = f"{loopback.url}/queue/{FLASH}/requests/nope/status"
    history = f"{loopback.url}/api/history"
    assert httpx.get(history).status_code == 401  # a key created in this process: required at once
    assert httpx.get(status, headers=auth(secret)).status_code == 404  # verified (and cached)
    assert httpx.get(history, headers=auth(secret)).status_code == 200
    assert loopback.store.revoke_key(key_id)
    assert httpx.get(status, headers=auth(secret)).status_code == 401  # the status fast path included
    assert httpx.get(history, headers=auth(secret)).status_code == 401
    assert httpx.get(history).status_code == 401


def test_a_key_revoked_through_another_replica_fails_within_the_read_interval(db_url, demo_settings, tmp_path):
    """Two API replicas on one store: a key revoked through one is refused by the other within a bound twenty times
    the 0.1 s interval at which each reads the store's key counts."""
    settings = replace(demo_settings, db=db_url, storage=str(tmp_path / "files"))
    with Server(settings, start_workers=False) as first, Server(settings, start_workers=False) as second:
        key_id, secret = first.store.create_key("team")
        kept_id, kept = first.store.create_key("kept")
        url = f"{second.url}/api/history"
        until(lambda: httpx.get(url).status_code == 401, 2.0, "the other replica sees the new key")
        assert httpx.get(url, headers=auth(secret)).status_code == 200  # verified (and cached) there
        assert first.store.revoke_key(key_id)
        until(lambda: httpx.get(url, headers=auth(secret)).status_code == 401, 2.0, "refused by the other replica")
        assert httpx.get(url, headers=auth(kept)).status_code == 200 and kept_id
