"""Fair shares of the API's download threads: one key's slow reference hosts (more of them than the pool has
threads, through every dialect) hold only that key's share, so another key's edits, by URL or data URI, are
answered at once; data URIs never wait behind downloads, not even the slow key's own."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image

from fluxserve import fetch
from fluxserve.config import Settings
from fluxserve.fair_pool import FairPool

WORKERS = 4  # the test server's download threads: a key's share is one of them
BOUND_S = 30  # an answer the fix gives in well under a second; the held downloads last 120 s


def png_bytes() -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (96, 80), (20, 120, 200)).save(out, format="PNG")
    return out.getvalue()


class ImageHost:
    """A real HTTP server on 127.0.0.1 serving one PNG; ``held=True`` answers only once released."""

    def __init__(self, held: bool):
        self.hits: list[str] = []
        self.release = threading.Event()
        self.arrived = threading.Condition()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with host.arrived:
                    host.hits.append(self.path)
                    host.arrived.notify_all()
                if held:
                    host.release.wait(120)
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for_hits(self, count: int, timeout: float = 60) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.hits) >= count, timeout)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[ImageHost, ImageHost]]:
    slow, fast = ImageHost(held=True), ImageHost(held=False)
    yield slow, fast
    slow.close()
    fast.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory, hosts) -> Iterator[Server]:
    previous = fetch.current()
    slow, fast = hosts
    allow = ",".join(url.replace("http://", "") for url in (slow.url, fast.url))
    base = Settings(data_dir=tmp_path_factory.mktemp("fetch-shares"), demo=True, device="cpu",
                    fetch_allow=allow, fetch_workers=WORKERS)
    with Server(settings_for(base, "shares"), start_workers=False, auth_required=True) as server:
        yield server
    fetch.configure(previous)


def fal_edit(server: Server, key: str, url: str, **options) -> httpx.Response:
    return httpx.post(f"{server.url}/queue/fal-ai/flux-2/edit", json={"prompt": "a cat", "image_urls": [url]},
                      headers={"Authorization": f"Key {key}"}, **options)


def openai_edit(server: Server, key: str, url: str, timeout: float) -> int:
    """An OpenAI edit as a stream: its status and job ids come once the job is queued (the test server runs
    no workers, and a plain OpenAI edit answers only with the finished image)."""
    with httpx.stream("POST", f"{server.url}/v1/images/edits", headers={"Authorization": f"Bearer {key}"},
                      timeout=timeout, json={"model": "flux-2-dev", "prompt": "a cat", "stream": True,
                                             "images": [{"image_url": url}]}) as response:
        assert response.status_code != 200 or response.headers["x-fluxserve-job-ids"]
        return response.status_code


def test_one_keys_slow_references_leave_other_keys_and_data_uris_unhindered(api, hosts):
    slow, fast = hosts
    _, key_a = api.store.create_key("a")
    _, key_b = api.store.create_key("b")
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert fetch.current().slots_per_key == 1  # a quarter of the 4 threads
    answers: list[int] = []

    def slow_submit(index: int) -> None:  # key A through every dialect, more requests than the pool's threads
        url, auth = f"{slow.url}/a-{index}.png", {"Authorization": f"Bearer {key_a}"}
        if index % 3 == 0:
            response = fal_edit(api, key_a, url, timeout=180)
        elif index % 3 == 1:
            answers.append(openai_edit(api, key_a, url, timeout=180))
            return
        else:
            response = httpx.post(f"{api.url}/v1/models/black-forest-labs/flux-2-dev/predictions", headers=auth,
                                  timeout=180, json={"input": {"prompt": "a cat", "input_images": [url]}})
        answers.append(response.status_code)

    threads = [threading.Thread(target=slow_submit, args=(index,), daemon=True) for index in range(WORKERS + 2)]
    try:
        for thread in threads:
            thread.start()
        assert slow.wait_for_hits(1), slow.hits  # key A's share is downloading, the rest of A's waits
        quick = {"timeout": BOUND_S}
        assert fal_edit(api, key_b, f"{fast.url}/b.png", **quick).status_code == 200
        assert fal_edit(api, key_b, data_uri, **quick).status_code == 200
        assert fal_edit(api, key_a, data_uri, **quick).status_code == 200  # A's own data URI: no download
        assert openai_edit(api, key_b, f"{fast.url}/b-openai.png", timeout=BOUND_S) == 200
        response = httpx.post(f"{api.url}/v1/models/black-forest-labs/flux-2-dev/predictions",
                              headers={"Authorization": f"Bearer {key_b}"}, **quick,
                              json={"input": {"prompt": "a cat", "input_images": [f"{fast.url}/b-rep.png"]}})
        assert response.status_code == 201, response.text
        assert answers == [] and len(slow.hits) == 1, slow.hits  # A still holds exactly its one share
        assert sorted(fast.hits) == ["/b-openai.png", "/b-rep.png", "/b.png"]
    finally:
        slow.release.set()
        for thread in threads:
            thread.join(180)
    assert sorted(answers) == [200] * 4 + [201] * 2  # A's requests all went through in the end
    assert len(slow.hits) == WORKERS + 2


def test_the_fair_pool_holds_each_tenant_to_its_share_and_serves_tenants_in_turn():
    pool = FairPool(slots=3, per_tenant=2, name="test-fair")
    gate, started = threading.Event(), []
    arrived = threading.Condition()

    def call(name: str):
        def run() -> str:
            with arrived:
                started.append(name)
                arrived.notify_all()
            gate.wait(60)
            return name
        return run

    try:
        first = [pool.submit("a", call(f"a{i}")) for i in range(4)]
        assert pool.running("a") == 2  # its share: two of its calls wait though a slot is free
        b0 = pool.submit("b", call("b0"))  # ... which b gets at once
        b1 = pool.submit("b", call("b1"))  # every slot busy now
        with arrived:
            assert arrived.wait_for(lambda: len(started) == 3, 60)
        assert sorted(started) == ["a0", "a1", "b0"] and pool.running("b") == 1 and not b1.running()
        gate.set()
        assert [future.result(60) for future in first] == ["a0", "a1", "a2", "a3"]
        assert (b0.result(60), b1.result(60)) == ("b0", "b1")
    finally:
        gate.set()
        pool.shutdown()
    one = FairPool(slots=1, per_tenant=1, name="test-turns")
    gate.clear()
    order: list[str] = []
    try:
        holding = one.submit("x", lambda: gate.wait(60))
        queued = [one.submit(tenant, lambda name=name: order.append(name))
                  for tenant, name in (("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"))]
        gate.set()
        assert holding.result(60) is True and [future.result(60) for future in queued] == [None] * 4
        assert order == ["a1", "b1", "a2", "a3"]  # b's one call does not wait for all of a's
    finally:
        gate.set()
        one.shutdown()


def test_a_call_cancelled_while_it_waits_never_runs():
    pool = FairPool(slots=1, per_tenant=1, name="test-cancel")
    gate, ran = threading.Event(), []
    try:
        holding = pool.submit("a", lambda: gate.wait(60))
        waiting = pool.submit("b", lambda: ran.append("b"))
        assert waiting.cancel()  # the caller went away (a client hang-up cancels the awaited future)
        after = pool.submit("c", lambda: ran.append("c"))
        gate.set()
        assert holding.result(60) is True and after.result(60) is None
        assert ran == ["c"]
    finally:
        gate.set()
        pool.shutdown()
