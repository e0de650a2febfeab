"""Webhook delivery against a real local HTTP receiver, on SQLite and PostgreSQL: retries with backoff,
persisted state that survives a restart, and dialect payload builders."""

from __future__ import annotations

import threading
import time

import pytest
from webhook_receivers import DrippingReceiver, SigningReceiver

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


def wait_until(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- one slow receiver holds one slot ------------------------------------------------------------------------
def submit_finished(store: JobStore, url: str, owner: str | None) -> Job:
    job = store.submit(endpoint="e", dialect="test", request={"model": "dev"}, owner=owner,
                       webhook={"url": url, "dialect": "test"})
    finish(store, job, {"images": []})
    return job


def test_a_slow_receiver_holds_one_slot_and_other_keys_webhooks_go_out_meanwhile(store):
    """Key A's receiver drips its answer for two minutes; key B's webhook, due later, still goes out at once,
    and A's deliveries hold no more slots than a key may (the bug: B waited for A's whole batch)."""
    slow, fast = DrippingReceiver(hold_s=120), Receiver(failures=0)
    a, b = store.create_key("a")[0], store.create_key("b")[0]
    sender = WebhookSender(store, timeout=300, concurrency=4, per_key=2, poll_s=0.05,
                           builders={"test": build_payload})
    try:
        sender.start()
        held = [submit_finished(store, slow.url, a) for _ in range(5)]
        assert slow.wait_for(lambda r: r.holding >= 2, 30)
        job = submit_finished(store, fast.url, b)
        done = time.monotonic()
        [body] = fast.wait_for(1, timeout=20)
        assert body["request_id"] == job.id
        assert time.monotonic() - done < 10  # ~0.1 s; behind A's batch it would be 120 s
        assert wait_until(lambda: store.delivery(job.id)["status"] == "delivered")
        # A holds its share (two slots) and no more, although two slots are free and three of A's are due
        assert slow.wait_for(lambda r: r.holding == 2, 5) and slow.most == 2 and slow.requests == 2
        assert sorted(store.delivery(j.id)["attempts"] for j in held) == [0] * 5  # none of A's has ended
    finally:
        slow.close()
        sender.stop()
        fast.close()


# ---- every delivery error is an attempt ------------------------------------------------------------------------
UNPARSEABLE = ["http://0177.0.0.1/", "http://①②⑦.0.0.1/", "http://", "http://xn--/"]


@pytest.mark.parametrize("url", UNPARSEABLE)
def test_a_url_httpx_cannot_parse_is_an_attempt_retried_with_backoff_until_it_fails(store, url):
    """Rows written before submits were checked (or by another tool) may hold such URLs: each try is recorded
    with its error and backoff, and the delivery ends as failed instead of being retried silently for ever."""
    sender = WebhookSender(store, base_delay=60, max_attempts=2, builders={"test": build_payload})
    job = submit_finished(store, url, None)
    assert sender.deliver_due() == 1
    delivery = store.delivery(job.id)
    assert delivery["status"] == "pending" and delivery["attempts"] == 1 and delivery["last_error"]
    assert 55 < (delivery["next_attempt_at"] - delivery["created_at"]).total_seconds() < 65
    assert sender.deliver_due() == 0  # backing off
    store.update_delivery(delivery["id"], next_attempt_at=delivery["created_at"])
    assert sender.deliver_due() == 1
    delivery = store.delivery(job.id)
    assert delivery["status"] == "failed" and delivery["attempts"] == 2


def test_unparseable_urls_do_not_hold_up_a_good_webhook(store):
    bad_key, good_key = store.create_key("bad")[0], store.create_key("good")[0]
    receiver = Receiver(failures=0)
    sender = WebhookSender(store, base_delay=0.05, max_attempts=3, poll_s=0.05, builders={"test": build_payload})
    try:
        bad = [submit_finished(store, UNPARSEABLE[i % len(UNPARSEABLE)], bad_key) for i in range(40)]
        good = submit_finished(store, receiver.url, good_key)
        sender.start()
        [body] = receiver.wait_for(1, timeout=20)
        assert body["request_id"] == good.id
        wait_until(lambda: all(store.delivery(job.id)["status"] == "failed" for job in bad), 30)
        rows = [store.delivery(job.id) for job in bad]
        assert {(row["status"], row["attempts"]) for row in rows} == {("failed", 3)}
        assert all(row["last_error"] for row in rows)
    finally:
        sender.stop()
        receiver.close()


def test_claims_take_one_of_each_key_before_a_second_and_respect_what_is_in_flight(db_url):
    store, other = JobStore(db_url), JobStore(db_url)  # two API processes on one database
    try:
        a, b = store.create_key("a")[0], store.create_key("b")[0]
        from_a = [submit_finished(store, "http://127.0.0.1:1/a", a).id for _ in range(6)]
        from_b = submit_finished(store, "http://127.0.0.1:1/b", b).id
        keyless = submit_finished(store, "http://127.0.0.1:1/n", None).id
        first = store.claim_deliveries(["test"], limit=3, per_owner=2)
        assert {d.job_id for d in first} == {from_a[0], from_b, keyless}  # B's and the keyless one not last
        assert {d.owner for d in first} == {a, b, None}
        # A has one in flight: the other process may give it one more, not two, however many slots it has
        second = other.claim_deliveries(["test"], limit=10, per_owner=2, busy={a: 1})
        assert [d.job_id for d in second] == [from_a[1]]
        assert store.claim_deliveries(["test"], limit=10, per_owner=2, busy={a: 2}) == []
        # leased rows are nobody else's; without a limit per key the rest go, earliest first
        rest = other.claim_deliveries(["test"], limit=10)
        assert [d.job_id for d in rest] == from_a[2:]
    finally:
        store.close()
        other.close()


def test_racing_senders_never_claim_one_row_twice(db_url):
    stores = [JobStore(db_url) for _ in range(3)]
    try:
        owners = [stores[0].create_key(name)[0] for name in ("a", "b", "c")]
        made = {submit_finished(stores[0], "http://127.0.0.1:1/x", owners[i % 3]).id for i in range(30)}
        claimed: list[list[str]] = [[] for _ in stores]

        def claim_all(index: int) -> None:
            for _ in range(50):
                got = stores[index].claim_deliveries(["test"], limit=4, per_owner=2)
                claimed[index] += [d.job_id for d in got]

        threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        every = [job_id for part in claimed for job_id in part]
        assert sorted(every) == sorted(made)  # each once
    finally:
        for store in stores:
            store.close()


def test_a_jobs_webhooks_go_one_at_a_time_and_no_event_follows_its_terminal_webhook(store):
    """A job's webhooks are never sent at once (a slot holds the job); an event queued after the terminal
    webhook started going out (a log line written as the job ended) is skipped, not sent after it."""
    receiver = Receiver(failures=0)
    try:
        job = submit_finished(store, receiver.url, None)
        other = submit_finished(store, receiver.url, None)
        final = store.delivery(job.id)
        assert [d.job_id for d in store.claim_deliveries(["test"], busy_jobs=[job.id])] == [other.id]
        # the terminal webhook was built at its first attempt (and may be in flight now); a late event:
        store.update_delivery(final["id"], url=receiver.url, body={"final": True})
        store.queue_webhook_event(job.id, "test", "logs", receiver.url, {"late": True})
        sender = WebhookSender(store, builders={"test": build_payload})
        [event] = store.claim_webhook_events(["test"])
        assert not sender.deliver(event)
        assert [e["status"] for e in store.webhook_events(job.id)] == ["skipped"]
        assert receiver.bodies == []
    finally:
        receiver.close()
