"""Signed webhooks, checked with the verification each service documents: fal's (ED25519 over
``request_id\\nuser_id\\ntimestamp\\nsha256(body)`` with a key from the server's JWKS) and Replicate's Standard
Webhooks (the ``standardwebhooks`` reference library and the ``replicate`` client's ``validate``). Real servers,
real receivers on 127.0.0.1, SQLite and PostgreSQL; Replicate's start / logs events are durable, in order, and
coalesced."""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import replace
from itertools import pairwise

import httpx
import pytest
import replicate
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dialect_server import live_server  # noqa: F401  (fixture)
from fal_helpers import SMALL, Server, settings_for
from replicate.webhook import Webhooks, WebhookSigningSecret
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from webhook_receivers import Received, SigningReceiver

from fluxserve.config import Settings
from fluxserve.jobs.store import JobStore, utcnow
from fluxserve.jobs.webhooks import WebhookKeys, WebhookSender

pytest_plugins = ["db_fixtures"]

FLASH = "fal-ai/flux-2/flash"
DEV = "black-forest-labs/flux-2-dev"
TINY = {"aspect_ratio": "custom", "width": 64, "height": 64, "steps": 4, "go_fast": False}
JWKS_PATH = "/keys/fal-webhooks.json"


pytestmark = pytest.mark.usefixtures("loopback_fetches")  # the receivers run on 127.0.0.1

def server_settings(base: Settings) -> Settings:
    """The settings of the servers these tests start (their receivers listen on 127.0.0.1)."""
    return replace(base, webhook_jwks_path=JWKS_PATH, fetch_allow="127.0.0.1")


# ---- fal's documented verification ----------------------------------------------------------------------------
def fal_public_keys(jwks: dict) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in jwks["keys"]:
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            x = jwk["x"]
            keys.append(Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))))
    return keys


def verify_fal(delivery: Received, jwks: dict, tolerance_s: int = 300) -> bool:
    """fal's steps: the four headers, a timestamp within 5 minutes, the message
    ``request_id \\n user_id \\n timestamp \\n sha256_hex(raw body)`` verified with any key of the JWKS."""
    h = delivery.headers
    names = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp",
             "x-fal-webhook-signature")
    if not all(h.get(name) for name in names):
        return False
    request_id, user_id, timestamp, signature = (h[name] for name in names)
    if abs(int(time.time()) - int(timestamp)) > tolerance_s:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(delivery.body).hexdigest()]).encode()
    for key in fal_public_keys(jwks):
        try:
            key.verify(bytes.fromhex(signature), message)
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


@pytest.fixture(scope="module")
def fal_server(tmp_path_factory):
    base = Settings(data_dir=tmp_path_factory.mktemp("signing"), demo=True, device="cpu")
    with Server(server_settings(settings_for(base, "fal")), auth_required=True) as running:
        running.key = running.store.create_key("signing tests")[1]
        yield running


def test_fal_webhooks_verify_with_the_served_jwks(fal_server):
    receiver = SigningReceiver()
    try:
        auth = {"Authorization": f"Key {fal_server.key}"}
        submitted = httpx.post(f"{fal_server.url}/queue/{FLASH}", params={"fal_webhook": receiver.url},
                               json={"prompt": "signed", **SMALL}, headers=auth, timeout=60)
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        [delivery] = receiver.wait_for(lambda got: len(got) >= 1)
        # the JWKS is public (receivers have no API key), at the configured path
        jwks_response = httpx.get(fal_server.url + JWKS_PATH, timeout=30)
        assert jwks_response.status_code == 200
        jwks = jwks_response.json()
        assert [(k["kty"], k["crv"]) for k in jwks["keys"]] == [("OKP", "Ed25519")]
        assert httpx.get(fal_server.url + "/.well-known/jwks.json", timeout=30).status_code != 200  # moved

        assert delivery.json["request_id"] == request_id and delivery.json["status"] == "OK"
        assert delivery.headers["x-fal-webhook-request-id"] == request_id
        assert verify_fal(delivery, jwks)
        # what a receiver must refuse: another body, a stale timestamp, a key that is not the server's
        assert not verify_fal(Received(delivery.body.replace(b"OK", b"ER"), delivery.headers), jwks)
        stale = delivery.headers | {"x-fal-webhook-timestamp": str(int(time.time()) - 3600)}
        assert not verify_fal(Received(delivery.body, stale), jwks)
        other = WebhookKeys(JobStore("sqlite://")).fal_jwks()
        assert not verify_fal(delivery, other)
    finally:
        receiver.close()


