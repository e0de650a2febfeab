"""Secrets stay out of banners and logs: database passwords masked, webhook URLs and tokens redacted from the
access log, checked on a real ``fluxserve serve`` process."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time

import httpx
import pytest
from db_fixtures import PG_URL, fresh_schema
from fal_helpers import free_port
from PIL import Image

from fluxserve.api.logs import RedactSecrets, redact_path
from fluxserve.config import masked_url

pytest_plugins = ["db_fixtures"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_masked_url():
    assert masked_url("postgresql+psycopg://u:hunter2@db.internal:5432/jobs") == \
        "postgresql+psycopg://u:***@db.internal:5432/jobs"
    assert masked_url("postgresql://u@db/jobs") == "postgresql://u@db/jobs"
    assert masked_url("sqlite:////data/fluxserve.db") == "sqlite:////data/fluxserve.db"
    assert "hunter2" not in masked_url("postgresql://u:hunter2@[::1]:5432/x")


def test_every_credential_in_a_database_url_is_masked():
    url = ("postgresql+psycopg://u@db.internal:5432/jobs?sslmode=require&password=hunter2&sslpassword=open%20sesame"
           "&passfile=/home/u/.pgpass&options=-csearch_path%3Dx")
    shown = masked_url(url)
    assert "hunter2" not in shown and "sesame" not in shown and ".pgpass" not in shown
    assert shown == ("postgresql+psycopg://u@db.internal:5432/jobs?sslmode=require&password=***&sslpassword=***"
                     "&passfile=***&options=-csearch_path%3Dx")
    assert masked_url("postgresql://:hunter2@db/x?PASSWORD=hunter2") == "postgresql://:***@db/x?PASSWORD=***"
    assert "hunter2" not in masked_url("postgresql://u:hunter2@db:notaport/x")


def test_the_stores_repr_and_the_worker_banner_mask_the_password(demo_data_dir, pg_url, tmp_path):
    from fluxserve.jobs.store import JobStore

    url = pg_url + "&password=hunter2"  # trust auth ignores the password
    store = JobStore(url)
    try:
        assert "hunter2" not in repr(store) and "password=***" in repr(store)
    finally:
        store.close()
    done = subprocess.run([sys.executable, "-m", "fluxserve", "worker", "--demo", "--once", "--data-dir",
                           str(demo_data_dir), "--storage", str(tmp_path / "files"), "--db", url],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "fluxserve worker:" in output and "password=***" in output and "hunter2" not in output


def test_redact_path_and_the_log_filter():
    path = "/queue/fal-ai/flux-2?fal_webhook=https%3A%2F%2Fme.example%2Fhook%3Ftoken%3Ds3cret&x=1"
    redacted = redact_path(path)
    assert "s3cret" not in redacted and "me.example" not in redacted
    assert "fal_webhook=REDACTED" in redacted and "x=1" in redacted
    assert redact_path("/files/outputs/a.png?token=abc.def") == "/files/outputs/a.png?token=REDACTED"
    assert redact_path("/health") == "/health"
    assert redact_path("/storage/upload/eyJrIjoxfQ.c2ln") == "/storage/upload/REDACTED"  # a token in the path
    assert redact_path("/storage/upload/initiate?storage_type=fal-cdn-v3") == \
        "/storage/upload/initiate?storage_type=fal-cdn-v3"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", path, "1.1", 200), None)
    assert RedactSecrets().filter(record) and "s3cret" not in record.getMessage()


@pytest.fixture
def empty_pg_url():
    """A PostgreSQL schema of this test's own: no key that other tests left makes the server keyed."""
    with fresh_schema(PG_URL) as url:
        yield url


def test_serve_banner_and_access_log_keep_secrets(demo_data_dir, empty_pg_url):
    url = empty_pg_url.replace("postgres@", "postgres:hunter2@") + "&password=hunter2"  # trust auth ignores them
    assert "hunter2" in url
    port = free_port()
    cmd = [sys.executable, "-m", "fluxserve", "serve", "--demo", "--no-workers", "--access-log", "--port", str(port),
           "--data-dir", str(demo_data_dir), "--db", url]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        hook = "https://me.example/hook?token=s3cret"
        response = httpx.post(f"http://127.0.0.1:{port}/queue/fal-ai/flux-2/flash",
                              params={"fal_webhook": hook}, json={"prompt": "a fox"}, timeout=30)
        assert response.status_code == 200, response.text
        initiated = httpx.post(f"http://127.0.0.1:{port}/storage/upload/initiate", timeout=30,
                               json={"file_name": "a.png", "content_type": "image/png"})
        assert initiated.status_code == 200, initiated.text
        upload_url = initiated.json()["upload_url"]
        token = upload_url.rsplit("/", 1)[-1]
        put = httpx.put(upload_url, content=_png(), headers={"Content-Type": "image/png"}, timeout=30)
        assert put.status_code == 200, put.text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert "postgres:***@" in output and "password=***" in output and "hunter2" not in output
    assert "PUT /storage/upload/REDACTED" in output and token not in output
    assert "fal_webhook=REDACTED" in output and "s3cret" not in output and "me.example" not in output


def test_a_key_revoked_in_another_process_is_refused_at_once(tmp_path, demo_data_dir):
    """A key revoked by `fluxserve keys revoke` (another process sharing the store) stops working on a running
    server within the revocation check interval, although the server had just verified it."""
    from fal_helpers import Server

    from fluxserve.config import Settings

    settings = Settings(data_dir=tmp_path, demo=True, device="cpu", db=f"sqlite:///{tmp_path / 'keys.db'}")
    with Server(settings, start_workers=False, auth_required=True) as server:
        key_id, secret = server.store.create_key("team")
        url = f"{server.url}/queue/fal-ai/flux-2/flash/requests/nope/status"
        headers = {"Authorization": f"Key {secret}"}
        assert httpx.get(url, headers=headers).status_code == 404  # verified (and cached): the job does not exist
        done = subprocess.run([sys.executable, "-m", "fluxserve", "keys", "revoke", key_id, "--db",
                               settings.db_url], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        time.sleep(0.3)  # the server reads the store's revocation count at most every 0.1 s
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, refused.text
        assert httpx.post(f"{server.url}/queue/fal-ai/flux-2/flash", json={"prompt": "a"},
                          headers=headers).status_code == 401
