"""One tenant cannot pass its webhooks off as another's. Replicate: every API key has its own signing secret
(``GET /v1/webhooks/default/secret``, through the official client), so a delivery of B's, or one B signs itself,
fails A's verification with the official verifiers. fal: one ED25519 key signs every delivery, and the signed
``X-Fal-Webhook-User-Id`` is the key that made the request, so A's receiver, which checks the user id, refuses B's
deliveries, and changing the header breaks the signature. Real servers and receivers on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac

import httpx
import pytest
import replicate
from dialect_server import live_server  # noqa: F401  (fixture)
from fal_helpers import SMALL, Server, settings_for
from replicate.webhook import InvalidSignatureError, Webhooks
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from test_webhook_signing import FLASH, JWKS_PATH, TINY, server_settings, verify_fal
from webhook_receivers import Received, SigningReceiver

from fluxserve.config import Settings

DEV = "black-forest-labs/flux-2-dev"

pytestmark = pytest.mark.usefixtures("loopback_fetches")  # the receivers run on 127.0.0.1


def _predict(server, secret: str, receiver: SigningReceiver) -> str:
    response = httpx.post(f"{server.url}/v1/models/{DEV}/predictions", timeout=60,
                          headers={"Authorization": f"Bearer {secret}"},
                          json={"input": {"prompt": "whose?", **TINY}, "webhook": receiver.url,
                                "webhook_events_filter": ["completed"]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_each_key_has_its_own_replicate_secret(live_server):  # noqa: F811
    _, other = live_server.store.create_key("tenant b")
    mine = replicate.Client(api_token=live_server.key, base_url=live_server.url).webhooks.default.secret()
    theirs = replicate.Client(api_token=other, base_url=live_server.url).webhooks.default.secret()
    assert mine.key.startswith("whsec_") and theirs.key.startswith("whsec_") and mine.key != theirs.key
    again = replicate.Client(api_token=live_server.key, base_url=live_server.url).webhooks.default.secret()
    assert again.key == mine.key  # stable

    receiver = SigningReceiver()  # A's receiver
    try:
        own = _predict(live_server, live_server.key, receiver)
        forged = _predict(live_server, other, receiver)  # B points its webhook at A's receiver
        got = receiver.wait_for(lambda got: {r.json["id"] for r in got} >= {own, forged}, timeout=180)
        by_id = {r.json["id"]: r for r in got}
        Webhooks.validate(headers=by_id[own].headers, body=by_id[own].body.decode(), secret=mine, tolerance=300)
        with pytest.raises(InvalidSignatureError):
            Webhooks.validate(headers=by_id[forged].headers, body=by_id[forged].body.decode(), secret=mine)
        Webhook(theirs.key).verify(by_id[forged].body, by_id[forged].headers)  # B's delivery, B's secret
        # B signing a delivery itself with its own secret, claiming A's prediction: A refuses it
        body = by_id[own].body.replace(b"succeeded", b"failed")
        headers = dict(by_id[own].headers)
        raw = base64.b64decode(theirs.key.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        headers["webhook-signature"] = "v1," + base64.b64encode(hmac.new(raw, signed, hashlib.sha256).digest()).decode()
        Webhook(theirs.key).verify(body, headers)  # well signed...
        with pytest.raises(WebhookVerificationError):
            Webhook(mine.key).verify(body, headers)  # ...but not by A's secret
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def fal_tenants(tmp_path_factory):
    base = Settings(data_dir=tmp_path_factory.mktemp("fal-tenants"), demo=True, device="cpu")
    with Server(server_settings(settings_for(base, "fal")), auth_required=True) as running:
        running.a_id, running.a = running.store.create_key("a")
        running.b_id, running.b = running.store.create_key("b")
        yield running


def accepted_by(user_id: str, delivery: Received, jwks: dict) -> bool:
    """What a receiver does that takes only its own deliveries: fal's verification, then its own user id."""
    return verify_fal(delivery, jwks) and delivery.headers["x-fal-webhook-user-id"] == user_id


def test_fal_deliveries_name_the_key_that_made_the_request(fal_tenants):
    server = fal_tenants
    receiver = SigningReceiver()  # A's receiver
    try:
        ids = {}
        for who in ("a", "b"):  # B points its webhook at A's receiver
            submitted = httpx.post(f"{server.url}/queue/{FLASH}", params={"fal_webhook": receiver.url},
                                   json={"prompt": f"from {who}", **SMALL}, timeout=60,
                                   headers={"Authorization": f"Key {getattr(server, who)}"})
            assert submitted.status_code == 200, submitted.text
            ids[who] = submitted.json()["request_id"]
        got = receiver.wait_for(lambda got: {r.json["request_id"] for r in got} >= set(ids.values()), timeout=180)
        by_id = {r.json["request_id"]: r for r in got}
        jwks = httpx.get(server.url + JWKS_PATH, timeout=30).json()
        own, forged = by_id[ids["a"]], by_id[ids["b"]]
        assert own.headers["x-fal-webhook-user-id"] == server.a_id
        assert accepted_by(server.a_id, own, jwks)
        assert verify_fal(forged, jwks) and forged.headers["x-fal-webhook-user-id"] == server.b_id
        assert not accepted_by(server.a_id, forged, jwks)
        relabelled = Received(forged.body, forged.headers | {"x-fal-webhook-user-id": server.a_id})
        assert not accepted_by(server.a_id, relabelled, jwks)  # the user id is signed
    finally:
        receiver.close()
