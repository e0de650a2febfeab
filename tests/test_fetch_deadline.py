"""One deadline for a whole outbound exchange, connect to last byte, redirects included: hosts on 127.0.0.1 that
drip their response headers (the read timeout of each read never fires) are cut off at the deadline for
references, LoRAs, training datasets and webhooks. Every bound asserted is many times what the deadline
needs and far below what the drip takes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from slow_hosts import SlowHost, drip_headers

from fluxserve import fetch, inputs
from fluxserve.jobs.store import Job
from fluxserve.jobs.webhooks import WebhookSender
from fluxserve.request import InputError

pytest_plugins = ["db_fixtures"]

DRIP_S = 60  # how long each slow host drips: a bug shows as a wait of about this long
BOUND_S = 30  # what the tests allow; the deadlines they set are 1.5 to 2.5 s


@pytest.fixture
def policy() -> Iterator[callable]:
    """``policy(**fields)``: the process's fetch policy for one test (loopback allowed), restored after."""
    previous = fetch.current()

    def use(**fields) -> fetch.FetchPolicy:
        chosen = replace(fetch.FetchPolicy(), allow=fetch.parse_allow("127.0.0.1"), **fields)
        fetch.configure(chosen)
        return chosen

    use()
    yield use
    fetch.configure(previous)


def timed(fn, *args, **kwargs) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_a_reference_whose_headers_drip_is_cut_off_at_the_deadline(policy):
    with SlowHost(drip_headers(DRIP_S)) as host:
        policy(deadline_s=1.5)
        error, elapsed = timed(inputs.load_references, [f"{host.url}/slow.png"], remote=True)
        assert isinstance(error, InputError) and error.field == "image_urls[0]", error
        assert error.message.endswith("the download did not finish within 1.5 s"), error.message
        assert elapsed < BOUND_S, elapsed
        assert len(host.requests) == 1


def test_the_deadline_covers_every_redirect_hop_together(policy):
    """Each hop answers its redirect within the deadline; all of them together do not."""

    def hop(host: SlowHost, connection: socket.socket, head: str) -> None:
        path = head.split(" ", 2)[1]
        number = int(path.rsplit("/", 1)[-1])
        connection.sendall(b"HTTP/1.1 302 Found\r\nX-Drip: ")
        if host.drip(connection, b"a" * 4, every_s=0.25):  # one second per hop
            connection.sendall(f"\r\nLocation: /hop/{number + 1}\r\nContent-Length: 0\r\n"
                               "Connection: close\r\n\r\n".encode())

    with SlowHost(hop) as host:
        policy(deadline_s=2.5)
        error, elapsed = timed(inputs.load_references, [f"{host.url}/hop/0"], remote=True)
        assert isinstance(error, InputError), error
        # a deadline per hop would follow all five redirects and then refuse the sixth
        assert error.message.endswith("the download did not finish within 2.5 s"), error.message
        assert 2 <= len(host.requests) <= 4, host.requests
        assert elapsed < BOUND_S


def test_a_lora_whose_headers_drip_is_cut_off_at_the_lora_deadline(policy, tmp_path):
    from fluxserve.engine.lora import resolve_lora

    with SlowHost(drip_headers(DRIP_S)) as host:
        policy(lora_deadline_s=1.5)
        error, elapsed = timed(resolve_lora, f"{host.url}/style.safetensors", tmp_path, "loras[0].path")
        assert isinstance(error, InputError) and error.field == "loras[0].path", error
        assert error.message.endswith("the download did not finish within 1.5 s"), error.message
        assert elapsed < BOUND_S


def test_a_dataset_has_its_own_deadline_not_the_loras(policy):
    from fluxserve.training.dataset import FIELD, load_dataset

    with SlowHost(drip_headers(DRIP_S)) as host:
        policy(lora_deadline_s=3600, dataset_deadline_s=1.5)
        error, elapsed = timed(load_dataset, f"{host.url}/dataset.zip")
        assert isinstance(error, InputError) and error.field == FIELD, error
        assert error.message.endswith("the download did not finish within 1.5 s"), error.message
        assert elapsed < BOUND_S
    assert fetch.FetchPolicy().dataset_deadline_s == 600.0  # the documented default


