"""No page of the server can be framed by another site (clickjacking): every answer carries
``X-Frame-Options: DENY`` and a ``Content-Security-Policy`` with ``frame-ancestors 'none'`` (joined to a policy
the route set itself, as on files). Checked on a real server over HTTP and in Chromium, where a page of another
origin that frames the playground gets nothing, while the playground and the stats page still load and work."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image
from playground_helpers import open_playground

PAGES = ["/", "/playground", "/stats", "/docs", "/redoc", "/web/app.js", "/api/info", "/health",
         "/queue/fal-ai/flux-2/flash/requests/nope/status"]


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "framing"), start_workers=False) as running:
        yield running


def frame_guarded(response: httpx.Response) -> bool:
    policy = response.headers.get("content-security-policy", "")
    return (response.headers.get("x-frame-options") == "DENY"
            and "frame-ancestors 'none'" in [part.strip() for part in policy.split(";")])


@pytest.mark.parametrize("path", PAGES)
def test_every_answer_refuses_to_be_framed(server, path):
    response = httpx.get(server.url + path, timeout=30)
    assert response.status_code < 500, response.text
    assert frame_guarded(response), dict(response.headers)


def test_files_keep_their_own_policy_and_refuse_framing(server):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, format="PNG")
    uploaded = httpx.post(f"{server.url}/files/upload", content=buffer.getvalue(), timeout=30,
                          headers={"Content-Type": "image/png", "X-Fal-File-Name": "g.png"})
    assert uploaded.status_code == 200, uploaded.text
    served = httpx.get(uploaded.json()["access_url"], timeout=30)
    assert served.status_code == 200 and served.content == buffer.getvalue()
    assert frame_guarded(served)
    policy = served.headers["content-security-policy"]
    assert "sandbox" in policy and "default-src 'none'" in policy  # the file route's own policy is kept
    assert len(served.headers.get_list("content-security-policy")) == 1


class _Framer:
    """Another origin (its own port) whose page frames the given URL."""

    def __init__(self, target: str):
        page = f'<!doctype html><title>framer</title><iframe id="f" src="{target}"></iframe>'.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_browser_shows_nothing_of_the_playground_in_another_sites_frame(server, browser):
    framer = _Framer(server.url + "/")
    context = browser.new_context()
    try:
        page = context.new_page()
        with page.expect_response(lambda r: r.url == server.url + "/") as framed:
            page.goto(framer.url)
        assert framed.value.status == 200  # the server answered; the browser refused to show it
        [child] = [f for f in page.frames if f != page.main_frame]  # loaded (or refused): goto waits for frames
        assert not child.url.startswith(server.url)  # refused: an error page, not the playground
        assert child.locator("#endpoint").count() == 0
    finally:
        context.close()
        framer.close()


def test_the_pages_still_load_on_their_own(server, page):
    open_playground(page, server.url)  # scripts, styles and the endpoint list load; no JavaScript error
    assert page.locator("#endpoint option").count() > 0
    page.goto(server.url + "/stats")
    page.wait_for_load_state("networkidle")
    assert page.title()
