"""Usage by the megapixel: the billing rules (seed 004's pricing notes), the catalogue's price table, and the
usage ledger in the job store on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from fluxserve.catalog import Catalog
from fluxserve.jobs import ledger
from fluxserve.jobs.models import job_usage
from fluxserve.jobs.store import utcnow
from fluxserve.usage import MEGAPIXEL, Billable, Price, billable, input_megapixels, megapixels

pytest_plugins = ["db_fixtures"]

REQUEST = {"model": "dev", "prompt": "a lighthouse", "steps": 2}


# ---- the rules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height", "expected"), [
    (1024, 1024, 1),  # 1 MP = 1024x1024 pixels
    (560, 560, 1),  # 0.3 MP: at least 1
    (1, 1, 1),
    (1024, 1025, 2),  # just over 1 MP rounds up
    (1030, 1030, 2),  # 1.01 MP
    (2048, 2048, 4),
    (2048, 1024, 2),
    (1920, 1080, 2),  # 1.98 MP
])
def test_each_image_rounds_up_to_whole_megapixels(width, height, expected):
    assert megapixels(width, height) == expected


def test_inputs_above_4_megapixels_count_as_4():
    assert input_megapixels(3000, 2100) == 4  # 6 MP
    assert input_megapixels(2048, 2048) == 4
    assert input_megapixels(2049, 2048) == 4  # would be 5
    assert input_megapixels(1536, 1536) == 3  # 2.25 MP: rounded up as an output would be
    assert megapixels(3000, 2100) == 7  # outputs are never capped (nor above 4 MP in practice)


def test_a_non_image_is_refused():
    for size in ((0, 10), (10, -1)):
        with pytest.raises(ValueError, match="positive"):
            megapixels(*size)


def test_each_reference_and_each_output_is_counted_separately():
    # two 0.3 MP references and a 6 MP one; two outputs of 1 MP and 1.5 MP
    billed = billable([(560, 560), (560, 560), (3000, 2100)], [(1024, 1024), (1254, 1254)])
    assert billed == Billable(input_images=3, input_megapixels=1 + 1 + 4, output_images=2, output_megapixels=1 + 2)
    assert billed.megapixels == 9
    assert billable([], [(512, 512)]) == Billable(0, 0, 1, 1)  # text-to-image: one small output, 1 MP
    assert MEGAPIXEL == 1024 * 1024


def test_price_first_megapixel_of_each_output_then_extra():
    price = Price(first_megapixel=0.03, extra_megapixel=0.015)
    assert price.cost(output_images=1, megapixels=1) == pytest.approx(0.03)
    # one 2 MP output and 3 MP of references: 0.03 + 4 x 0.015
    assert price.cost(output_images=1, megapixels=5) == pytest.approx(0.09)
    assert price.cost(output_images=2, megapixels=2) == pytest.approx(0.06)
    assert price.cost(output_images=0, megapixels=0) == 0


# ---- the catalogue's prices ------------------------------------------------------------------------------------
def _catalog_with(tmp_path, prices: str):
    path = tmp_path / "catalog.toml"
    path.write_text(Catalog.load().source.read_text() + "\n" + prices)
    return path


def test_the_packaged_catalogue_sets_no_price():
    catalog = Catalog.load()
    assert catalog.prices == {} and catalog.currency == ""


def test_an_operator_catalogue_sets_prices(tmp_path):
    path = _catalog_with(tmp_path, '[prices]\ncurrency = "EUR"\n[prices."fal-ai/flux-2-pro"]\n'
                         "first_megapixel = 0.05\nextra_megapixel = 0.02\n")
    catalog = Catalog.load(path)
    assert catalog.currency == "EUR"
    assert catalog.prices == {"fal-ai/flux-2-pro": Price(0.05, 0.02)}


@pytest.mark.parametrize(("prices", "message"), [
    ('[prices."fal-ai/nope"]\nfirst_megapixel = 1\nextra_megapixel = 1\n', "unknown endpoint 'fal-ai/nope'"),
    ('[prices."fal-ai/flux-2"]\nfirst_megapixel = 1\n', "extra_megapixel"),
    ('[prices."fal-ai/flux-2"]\nfirst_megapixel = -1\nextra_megapixel = 1\n', "first_megapixel"),
    ('[prices."fal-ai/flux-2"]\nfirst_megapixel = "1"\nextra_megapixel = 1\n', "first_megapixel"),
    ("[prices]\ncurrency = 3\n", "currency"),
])
def test_a_bad_price_table_names_the_entry(tmp_path, prices, message):
    with pytest.raises(ValueError, match=message):
        Catalog.load(_catalog_with(tmp_path, prices))


# ---- the ledger (SQLite and PostgreSQL) ------------------------------------------------------------------------
def _run(store, usage, *, endpoint="fal-ai/flux-2", owner=None, outcome="completed"):
    """Submit, claim and finish one job the way a worker does."""
    job = store.submit(endpoint=endpoint, dialect="fal", request=REQUEST, owner=owner)
    assert store.claim("w").id == job.id
    if outcome == "completed":
        assert store.complete(job.id, "w", {"images": []}, usage=usage) is not None
    else:
        assert store.fail(job.id, "stopped", status=outcome, worker_id="w", usage=usage) is not None
    return job


BIG = {"input_images": 2, "input_megapixels": 5, "output_images": 1, "output_megapixels": 2, "megapixels": 7,
       "gpu_seconds": 1.25, "steps": 28}


def test_every_finished_job_has_one_usage_row(store):
    done = _run(store, BIG, owner="key_a")
    row = ledger.job_usage_row(store, done.id)
    assert row["status"] == "completed" and row["owner"] == "key_a" and row["model"] == "dev"
    assert row["endpoint"] == "fal-ai/flux-2" and row["dialect"] == "fal"
    assert (row["input_images"], row["input_megapixels"], row["output_images"], row["output_megapixels"],
            row["megapixels"], row["steps"]) == (2, 5, 1, 2, 7, 28)
    assert row["gpu_seconds"] == pytest.approx(1.25) and row["finished_at"].tzinfo is not None
    # a second outcome for the same job changes nothing
    assert store.fail(done.id, "late", worker_id="w") is None
    assert ledger.job_usage_row(store, done.id)["status"] == "completed"

    queued = store.submit(endpoint="fal-ai/flux-2", dialect="fal", request=REQUEST)
    assert ledger.job_usage_row(store, queued.id) is None  # not finished yet
    assert store.request_cancel(queued.id) == "CANCELLATION_REQUESTED"
    cancelled = ledger.job_usage_row(store, queued.id)
    assert cancelled["status"] == "cancelled" and cancelled["megapixels"] == 0 and cancelled["gpu_seconds"] == 0


def test_failed_and_cancelled_jobs_bill_nothing_but_keep_their_engine_time(store):
    failed = _run(store, BIG, outcome="failed")
    cancelled = _run(store, BIG, outcome="cancelled")
    for job in (failed, cancelled):
        row = ledger.job_usage_row(store, job.id)
        assert [row[name] for name in ledger.BILLED] == [0] * len(ledger.BILLED)
        assert row["gpu_seconds"] == pytest.approx(1.25) and row["steps"] == 28


def test_report_groups_filters_and_prices(store):
    small = {"output_images": 2, "output_megapixels": 2, "megapixels": 2, "gpu_seconds": 0.5, "steps": 4}
    a1 = _run(store, BIG, owner="key_a", endpoint="fal-ai/flux-2/edit")
    _run(store, small, owner="key_a")
    _run(store, small, owner="key_b")
    _run(store, BIG, owner="key_b", outcome="failed")
    _run(store, small)  # keyless local use
    # a1 finished two days ago
    with store.engine.begin() as conn:
        conn.execute(update(job_usage).where(job_usage.c.job_id == a1.id)
                     .values(finished_at=utcnow() - timedelta(days=2)))

    groups, total = ledger.report(store, group_by="key")
    assert [g.group for g in groups] == ["key_a", "key_b", None]
    a, b, keyless = groups
    assert (a.jobs, a.completed, a.megapixels, a.input_megapixels, a.output_images) == (2, 2, 9, 5, 3)
    assert (b.jobs, b.completed, b.failed, b.megapixels, b.output_megapixels) == (2, 1, 1, 2, 2)
    assert (keyless.jobs, keyless.megapixels) == (1, 2)
    assert b.gpu_seconds == pytest.approx(1.75) and b.steps == 32
    assert (total.jobs, total.completed, total.failed, total.cancelled, total.megapixels) == (5, 4, 1, 0, 13)
    assert total.cost is None and a.cost is None  # no prices: no cost

    groups, total = ledger.report(store, group_by="endpoint", owner="key_a")
    assert {g.group: g.megapixels for g in groups} == {"fal-ai/flux-2": 2, "fal-ai/flux-2/edit": 7}
    assert total.megapixels == 9

    today = utcnow().strftime("%Y-%m-%d")
    earlier = (utcnow() - timedelta(days=2)).strftime("%Y-%m-%d")
    groups, _ = ledger.report(store, group_by="day")
    assert [(g.group, g.jobs) for g in groups] == [(earlier, 1), (today, 4)]

    groups, total = ledger.report(store, group_by="key", since=utcnow() - timedelta(days=1))
    assert [g.group for g in groups] == ["key_a", "key_b", None] and total.megapixels == 13 - 7
    _, before = ledger.report(store, until=utcnow() - timedelta(days=1))
    assert (before.jobs, before.megapixels) == (1, 7)
    _, future = ledger.report(store, since=utcnow() + timedelta(hours=1))
    assert future.jobs == 0 and future.megapixels == 0

    prices = {"fal-ai/flux-2/edit": Price(0.03, 0.015)}
    groups, total = ledger.report(store, group_by="key", prices=prices)
    a, b, _ = groups
    assert a.cost == pytest.approx(0.03 + 6 * 0.015) and a.unpriced_megapixels == 2
    assert b.cost is None and b.unpriced_megapixels == 2  # only unpriced endpoints
    assert total.cost == pytest.approx(a.cost) and total.unpriced_megapixels == 6
    with pytest.raises(ValueError, match="group_by"):
        ledger.report(store, group_by="model")


def test_usage_outlives_retention(store):
    job = _run(store, BIG, owner="key_a")
    assert store.delete_before(utcnow() + timedelta(seconds=1)) == 1
    assert store.get(job.id) is None
    assert ledger.job_usage_row(store, job.id)["megapixels"] == 7
