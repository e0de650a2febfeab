"""Outbound fetches of caller-supplied URLs, against real local HTTP servers: internal addresses are refused
(also behind DNS names, IPv6 forms and redirects) without ever being contacted, the operator's allow list
opens them, downloads have a whole-download deadline and a byte cap, image headers are checked before
decoding, slow downloads do not hold up the API, and webhooks to internal addresses are not delivered."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image

from fluxserve import fetch, inputs
from fluxserve.config import Settings
from fluxserve.jobs.store import Job
from fluxserve.jobs.webhooks import WebhookSender
from fluxserve.request import InputError

pytest_plugins = ["db_fixtures"]


def png_bytes(width: int = 96, height: int = 80) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` with a few bytes of pixel data: decoding it would need gigabytes
    (or fail), reading its header needs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


class Site:
    """A real HTTP server on 127.0.0.1 whose answer is ``handler(request_handler)``; counts the requests."""

    def __init__(self, handler=None):
        self.hits: list[str] = []
        self.release = threading.Event()  # lets a slow answer finish early
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with site.arrived:
                    site.hits.append(self.path)
                    site.arrived.notify_all()
                (handler or Site.image)(site, self)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for_hits(self, count: int, timeout: float = 60) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.hits) >= count, timeout)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def image(site: Site, h: BaseHTTPRequestHandler, body: bytes | None = None) -> None:
        body = png_bytes() if body is None else body
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def tripwire() -> Iterator[Site]:
    """A server that must never be contacted."""
    site = Site()
    yield site
    site.close()


@pytest.fixture
def images() -> Iterator[Site]:
    site = Site()
    yield site
    site.close()


@pytest.fixture
def policy() -> Iterator[callable]:
    """``policy(**fields)`` makes a policy the process's for one test (the default refuses internal addresses);
    the previous one comes back afterwards."""
    previous = fetch.current()

    def use(**fields) -> fetch.FetchPolicy:
        chosen = replace(fetch.FetchPolicy(), **fields)
        fetch.configure(chosen)
        return chosen

    use()
    yield use
    fetch.configure(previous)


def refusal(ref: str) -> InputError:
    with pytest.raises(InputError) as info:
        inputs.load_references([ref], remote=True)
    return info.value


# ---- internal addresses --------------------------------------------------------------------------------
def test_internal_addresses_are_refused_with_one_message_and_never_contacted(policy, tripwire):
    port = tripwire.port
    urls = [
        f"http://127.0.0.1:{port}/metrics",  # the server's own port, in the reported problem
        f"http://localhost:{port}/",  # a host name that resolves to loopback
        f"http://127.1:{port}/",  # a short form the resolver expands to 127.0.0.1
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped IPv6
        f"http://[::ffff:7f00:1]:{port}/",
        f"http://0.0.0.0:{port}/",
        "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1:8080/",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fe80::1]/", "http://[fc00::1]/", "http://[fd12:3456::1]/",
        "http://100.64.0.1/",  # CGNAT
        "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://[::]/",
        "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",  # NAT64 and 6to4 forms of 127.0.0.1
        f"https://127.0.0.1:{port}/",
    ]
    for url in urls:
        error = refusal(url)
        assert error.field == "image_urls[0]", url
        assert error.message.endswith(fetch.REFUSED_MESSAGE), (url, error.message)
    assert tripwire.hits == []


def test_refused_and_closed_ports_look_the_same(policy, tripwire):
    closed = Site()
    closed.close()  # nothing listens there any more
    listening = refusal(f"http://127.0.0.1:{tripwire.port}/x").message.replace(str(tripwire.port), "PORT")
    silent = refusal(f"http://127.0.0.1:{closed.port}/x").message.replace(str(closed.port), "PORT")
    assert listening == silent
    assert tripwire.hits == []


def test_a_redirect_to_an_internal_address_is_refused(policy, images, tripwire):
    def redirect(site: Site, h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", f"http://127.0.0.1:{tripwire.port}/metrics")
        h.send_header("Content-Length", "0")
        h.end_headers()

    start = Site(redirect)
    try:
        policy(allow=fetch.parse_allow(f"127.0.0.1:{start.port}"))  # exactly the first server
        error = refusal(f"{start.url}/image.png")
        assert error.message.endswith(fetch.REFUSED_MESSAGE)
        assert start.hits == ["/image.png"]
        assert tripwire.hits == []
    finally:
        start.close()


def test_the_allow_list_opens_an_internal_address(policy, images):
    with pytest.raises(InputError):
        inputs.load_references([f"{images.url}/a.png"], remote=True)
    assert images.hits == []
    policy(allow=fetch.parse_allow("127.0.0.0/8"))
    image = inputs.load_references([f"{images.url}/a.png"], remote=True)[0]
    assert image.size == (96, 80)
    policy(allow=fetch.parse_allow(f"127.0.0.1:{images.port}"))
    assert inputs.load_references([f"http://localhost:{images.port}/b.png"], remote=True)[0].size == (96, 80)  # DNS
    assert images.hits == ["/a.png", "/b.png"]


def test_allow_list_syntax():
    rules = fetch.parse_allow(" 10.0.0.0/8, 192.168.1.5:8080 ,[fd00::/8]:443, ::1")
    assert [(str(r.network), r.port) for r in rules] == [
        ("10.0.0.0/8", None), ("192.168.1.5/32", 8080), ("fd00::/8", 443), ("::1/128", None)]
    for bad in ("10.0.0.0/33", "example.com", "10.0.0.1:0", "[fd00::/8]443"):
        with pytest.raises(ValueError, match="fetch allow list"):
            fetch.parse_allow(bad)
    settings = Settings.from_env(fetch_allow="10.0.0.0/8", fetch_deadline=5)
    assert fetch.FetchPolicy.from_settings(settings).allow == fetch.parse_allow("10.0.0.0/8")


def test_https_keeps_the_host_name_for_tls_while_connecting_to_the_checked_address(policy, tmp_path):
    """The connection goes to 127.0.0.1, the certificate (valid for ``localhost`` only, no IP address) is
    checked against the URL's host name: the TLS server name survives the pinning."""
    import ssl

    cert, key = certificate_for("localhost", tmp_path)
    site = Site()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    site.server.socket = context.wrap_socket(site.server.socket, server_side=True)
    policy(allow=fetch.parse_allow(f"127.0.0.1:{site.port}"))
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        with fetch.client(verify=trust) as http:
            response = http.get(f"https://localhost:{site.port}/tls.png")
            assert response.status_code == 200 and response.content == png_bytes()
            with pytest.raises(httpx.ConnectError):  # the same server by IP: the name does not match
                http.get(f"https://127.0.0.1:{site.port}/by-ip.png")
        assert site.hits == ["/tls.png"]
    finally:
        site.close()


