"""Webhook delivery through a real server (demo models): one key's slow receiver holds up nobody else's
webhooks, and webhook URLs the sender could not deliver to are refused at submit, naming the field in each
dialect's error format (fal ``fal_webhook``, Replicate ``webhook``), through the official clients too. The
OpenAI Images API has no webhooks. Real receivers on 127.0.0.1: one that drips its answer for minutes, one
that answers at once and whose deliveries are checked with Replicate's own verifiers."""

from __future__ import annotations

import time
from dataclasses import replace

import fal_client
import httpx
import pytest
import replicate
from fal_helpers import SMALL, Server, settings_for
from replicate.webhook import Webhooks
from standardwebhooks.webhooks import Webhook
from webhook_receivers import DrippingReceiver, SigningReceiver

import fluxserve.compat.fal

FLASH = "fal-ai/flux-2/flash"
DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 1, "go_fast": False}
URL_FORMATS = ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL")

# URLs httpx cannot parse (or the sender could not connect to), and internal addresses the address guard
# refuses at delivery: the server allows only 127.0.0.1, where its test receivers listen
UNUSABLE = ["http://0177.0.0.1/", "http://①②⑦.0.0.1/", "http://", "http:///hook", "http://xn--/",
            "http://a b/hook", "http://example.com:99999/", "ftp://example.com/hook", "hook"]
INTERNAL = ["http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/hook",
            "http://127.0.0.2/hook", "http://0x7f.0.0.2/hook", "http://[::ffff:10.0.0.1]/hook"]


@pytest.fixture(scope="module")
def server(demo_settings):
    settings = replace(settings_for(demo_settings, "webhook-delivery"), fetch_allow="127.0.0.1",
                       webhook_concurrency=4, webhook_concurrency_per_key=2)
    with Server(settings, auth_required=True) as running:
        running.a = running.store.create_key("a")[1]
        running.b = running.store.create_key("b")[1]
        yield running


def job_count(server) -> int:
    return sum(server.store.counts().values())


def test_one_keys_slow_receiver_does_not_hold_up_another_keys_webhook(server):
    slow, fast = DrippingReceiver(hold_s=180), SigningReceiver()
    try:
        ids = []
        for n in range(3):  # key A: three jobs whose receiver drips its answer for three minutes
            submitted = httpx.post(f"{server.url}/queue/{FLASH}", params={"fal_webhook": slow.url},
                                   json={"prompt": f"slow {n}", **SMALL},
                                   headers={"Authorization": f"Key {server.a}"}, timeout=60)
            assert submitted.status_code == 200, submitted.text
            ids.append(submitted.json()["request_id"])
        for job_id in ids:
            job = server.store.wait(job_id, 120)
            assert job is not None and job.status == "completed"
        assert slow.wait_for(lambda r: r.holding >= 2, 30)  # A's share of the four slots

        client = replicate.Client(api_token=server.b, base_url=server.url)  # key B, through its own client
        prediction = client.predictions.create(model=DEV, input={"prompt": "fast", **TINY}, webhook=fast.url,
                                               webhook_events_filter=["completed"])
        prediction.wait()
        assert prediction.status == "succeeded"
        ended = time.monotonic()
        got = fast.wait_for(lambda got: len(got) >= 1, 20)
        assert got, "key B's webhook did not arrive while key A's receiver was dripping"
        assert time.monotonic() - ended < 10  # well under a second; behind A's receiver it takes minutes
        assert got[0].json["id"] == prediction.id and got[0].json["status"] == "succeeded"
        secret = client.webhooks.default.secret()
        Webhook(secret.key).verify(got[0].body, got[0].headers)
        Webhooks.validate(headers=got[0].headers, body=got[0].body.decode(), secret=secret, tolerance=300)
        assert slow.holding == 2 and slow.most == 2  # A's third waits for one of A's slots, not for B's
        assert [server.store.delivery(job_id)["status"] for job_id in ids] == ["pending"] * 3
    finally:
        slow.close()
        fast.close()


@pytest.mark.parametrize("url", UNUSABLE + INTERNAL)
def test_fal_refuses_an_unusable_webhook_at_submit_naming_fal_webhook(server, url):
    before = job_count(server)
    response = httpx.post(f"{server.url}/queue/{FLASH}", params={"fal_webhook": url},
                          json={"prompt": "x", **SMALL}, headers={"Authorization": f"Key {server.a}"}, timeout=60)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "fal_webhook"] and error["msg"], error
    if url in INTERNAL:
        assert "address this server does not fetch from" in error["msg"]
    assert job_count(server) == before  # nothing was queued


@pytest.mark.parametrize("url", UNUSABLE + INTERNAL)
def test_replicate_refuses_an_unusable_webhook_at_submit_naming_webhook(server, url):
    before = job_count(server)
    response = httpx.post(f"{server.url}/v1/models/{DEV}/predictions", timeout=60,
                          json={"input": {"prompt": "x", **TINY}, "webhook": url},
                          headers={"Authorization": f"Bearer {server.b}"})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert [field["field"] for field in problem["invalid_fields"]] == ["webhook"], problem
    assert "webhook" in problem["detail"]
    if url in INTERNAL:
        assert "address this server does not fetch from" in problem["detail"]
    assert job_count(server) == before


def test_the_official_clients_get_the_refusal(server):
    saved = {name: getattr(fal_client.client, name) for name in URL_FORMATS}
    try:
        fluxserve.compat.fal.use(server.url, key=server.a)
        with pytest.raises(fal_client.client.FalClientHTTPError) as refused:
            fal_client.submit(FLASH, arguments={"prompt": "x", **SMALL}, webhook_url="http://0177.0.0.1/")
        assert refused.value.status_code == 422 and "fal_webhook" in str(refused.value.response.text)
    finally:
        for name, value in saved.items():
            setattr(fal_client.client, name, value)
    client = replicate.Client(api_token=server.b, base_url=server.url)
    with pytest.raises(replicate.exceptions.ReplicateError) as problem:
        client.predictions.create(model=DEV, input={"prompt": "x", **TINY}, webhook="http://169.254.169.254/")
    assert problem.value.status == 422 and "webhook" in (problem.value.detail or "")


def test_a_usable_webhook_is_still_accepted(server):
    receiver = SigningReceiver()
    try:
        response = httpx.post(f"{server.url}/queue/{FLASH}", params={"fal_webhook": receiver.url + "?x=1"},
                              json={"prompt": "ok", **SMALL}, headers={"Authorization": f"Key {server.a}"},
                              timeout=60)
        assert response.status_code == 200, response.text
        got = receiver.wait_for(lambda got: len(got) >= 1, 60)
        assert got and got[0].json["request_id"] == response.json()["request_id"]
    finally:
        receiver.close()
