"""A real fluxserve server for the API tests: uvicorn on a free port in a background thread, over http or
https (a self-signed certificate for 127.0.0.1 made with ``cryptography``), on the demo models."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Self

import uvicorn

from fluxserve.api.app import create_app
from fluxserve.config import Settings

SMALL = {"image_size": {"width": 512, "height": 512}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class Server:
    """``with Server(settings) as server: server.url``; ``start_workers=False`` keeps jobs queued."""

    def __init__(self, settings: Settings, *, start_workers: bool = True, tls: tuple[Path, Path] | None = None,
                 auth_required: bool | None = None):
        self.settings = settings
        self.app = create_app(settings, start_workers=start_workers)
        if auth_required is not None:
            self.app.state.auth.required = auth_required
        self.port = free_port()
        self.tls = tls
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def store(self):
        return self.app.state.store

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def settings_for(base: Settings, name: str) -> Settings:
    """Same data dir (so the demo weights are built once), its own database and file storage."""
    root = Path(base.data_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    return replace(base, db=f"sqlite:///{root / 'jobs.db'}", storage=str(root / "files"))
