"""Credentials go only where they belong: the gateway's provider key to the configured provider's origin
(not to a host its answers name), the Hugging Face token only over https to the hub's own hosts."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fluxserve import fetch
from fluxserve.request import GenerationCancelled
from fluxserve.upstream.errors import UpstreamError
from fluxserve.upstream.fal import FalUpstream
from fluxserve.upstream.replicate import ReplicateUpstream

KEY = "provider-secret-4f1c"


class JsonHost:
    """A real HTTP server on 127.0.0.1 answering ``answer(method, path)`` as JSON; records every request's
    method, path and headers."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                host.requests.append((self.command, self.path, dict(self.headers)))
                body = json.dumps(answer(self.command, self.path)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = handle_one

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def foreign() -> Iterator[JsonHost]:
    """The host a provider's answer points to: it would answer like the provider, if asked."""
    host = JsonHost(lambda method, path: {"status": "succeeded" if path.startswith("/v1/") else "COMPLETED",
                                           "images": [], "id": "p1", "output": []})
    yield host
    host.close()


def test_fal_status_urls_outside_the_providers_origin_get_no_key(foreign):
    provider = JsonHost(lambda method, path: {
        "request_id": "r1", "status_url": f"{foreign.url}/requests/r1/status",
        "response_url": f"{foreign.url}/requests/r1", "cancel_url": f"{foreign.url}/requests/r1/cancel"})
    upstream = FalUpstream(provider.url, KEY, poll_s=0.01, timeout_s=20)
    try:
        with pytest.raises(UpstreamError) as caught:
            upstream.run("fal-ai/flux-2-pro", {"prompt": "a fox"}, on_log=lambda line: None,
                         should_cancel=lambda: False)
        assert caught.value.retryable  # the next route is tried
        assert "outside its API" in caught.value.message and foreign.url in caught.value.message
        assert foreign.requests == []  # not asked at all, with or without the key
        [(method, path, headers)] = provider.requests
        assert (method, path, headers["Authorization"]) == ("POST", "/fal-ai/flux-2-pro", f"Key {KEY}")
    finally:
        upstream.close()
        provider.close()


@pytest.mark.parametrize("cancel", [False, True])
def test_replicate_prediction_urls_outside_the_providers_origin_get_no_key(foreign, cancel):
    provider = JsonHost(lambda method, path: {
        "id": "p1", "status": "starting", "urls": {"get": f"{foreign.url}/v1/predictions/p1",
                                                   "cancel": f"{foreign.url}/v1/predictions/p1/cancel"}})
    upstream = ReplicateUpstream(provider.url, KEY, poll_s=0.01, timeout_s=20)
    try:
        expected = GenerationCancelled if cancel else UpstreamError
        with pytest.raises(expected) as caught:
            upstream.run("black-forest-labs/flux-2-pro", {"prompt": "a fox"}, on_log=lambda line: None,
                         should_cancel=lambda: cancel)
        if not cancel:
            assert caught.value.retryable and "outside its API" in caught.value.message
        assert foreign.requests == []
        assert [headers["Authorization"] for _, _, headers in provider.requests] == [f"Bearer {KEY}"]
    finally:
        upstream.close()
        provider.close()


def test_urls_on_the_providers_own_origin_are_followed_with_the_key():
    """Same scheme, host and port, however written (case, the default port spelled out), is the provider."""
    calls = []

    def answer(method: str, path: str) -> dict:
        calls.append(path)
        origin = provider.url.replace("http://127.0.0.1", "HTTP://127.0.0.1")
        return {"request_id": "r1", "status_url": f"{origin}/requests/r1/status", "response_url":
                f"{origin}/requests/r1", "status": "COMPLETED", "images": [{"url": "x"}]}

    provider = JsonHost(answer)
    upstream = FalUpstream(provider.url, KEY, poll_s=0.01, timeout_s=20)
    try:
        output = upstream.run("fal-ai/flux-2-pro", {"prompt": "a fox"}, on_log=lambda line: None,
                              should_cancel=lambda: False)
        assert output["images"] == [{"url": "x"}]
        assert calls == ["/fal-ai/flux-2-pro", "/requests/r1/status?logs=1", "/requests/r1"]
        assert {headers["Authorization"] for _, _, headers in provider.requests} == {f"Key {KEY}"}
    finally:
        upstream.close()
        provider.close()


# ---- the Hugging Face token ----------------------------------------------------------------------------
def test_the_hub_token_goes_only_over_https_to_the_hubs_own_hosts():
    from fluxserve.engine.lora import hub_headers

    token = "hf_secret"
    sent = {"Authorization": f"Bearer {token}"}
    assert hub_headers("https://huggingface.co/o/r/resolve/main/a.safetensors", token) == sent
    assert hub_headers("https://HF.co/o/r/resolve/main/a.safetensors", token) == sent
    assert hub_headers("https://huggingface.co:443/o/r/resolve/main/a.safetensors", token) == sent
    for url in ("http://huggingface.co/o/r/resolve/main/a.safetensors",  # plain http: readable on the way
                "https://huggingface.co:8443/a.safetensors", "https://evil-huggingface.co/a.safetensors",
                "https://huggingface.co.evil.example/a.safetensors", "https://cdn-lfs.huggingface.co/a",
                "https://example.com/a.safetensors"):
        assert hub_headers(url, token) == {}, url
    assert hub_headers("https://huggingface.co/a.safetensors", None) == {}


def test_a_lora_at_plain_http_huggingface_co_is_fetched_without_the_token(tmp_path, monkeypatch):
    """``http://huggingface.co:PORT/...`` reaches a real server on loopback (the name is pointed there for
    this test, as a hostile network on the way could); what arrives carries no token."""
    from fluxserve.engine.lora import resolve_lora
    from fluxserve.request import InputError

    site = JsonHost(lambda method, path: {"not": "a safetensors file"})
    port = int(site.url.rsplit(":", 1)[1])
    real = socket.getaddrinfo

    def loopback_hub(host, *args, **kwargs):
        return real("127.0.0.1" if host == "huggingface.co" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_hub)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    previous = fetch.configure(replace(fetch.current(), allow=fetch.parse_allow(f"127.0.0.1:{port}")))
    try:
        with pytest.raises(InputError, match="safetensors"):
            resolve_lora(f"http://huggingface.co:{port}/o/r/resolve/main/a.safetensors", tmp_path)
        [(_, path, headers)] = site.requests
        assert path == "/o/r/resolve/main/a.safetensors" and headers["Host"] == f"huggingface.co:{port}"
        assert "Authorization" not in headers and "hf_secret" not in json.dumps(headers)
    finally:
        fetch.configure(previous)
        site.close()