def certificate_for(host: str, directory) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_lora_urls_are_checked_and_name_their_field(policy, tripwire, tmp_path):
    from fluxserve.engine.lora import resolve_lora

    with pytest.raises(InputError) as info:
        resolve_lora(f"http://localhost:{tripwire.port}/style.safetensors", tmp_path, "loras[1].path")
    assert info.value.field == "loras[1].path" and info.value.message.endswith(fetch.REFUSED_MESSAGE)
    assert tripwire.hits == []
    policy(allow=fetch.parse_allow(f"127.0.0.1:{tripwire.port}"), max_lora_bytes=1000)
    with pytest.raises(InputError) as info:  # allowed now; an HTML page or a PNG is no safetensors file
        resolve_lora(f"{tripwire.url}/style.safetensors", tmp_path, "loras[1].path")
    assert info.value.field == "loras[1].path" and "safetensors" in info.value.message
    assert tripwire.hits == ["/style.safetensors"]


def drip_body(site: Site, h: BaseHTTPRequestHandler, size: int = 120) -> None:
    """Announce ``size`` bytes, then send one every 0.5 s (a minute for 120) unless the site is released."""
    h.send_header("Content-Length", str(size))
    h.end_headers()
    for _ in range(size):
        h.wfile.write(b"x")
        h.wfile.flush()
        if site.release.wait(0.5):
            return