# ---- keys: stored, shared, stable ------------------------------------------------------------------------------
def test_signing_keys_persist_and_are_shared_by_processes(db_url):
    first, second = JobStore(db_url), JobStore(db_url)
    try:
        a, b = WebhookKeys(first), WebhookKeys(second)
        assert a.fal_jwks() == b.fal_jwks()
        secret = a.replicate_secret()
        assert secret == b.replicate_secret() and secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    finally:
        first.close()
        second.close()
    restarted = JobStore(db_url)
    try:
        assert WebhookKeys(restarted).replicate_secret() == secret
        assert WebhookKeys(restarted).fal_jwks() == a.fal_jwks()
    finally:
        restarted.close()


# ---- Replicate: events in order, durable, signed -----------------------------------------------------------------
def _final_payload(job):
    return job.webhook["url"], {"id": job.id, "event": "completed", "status": job.status}


def test_replicate_events_are_ordered_retried_coalesced_and_signed(store):
    receiver = SigningReceiver(failures=2)
    sender = WebhookSender(store, base_delay=0.05, poll_s=0.05, builders={"replicate": _final_payload})
    try:
        job = store.submit(endpoint="e", dialect="replicate", request={"model": "dev"},
                           webhook={"url": receiver.url, "dialect": "replicate"})
        store.queue_webhook_event(job.id, "replicate", "start", receiver.url, {"event": "start"})
        for n in range(5):  # a burst of logs leaves one waiting event, with the newest state
            store.queue_webhook_event(job.id, "replicate", "logs", receiver.url, {"event": f"logs {n}"},
                                      coalesce=True)
        assert [(e["event"], e["body"]) for e in store.webhook_events(job.id)] == [
            ("start", {"event": "start"}), ("logs", {"event": "logs 4"})]
        assert store.claim("w").id == job.id and store.complete(job.id, "w", {"images": []})
        sender.start()
        got = receiver.wait_for(lambda got: len(got) >= 5)
        assert [r.json["event"] for r in got] == ["start", "start", "start", "logs 4", "completed"]
        time.sleep(0.3)
        assert len(receiver.received) == 5  # nothing more
        secret = WebhookKeys(store).replicate_secret()
        for delivery in got:
            Webhook(secret).verify(delivery.body, delivery.headers)
        assert len({r.headers["webhook-id"] for r in got[:3]}) == 1  # a retry keeps its message id
        assert len({r.headers["webhook-id"] for r in got[2:]}) == 3
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(got[-1].body.replace(b"completed", b"failed"), got[-1].headers)
        assert [e["status"] for e in store.webhook_events(job.id)] == ["delivered", "delivered"]
        assert store.webhook_events(job.id)[0]["attempts"] == 3
        # an event queued after the terminal webhook went out would arrive out of order: it is dropped
        store.queue_webhook_event(job.id, "replicate", "logs", receiver.url, {"event": "late"}, coalesce=True)
        sender.notify()
        deadline = time.monotonic() + 30
        while store.webhook_events(job.id)[-1]["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.webhook_events(job.id)[-1]["status"] == "skipped"
        assert len(receiver.received) == 5
    finally:
        sender.stop()
        receiver.close()


def test_the_terminal_webhook_waits_for_a_retried_event_then_follows_it_at_once(store):
    receiver = SigningReceiver(failures=1)
    sender = WebhookSender(store, base_delay=3600, builders={"replicate": _final_payload})  # run by hand
    try:
        job = store.submit(endpoint="e", dialect="replicate", request={"model": "dev"},
                           webhook={"url": receiver.url, "dialect": "replicate"})
        store.queue_webhook_event(job.id, "replicate", "start", receiver.url, {"event": "start"})
        assert store.claim("w").id == job.id and store.complete(job.id, "w", {"images": []})
        assert sender.deliver_due() == 2  # the start event fails; the terminal webhook waits behind it
        [start] = store.webhook_events(job.id)
        final = store.delivery(job.id)
        assert start["attempts"] == 1 and final["attempts"] == 0 and final["status"] == "pending"
        assert final["next_attempt_at"] >= start["next_attempt_at"]  # parked until then, not polled meanwhile
        store.update_webhook_event(start["id"], next_attempt_at=utcnow())  # the retry falls due
        assert sender.deliver_due() == 1
        assert sender.deliver_due() == 1  # delivering the event released the terminal webhook
        assert [r.json["event"] for r in receiver.received] == ["start", "start", "completed"]
        assert store.delivery(job.id)["status"] == "delivered"
    finally:
        sender.stop()
        receiver.close()


def test_an_attempted_logs_event_is_not_rewritten(store):
    job = store.submit(endpoint="e", dialect="replicate", request={"model": "dev"},
                       webhook={"url": "http://127.0.0.1:1/x", "dialect": "replicate"})
    first = store.queue_webhook_event(job.id, "replicate", "logs", "http://127.0.0.1:1/x", {"n": 1}, coalesce=True)
    [claimed] = store.claim_webhook_events(["replicate"])
    assert claimed.id == first
    second = store.queue_webhook_event(job.id, "replicate", "logs", "http://127.0.0.1:1/x", {"n": 2}, coalesce=True)
    assert second != first
    assert [e["body"] for e in store.webhook_events(job.id)] == [{"n": 1}, {"n": 2}]
    assert store.claim_webhook_events(["replicate"]) == []  # the second waits for the first (leased)


def test_replicate_secret_route_and_signed_predictions(live_server):  # noqa: F811
    assert httpx.get(live_server.url + "/v1/webhooks/default/secret", timeout=30).status_code == 401
    client = replicate.Client(api_token=live_server.key, base_url=live_server.url)
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    jwks = httpx.get(live_server.url + "/.well-known/jwks.json", timeout=30)  # the default path, no key
    assert jwks.status_code == 200 and jwks.json()["keys"][0]["crv"] == "Ed25519"

    receiver = SigningReceiver()
    try:
        response = live_server.post(f"/v1/models/{DEV}/predictions", json={
            "input": {"prompt": "signed", **TINY}, "webhook": receiver.url,
            "webhook_events_filter": ["start", "logs", "completed"]})
        assert response.status_code == 201, response.text
        prediction_id = response.json()["id"]
        got = receiver.wait_for(lambda got: any(r.json["status"] == "succeeded" for r in got))
        time.sleep(0.5)  # nothing may follow the terminal webhook
        got = list(receiver.received)
        statuses = [r.json["status"] for r in got]
        assert statuses[0] == "starting" and statuses[-1] == "succeeded", statuses
        assert set(statuses[1:-1]) <= {"processing"}  # logs events, while it ran
        assert all(r.json["id"] == prediction_id for r in got)
        final = got[-1].json
        assert "Using seed" in final["logs"] and "4/4" in final["logs"]
        for delivery in got:
            Webhook(secret.key).verify(delivery.body, delivery.headers)
            Webhooks.validate(headers=delivery.headers, body=delivery.body.decode(), secret=secret, tolerance=300)
        with pytest.raises(replicate.webhook.InvalidSignatureError):
            Webhooks.validate(headers=got[-1].headers, body=got[-1].body.decode() + " ",
                              secret=WebhookSigningSecret(key=secret.key))
        events = live_server.store.webhook_events(prediction_id)
        assert events[0]["event"] == "start" and events[0]["status"] == "delivered"
        # a logs event still waiting when the job ended is skipped: the terminal webhook has every line
        assert all(e["status"] in ("delivered", "skipped") for e in events[1:])
        assert live_server.store.delivery(prediction_id)["status"] == "delivered"
    finally:
        receiver.close()


def test_replicate_logs_events_carry_the_prediction_as_it_ran(live_server):  # noqa: F811
    """The job is run by hand here (workers paused), so the logs events do not depend on the model's speed."""
    secret = replicate.Client(api_token=live_server.key, base_url=live_server.url).webhooks.default.secret()
    receiver = SigningReceiver()
    store = live_server.store
    try:
        with live_server.workers_paused():
            response = live_server.post(f"/v1/models/{DEV}/predictions", json={
                "input": {"prompt": "logs", **TINY}, "webhook": receiver.url,
                "webhook_events_filter": ["logs", "completed"]})
            assert response.status_code == 201, response.text
            prediction_id = response.json()["id"]
            job = store.claim("by-hand")
            assert job is not None and job.id == prediction_id
            store.log(prediction_id, "step 1/4")
            first = receiver.wait_for(lambda got: len(got) >= 1)[0].json
            assert first["status"] == "processing" and "1/4" in first["logs"]
            store.log(prediction_id, "step 2/4")
            store.log(prediction_id, "step 3/4")
            receiver.wait_for(lambda got: any("3/4" in (r.json["logs"] or "") for r in got))
            assert store.complete(prediction_id, "by-hand", {"images": [], "seed": 7})
            got = receiver.wait_for(lambda got: any(r.json["status"] == "succeeded" for r in got))
        time.sleep(0.5)  # nothing may follow the terminal webhook
        got = list(receiver.received)
        assert [r.json["status"] for r in got][-1] == "succeeded"
        assert {r.json["status"] for r in got[:-1]} == {"processing"}
        logs = [r.json["logs"] for r in got]
        assert all(earlier in later for earlier, later in pairwise(logs))  # each carries all so far
        assert "Using seed: 7" in logs[-1] and "3/4" in logs[-1]
        for delivery in got:
            Webhooks.validate(headers=delivery.headers, body=delivery.body.decode(), secret=secret, tolerance=300)
        assert len(store.webhook_events(prediction_id)) <= 3  # one per burst of logs at most
    finally:
        receiver.close()


def test_logs_events_keep_coming_when_the_api_that_took_the_prediction_is_gone(demo_settings):
    """The logs events do not depend on the API process that accepted the prediction: it stops before the job
    runs; the job is then run (by hand here, so nothing depends on the model's speed) and another process's
    webhook sender builds and delivers the events from what the job logged."""
    settings = replace(settings_for(demo_settings, "webhook-handover"), fetch_allow="127.0.0.1")  # the receiver
    receiver = SigningReceiver()
    try:
        with Server(settings, start_workers=False) as first:
            response = httpx.post(f"{first.url}/v1/models/{DEV}/predictions", timeout=60, json={
                "input": {"prompt": "handed over", **TINY}, "webhook": receiver.url,
                "webhook_events_filter": ["logs", "completed"]})
            assert response.status_code == 201, response.text
            prediction_id = response.json()["id"]
        with Server(settings, start_workers=False) as second:  # a restart, or another replica
            store = second.store
            assert store.claim("by-hand").id == prediction_id
            assert store.report(prediction_id, "by-hand", 1, 4, [{"message": "step 1/4"}])
            first_logs = receiver.wait_for(lambda got: len(got) >= 1)[0].json
            assert first_logs["status"] == "processing" and "1/4" in first_logs["logs"]
            assert store.report(prediction_id, "by-hand", 2, 4, [{"message": "step 2/4"}])
            receiver.wait_for(lambda got: any("2/4" in (r.json["logs"] or "") for r in got))
            assert store.complete(prediction_id, "by-hand", {"images": [], "seed": 7})
            got = receiver.wait_for(lambda got: any(r.json["status"] == "succeeded" for r in got))
        assert [r.json["status"] for r in got] == ["processing"] * (len(got) - 1) + ["succeeded"]
        assert all(r.json["id"] == prediction_id for r in got)
    finally:
        receiver.close()
