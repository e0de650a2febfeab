"""Webhook delivery against a real local HTTP receiver, on SQLite and PostgreSQL: retries with backoff,
persisted state that survives a restart, and dialect payload builders."""

from __future__ import annotations

import threading

import pytest
from webhook_receivers import SigningReceiver

from fluxserve.jobs.store import Job, JobStore
from fluxserve.jobs.webhooks import WebhookSender

pytestmark = pytest.mark.usefixtures("loopback_fetches")  # the test servers run on 127.0.0.1

pytest_plugins = ["db_fixtures"]


class Receiver(SigningReceiver):
    """The shared receiver (500 to the first ``failures`` POSTs, then 200), read as parsed JSON bodies."""

    @property
    def bodies(self) -> list[dict]:
        with self.condition:
            return [delivery.json for delivery in self.received]

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        return [delivery.json for delivery in super().wait_for(lambda got: len(got) >= count, timeout)]


@pytest.fixture
def receiver():
    receiver = Receiver(failures=2)
    yield receiver
    receiver.close()


def build_payload(job: Job) -> tuple[str, dict]:
    return job.webhook["url"], {"request_id": job.id, "status": job.status, "payload": job.result}


def finish(store: JobStore, job: Job, result: dict) -> None:
    assert store.claim("w").id == job.id
    assert store.complete(job.id, "w", result)


def test_a_failing_receiver_gets_three_attempts_and_the_final_body(store, receiver):
    sender = WebhookSender(store, base_delay=0.05, poll_s=0.05, builders={"test": build_payload}).start()
    try:
        job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                           webhook={"url": receiver.url, "dialect": "test"})
        finish(store, job, {"images": [{"key": "outputs/a.png"}]})
        bodies = receiver.wait_for(3)
        expected = {"request_id": job.id, "status": "completed", "payload": {"images": [{"key": "outputs/a.png"}]}}
        assert bodies == [expected] * 3
        deadline_job = store.wait(job.id, 1)
        assert deadline_job.status == "completed"
        for _ in range(100):
            delivery = store.delivery(job.id)
            if delivery["status"] == "delivered":
                break
            threading.Event().wait(0.05)
        assert delivery["status"] == "delivered" and delivery["attempts"] == 3
        assert delivery["last_status_code"] == 200 and delivery["body"] == expected
    finally:
        sender.stop()
    assert len(receiver.bodies) == 3  # nothing after the success


def test_deliveries_resume_after_a_restart(db_url, receiver):
    first = JobStore(db_url)
    job = first.submit(endpoint="e", dialect="test", request={"model": "dev"},
                       webhook={"url": receiver.url, "dialect": "test"})
    finish(first, job, {"images": []})
    # the process that finished the job had no sender (or died before sending): nothing was sent
    first.close()
    assert receiver.bodies == []
    second = JobStore(db_url)
    sender = WebhookSender(second, base_delay=0.05, poll_s=0.05, builders={"test": build_payload}).start()
    try:
        bodies = receiver.wait_for(3)
        assert len(bodies) == 3 and bodies[-1]["request_id"] == job.id
    finally:
        sender.stop()
        second.close()


def test_delivery_gives_up_after_max_attempts(store):
    receiver = Receiver(failures=100)
    try:
        sender = WebhookSender(store, base_delay=0.01, max_attempts=3, builders={"test": build_payload})
        job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                           webhook={"url": receiver.url, "dialect": "test"})
        finish(store, job, {"images": []})
        for _ in range(200):
            sender.deliver_due()
            if store.delivery(job.id)["status"] != "pending":
                break
            threading.Event().wait(0.02)
        delivery = store.delivery(job.id)
        assert delivery["status"] == "failed" and delivery["attempts"] == 3
        assert delivery["last_error"] == "HTTP 500"
        assert len(receiver.bodies) == 3
    finally:
        receiver.close()


def test_an_unreachable_url_is_retried_with_backoff(store):
    sender = WebhookSender(store, base_delay=60, builders={"test": build_payload})
    job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                       webhook={"url": "http://127.0.0.1:1/nothing-listens", "dialect": "test"})
    finish(store, job, {"images": []})
    assert sender.deliver_due() == 1
    delivery = store.delivery(job.id)
    assert delivery["status"] == "pending" and delivery["attempts"] == 1
    assert "ConnectError" in delivery["last_error"]
    assert 55 < (delivery["next_attempt_at"] - delivery["created_at"]).total_seconds() < 65
    assert sender.deliver_due() == 0  # not due again yet


def test_a_dialect_without_a_builder_is_left_for_another_process(store):
    job = store.submit(endpoint="e", dialect="other", request={"model": "dev"},
                       webhook={"url": "http://127.0.0.1:1/x", "dialect": "other"})
    finish(store, job, {"images": []})
    sender = WebhookSender(store, builders={"test": build_payload})
    assert sender.deliver_due() == 0
    assert store.delivery(job.id)["status"] == "pending"


def test_a_builder_may_decline(store):
    job = store.submit(endpoint="e", dialect="test", request={"model": "dev"},
                       webhook={"url": "http://127.0.0.1:1/x", "dialect": "test"})
    finish(store, job, {"images": []})
    sender = WebhookSender(store, builders={"test": lambda job: None})
    assert sender.deliver_due() == 1
    assert store.delivery(job.id)["status"] == "skipped"