# ---- deadline and size ---------------------------------------------------------------------------------
def test_a_slow_drip_download_stops_at_the_whole_download_deadline(policy):
    def drip(site: Site, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        drip_body(site, h)

    slow = Site(drip)
    try:
        policy(allow=fetch.parse_allow(f"127.0.0.1:{slow.port}"), deadline_s=1.5)
        started = time.monotonic()
        error = refusal(f"{slow.url}/slow.png")
        elapsed = time.monotonic() - started
        assert error.message.endswith("the download did not finish within 1.5 s"), error.message
        assert elapsed < 30  # far below the 60 s the drip would take; a read timeout alone never fires
    finally:
        slow.close()


def test_a_silent_server_stops_at_the_deadline_too(policy):
    def silent(site: Site, h: BaseHTTPRequestHandler) -> None:
        site.release.wait(60)

    slow = Site(silent)
    try:
        policy(allow=fetch.parse_allow(f"127.0.0.1:{slow.port}"), deadline_s=1.0)
        assert refusal(f"{slow.url}/x.png").message.endswith("the download did not finish within 1 s")
    finally:
        slow.close()


def test_the_byte_cap_holds_with_and_without_a_declared_length(policy):
    def chunked(site: Site, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(64):
            h.wfile.write(b"400\r\n" + b"\0" * 1024 + b"\r\n")  # 1 KiB chunks, no length announced
        h.wfile.write(b"0\r\n\r\n")

    declared = Site(lambda site, h: Site.image(site, h, b"\0" * 20000))
    undeclared = Site(chunked)
    try:
        policy(allow=fetch.parse_allow("127.0.0.1"), max_reference_bytes=16 * 1024)
        for site in (declared, undeclared):
            message = refusal(f"{site.url}/big").message
            assert message.endswith("the file is larger than 0.015625 MiB"), message
    finally:
        declared.close()
        undeclared.close()


# ---- image headers before decoding ---------------------------------------------------------------------
def test_a_decompression_bomb_is_refused_from_its_header(policy, images):
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    site = Site(lambda s, h: Site.image(s, h, bomb))
    try:
        policy(allow=fetch.parse_allow("127.0.0.1"))
        error = refusal(f"{site.url}/bomb.png")
        assert error.field == "image_urls[0]"
        assert "in its header; a reference may have at most 14 MP" in error.message, error.message
        assert "could not decode" not in error.message
    finally:
        site.close()
    # between the per-image limit and Pillow's own guard: refused by the header check, which names the size
    medium = "data:image/png;base64," + __import__("base64").b64encode(png_header_only(5000, 4000)).decode()
    error = refusal(medium)
    assert "image is 5000x4000 (19.1 MP); a reference may have at most 14 MP" in error.message  # 1 MP = 1024^2
    assert "could not decode" not in error.message  # the truncated pixel data was never decoded


def test_references_are_refused_in_total_before_decoding():
    import base64

    uri = "data:image/png;base64," + base64.b64encode(png_header_only(3000, 2000)).decode()  # 5.7 MP each
    with pytest.raises(InputError) as info:
        inputs.load_references([uri, uri, uri], max_input_megapixels=14)
    assert info.value.field == "image_urls"
    assert "the reference images total 17.2 MP; at most 14 MP" in info.value.message
    with pytest.raises(InputError) as info:  # under the total they are decoded, and these cannot be
        inputs.load_references([uri, uri], max_input_megapixels=14)
    assert info.value.field == "image_urls[0]" and "could not decode" in info.value.message


# ---- the API while downloads are slow ------------------------------------------------------------------
@pytest.fixture(scope="module")
def hold_site() -> Iterator[Site]:
    """References that answer only once released."""

    def held(site: Site, h: BaseHTTPRequestHandler) -> None:
        site.release.wait(120)
        Site.image(site, h)

    site = Site(held)
    yield site
    site.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory, hold_site) -> Iterator[Server]:
    """A server that may fetch from ``hold_site`` only (not from itself), with the default policy otherwise."""
    previous = fetch.current()
    base = Settings(data_dir=tmp_path_factory.mktemp("fetch-api"), demo=True, device="cpu",
                    fetch_allow=f"127.0.0.1:{hold_site.port}")
    with Server(settings_for(base, "fetch"), start_workers=False) as server:
        yield server
    fetch.configure(previous)


def test_the_api_refuses_its_own_metrics_as_a_reference(api):
    for path in ("/fal-ai/flux-2/edit", "/fal-ai/flux-2-pro/edit"):
        response = httpx.post(f"{api.url}{path}", json={
            "prompt": "a cat", "image_urls": [f"{api.url}/metrics"]}, timeout=60)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"][-2:] == ["image_urls", 0]
        assert fetch.REFUSED_MESSAGE in detail["msg"]
    response = httpx.post(f"{api.url}/v1/images/edits", json={
        "model": "flux-2-dev", "prompt": "a cat", "images": [{"image_url": f"{api.url}/metrics"}]}, timeout=60)
    assert response.status_code == 400 and fetch.REFUSED_MESSAGE in response.text, response.text
    response = httpx.post(f"{api.url}/v1/models/black-forest-labs/flux-2-dev/predictions", json={
        "input": {"prompt": "a cat", "input_images": [f"http://localhost:{api.port}/metrics"]}}, timeout=60)
    assert response.status_code == 422 and fetch.REFUSED_MESSAGE in response.text, response.text
    assert "input.input_images.0" in response.text


def test_slow_references_do_not_hold_up_other_requests(api, hold_site):
    count = (os.cpu_count() or 1) + 6  # more than the server's default thread pool has threads
    results: list[int] = []

    def submit() -> None:
        response = httpx.post(f"{api.url}/queue/fal-ai/flux-2/edit", json={
            "prompt": "a cat", "image_urls": [f"{hold_site.url}/held-{len(results)}.png"]}, timeout=180)
        results.append(response.status_code)

    threads = [threading.Thread(target=submit, daemon=True) for _ in range(count)]
    try:
        for thread in threads:
            thread.start()
        expected = min(count, fetch.FetchPolicy.from_settings(api.settings).slots_per_key)
        assert hold_site.wait_for_hits(expected), hold_site.hits  # the caller's share of downloads is in flight
        upload = httpx.post(f"{api.url}/files/upload", content=png_bytes(),
                            headers={"content-type": "image/png"}, timeout=60)
        assert upload.status_code == 200, upload.text
        assert not hold_site.release.is_set() and results == []  # ... and still held
    finally:
        hold_site.release.set()
        for thread in threads:
            thread.join(180)
    assert results == [200] * count


# ---- webhooks ------------------------------------------------------------------------------------------
def test_a_webhook_to_an_internal_address_is_not_delivered_and_says_why(store, policy, tripwire):
    sender = WebhookSender(store, builders={"test": lambda job: (job.webhook["url"], {"id": job.id})})
    try:
        job: Job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                                webhook={"url": f"{tripwire.url}/hook", "dialect": "test"})
        assert store.claim("w").id == job.id
        assert store.complete(job.id, "w", {"images": []})
        assert sender.deliver_due() == 1
        record = store.delivery(job.id)
        assert record["status"] != "delivered" and fetch.REFUSED_MESSAGE in record["last_error"]
        assert tripwire.hits == []
        policy(allow=fetch.parse_allow(f"127.0.0.1:{tripwire.port}"))  # the operator allows it
        store.update_delivery(record["id"], next_attempt_at=record["created_at"])
        assert sender.deliver_due() == 1
        assert store.delivery(job.id)["status"] == "delivered" and tripwire.hits == ["/hook"]
    finally:
        sender.stop()