def test_a_webhook_receiver_that_drips_its_headers_is_cut_off_at_the_sender_timeout(store, policy):
    """The first delivery is answered at once on a connection the receiver keeps open; if the sender reused
    it, the second request would arrive on it and be dripped there: either way the timeout must hold."""

    def receiver(host: SlowHost, connection: socket.socket, head: str) -> None:
        if len(host.requests) == 1:
            _read_body(connection, head)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # kept alive
            head = _next_head(connection)
            if head is None:
                return  # the sender did not reuse the connection: the next delivery opens its own
            host.requests.append(head)
        _read_body(connection, head)
        drip_headers(DRIP_S)(host, connection, head)

    with SlowHost(receiver) as host:
        sender = WebhookSender(store, timeout=1.5,
                               builders={"test": lambda job: (job.webhook["url"], {"id": job.id})})
        try:
            jobs = []
            for name in ("fast", "slow"):
                job: Job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                                        webhook={"url": f"{host.url}/{name}", "dialect": "test"})
                assert store.claim("w").id == job.id
                assert store.complete(job.id, "w", {"images": []})
                jobs.append(job)
                started = time.monotonic()
                assert sender.deliver_due() == 1
                assert time.monotonic() - started < BOUND_S
            assert store.delivery(jobs[0].id)["status"] == "delivered"
            record = store.delivery(jobs[1].id)
            assert record["status"] != "delivered" and "ReadTimeout" in record["last_error"], record
            assert "within 1.5 s" in record["last_error"], record
            assert len(host.requests) == 2
        finally:
            sender.stop()


def _read_body(connection: socket.socket, head: str) -> None:
    length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                   if line.lower().startswith("content-length:")), 0)
    body = head.partition("\r\n\r\n")[2].encode("latin-1")
    while len(body) < length:
        chunk = connection.recv(length - len(body))
        if not chunk:
            return
        body += chunk


def _next_head(connection: socket.socket) -> str | None:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(4096)
        if not chunk:
            return None
        head += chunk
    return head.decode("latin-1")


def test_a_guarded_client_keeps_one_deadline_across_the_redirects_it_follows(policy):
    """``fetch.client(deadline_s=...)`` with ``follow_redirects``: the hops share the deadline."""

    def hop(host: SlowHost, connection: socket.socket, head: str) -> None:
        connection.sendall(b"HTTP/1.1 302 Found\r\nX-Drip: ")
        if host.drip(connection, b"a" * 4, every_s=0.25):
            connection.sendall(b"\r\nLocation: /again\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    import httpx

    with SlowHost(hop) as host, fetch.client(deadline_s=2.5, follow_redirects=True, max_redirects=20) as http:
        error, elapsed = timed(http.get, f"{host.url}/start")
        assert isinstance(error, httpx.TimeoutException), error
        assert elapsed < BOUND_S and len(host.requests) <= 4


def test_watched_connections_leave_no_descriptors_behind(policy):
    """Each watched connection holds a duplicate descriptor until its exchange ends: finished, failed and
    cut-off exchanges all give theirs back (and the server sees each connection closed)."""
    import os

    def image(host: SlowHost, connection: socket.socket, head: str) -> None:
        body = b"x" * 100
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with SlowHost(image) as fast, SlowHost(drip_headers(DRIP_S)) as slow:
        policy(deadline_s=0.5)
        fetch.download(f"{fast.url}/warm", max_bytes=1000, deadline_s=5)
        before = open_fds()
        for index in range(20):
            assert fetch.download(f"{fast.url}/{index}", max_bytes=1000, deadline_s=5) == b"x" * 100
            with pytest.raises(fetch.FetchError, match="larger than"):
                fetch.download(f"{fast.url}/big-{index}", max_bytes=10, deadline_s=5)
        for index in range(3):
            with pytest.raises(fetch.FetchError, match="did not finish within 0.5 s"):
                fetch.download(f"{slow.url}/{index}", max_bytes=1000, deadline_s=0.5)
        assert open_fds() <= before + 2, (before, open_fds())
