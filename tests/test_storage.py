"""Storage: a real local directory, and S3Storage against a real S3 HTTP server (moto_server on a free port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluxserve.storage import LocalStorage, S3Storage, open_storage

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def test_local_put_get_delete(tmp_path):
    storage = open_storage(str(tmp_path / "files"))
    assert isinstance(storage, LocalStorage)
    key = storage.put(PNG, "image/png")
    assert key.startswith("outputs/") and key.endswith(".png")
    assert len(key.split("/")) == 5  # outputs/YYYY/MM/DD/<uuid>.png
    assert storage.exists(key)
    assert storage.get(key) == (PNG, "image/png")
    assert (tmp_path / "files" / key).read_bytes() == PNG
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(KeyError):
        storage.get(key)
    storage.delete(key)  # deleting twice is fine


def test_local_prefix_filename_and_content_types(tmp_path):
    storage = LocalStorage(tmp_path)
    jpeg = storage.put(b"jpeg", "image/jpeg", prefix="previews")
    assert jpeg.startswith("previews/") and jpeg.endswith(".jpg")
    assert storage.get(jpeg)[1] == "image/jpeg"
    named = storage.put(b"data", "image/webp", prefix="uploads", filename="../My Photo (1).webp")
    assert named.startswith("uploads/") and named.endswith("/My-Photo-1-.webp")
    assert storage.get(named) == (b"data", "image/webp")
    odd = storage.put(b"{}", "application/x-custom", prefix="uploads", filename="thing.bin")
    assert storage.get(odd) == (b"{}", "application/x-custom")  # from the sidecar
    unknown = storage.put(b"x", "application/x-custom")
    assert storage.get(unknown)[1] == "application/x-custom"


def test_local_writes_leave_no_temporary_files(tmp_path):
    storage = LocalStorage(tmp_path)
    for _ in range(5):
        storage.put(PNG, "image/png")
    leftovers = [p for p in Path(tmp_path).rglob(".tmp-*")]
    assert leftovers == []


@pytest.mark.parametrize("key", ["../etc/passwd", "/etc/passwd", "outputs/../../x", "a//b", "", "a/.hidden",
                                 "outputs/x.png.content-type", "outputs/%2e%2e/x"])
def test_local_rejects_keys_outside_the_root(tmp_path, key):
    storage = LocalStorage(tmp_path / "root")
    (tmp_path / "x").write_text("secret")
    with pytest.raises(KeyError):
        storage.get(key)
    assert storage.exists(key) is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto_server) on a free loopback port."""
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("FLUXSERVE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    bucket = f"fluxserve-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def test_s3_put_get_delete(s3_env):
    storage = open_storage(f"s3://{s3_env}/some/prefix")
    assert isinstance(storage, S3Storage)
    key = storage.put(PNG, "image/png")
    assert key.startswith("outputs/") and key.endswith(".png")
    assert storage.exists(key)
    assert storage.get(key) == (PNG, "image/png")
    # the object really is under the prefix in the bucket
    listed = storage.client.list_objects_v2(Bucket=s3_env)["Contents"]
    assert [obj["Key"] for obj in listed] == [f"some/prefix/{key}"]
    named = storage.put(b"abc", "application/x-custom", prefix="uploads", filename="a.bin")
    assert storage.get(named) == (b"abc", "application/x-custom")
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(KeyError):
        storage.get(key)
    assert storage.exists("../bad") is False


def test_s3_url_must_name_a_bucket():
    with pytest.raises(ValueError, match="bucket"):
        S3Storage.from_url("s3://")