def test_the_command_line_sets_the_allow_list(policy):
    from fluxserve.cli import build_parser
    from fluxserve.commands.common import settings_from_args

    args = build_parser().parse_args(["serve", "--fetch-allow", "10.0.0.0/8,192.168.1.5:8080"])
    settings = settings_from_args(args)
    assert settings.fetch_allow == "10.0.0.0/8,192.168.1.5:8080"
    assert fetch.current().allow == fetch.parse_allow("10.0.0.0/8, 192.168.1.5:8080")
    with pytest.raises(SystemExit, match="fetch allow list"):
        settings_from_args(build_parser().parse_args(["serve", "--fetch-allow", "intranet"]))


def test_a_webhook_receiver_that_answers_slowly_is_cut_off_at_the_timeout(store, policy):
    def drip(site: Site, h: BaseHTTPRequestHandler) -> None:
        h.rfile.read(int(h.headers["Content-Length"]))
        h.send_response(200)
        drip_body(site, h)

    receiver = Site(drip)
    sender = WebhookSender(store, timeout=1.5, builders={"test": lambda job: (job.webhook["url"], {"id": job.id})})
    try:
        policy(allow=fetch.parse_allow(f"127.0.0.1:{receiver.port}"))
        job: Job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                                webhook={"url": f"{receiver.url}/hook", "dialect": "test"})
        assert store.claim("w").id == job.id
        assert store.complete(job.id, "w", {"images": []})
        started = time.monotonic()
        assert sender.deliver_due() == 1
        assert time.monotonic() - started < 30  # not the 60 s the receiver would take
        record = store.delivery(job.id)
        assert record["status"] != "delivered" and "ReadTimeout" in record["last_error"], record
        assert receiver.hits == ["/hook"]
    finally:
        sender.stop()
        receiver.close()


def test_own_files_are_read_from_storage_not_fetched(api):
    """This server's own file URLs (an upload, an earlier output) are references that the address guard would
    refuse over HTTP (the server listens on loopback); every dialect reads them from storage instead."""
    with httpx.Client(timeout=60) as client:
        started = client.post(f"{api.url}/storage/upload/initiate",
                              json={"file_name": "ref.png", "content_type": "image/png"}).json()
        assert client.put(started["upload_url"], content=png_bytes(),
                          headers={"Content-Type": "image/png"}).status_code == 200
        own = started["file_url"]
        created = client.post(f"{api.url}/v1/models/black-forest-labs/flux-2-dev/predictions",
                              json={"input": {"prompt": "a cat", "input_images": [own]}})
        assert created.status_code == 201, created.text
        assert created.json()["input"]["input_images"] == [own]  # the caller's input is echoed as sent
        queued = client.post(f"{api.url}/queue/fal-ai/flux-2/edit", json={"prompt": "a cat", "image_urls": [own]})
        assert queued.status_code == 200, queued.text
        missing = f"{api.url}/files/uploads/none.png"
        response = client.post(f"{api.url}/v1/models/black-forest-labs/flux-2-dev/predictions",
                               json={"input": {"prompt": "a cat", "input_images": [missing]}})
        assert response.status_code == 422 and "input.input_images.0" in response.text
        assert "not found on this server" in response.text and fetch.REFUSED_MESSAGE not in response.text
        response = client.post(f"{api.url}/v1/images/edits", json={
            "model": "flux-2-dev", "prompt": "a cat", "images": [{"image_url": missing}]})
        assert response.status_code == 400 and "not found on this server" in response.text, response.text
