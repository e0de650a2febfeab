"""The stats page in a real browser (headless Chromium against a real server with demo models): the rankings
table and charts show the figures of real jobs as ``/api/stats`` gives them, the window and grouping controls
switch them, the playground links to the page; light, dark and narrow screenshots in test-results/playground/."""

from __future__ import annotations

import math
from datetime import timedelta

import httpx
import pytest
from fal_helpers import Server, settings_for
from playground_helpers import FLASH, open_playground, shot
from sqlalchemy import update

from fluxserve.jobs.models import jobs
from fluxserve.jobs.store import utcnow

TURBO = "fal-ai/flux-2/turbo"
SMALL = {"image_size": {"width": 512, "height": 512}}


def earlier_job(store, status: str, generation_s: float) -> None:
    """A job that ended three hours ago: in the 24-hour window, not in the last hour."""
    job = store.submit(endpoint=TURBO, dialect="fal", request={"model": "dev", "prompt": "earlier"})
    created = utcnow() - timedelta(hours=3)
    started = created + timedelta(seconds=1)
    with store.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(
            status=status, created_at=created, started_at=started, first_progress_at=started,
            completed_at=started + timedelta(seconds=generation_s)))


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "stats-page")) as running:
        with httpx.Client(base_url=running.url, timeout=120) as http:
            for prompt in ("a lighthouse", "a harbour"):
                queued = http.post(f"/queue/{FLASH}", json={"prompt": prompt, **SMALL})
                assert running.store.wait(queued.json()["request_id"], 120).status == "completed"
            sync = http.post("/v1/images/generations",
                             json={"model": "flux-2-dev", "prompt": "an owl", "size": "64x64", "steps": 2})
            assert sync.status_code == 200, sync.text
        earlier_job(running.store, "completed", 8.0)
        earlier_job(running.store, "completed", 12.0)
        earlier_job(running.store, "failed", 3.0)
        yield running


def open_stats(page, url: str, query: str = "") -> None:
    page.goto(f"{url}/stats{query}")
    page.wait_for_selector("#rankings[data-window]")


def table(page) -> dict[str, list[str]]:
    """The rankings table: the row's key -> its cells, as shown."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#rankings tbody tr[data-key]')]
        .map((row) => [row.dataset.key, [...row.cells].map((cell) => cell.textContent)]))""")


def ms(value: float) -> str:
    return f"{math.floor(value + 0.5):,}ms"  # as the page's Math.round (Python's round() goes to even on .5)


def test_table_and_charts_show_the_figures_of_real_jobs(page, server):
    expected = httpx.get(f"{server.url}/api/stats", params={"window": "24h"}, timeout=60).json()["groups"]
    open_stats(page, server.url)
    assert page.locator("#rankings").get_attribute("data-window") == "24h"
    rows = table(page)
    assert list(rows) == [group["key"] for group in expected]  # ranked by p50 generation time
    assert set(rows) >= {FLASH, TURBO}
    for rank, group in enumerate(expected, start=1):
        cells = rows[group["key"]]
        assert cells[0] == str(rank)
        assert cells[2:5] == [ms(group["generation_ms"]["p50"]), ms(group["generation_ms"]["p95"]),
                              f"{group['success_rate'] * 100:.1f}%"]
        assert cells[5] == ms(group["ttfb_ms"]["p50"]) and cells[7] == ms(group["queue_wait_ms"]["p50"])
        assert cells[10] == str(group["jobs"])
    assert rows[FLASH][10] == "2" and rows[FLASH][4] == "100.0%"
    assert rows[TURBO][2:5] == ["10,000ms", "11,800ms", "66.7%"]  # 8 s and 12 s; one of three failed
    assert rows[TURBO][-1] == "3"
    summary = page.text_content("#summary")
    assert summary.startswith(f"Fastest generation through {expected[0]['key']} at ") and "success rate" in summary
    assert "over the last 24 hours" in page.text_content("#scope")
    assert [c.text_content() for c in page.locator(".chart figcaption").all()] == [
        "Generation Time", "Success Rate", "Time to First Byte"]
    assert page.locator(".chart").first.locator("rect.bar").count() == len(expected)
    shot(page, "stats-light")


def test_window_and_grouping_switch_the_figures(page, server):
    open_stats(page, server.url)
    page.check("input[name=window][value='1h']")
    page.wait_for_selector("#rankings[data-window='1h']")
    assert page.url.endswith("?window=1h&group_by=endpoint")
    rows = table(page)
    assert TURBO not in rows and rows[FLASH][10] == "2"  # the earlier jobs are outside the hour
    assert "over the last hour" in page.text_content("#scope")

    page.select_option("#group-by", "dialect")
    page.wait_for_selector("#rankings[data-group-by='dialect']")
    rows = table(page)
    assert set(rows) == {"fal", "openai"} and rows["fal"][10] == "2" and rows["openai"][10] == "1"
    assert page.text_content("#key-heading") == "Dialect"
    assert page.text_content("#rankings-title") == "Dialect Rankings"  # as the seed's "Provider Rankings"
    shot(page, "stats-dialect-1h")

    page.reload()  # the choice is kept in the address
    page.wait_for_selector("#rankings[data-group-by='dialect'][data-window='1h']")
    assert page.is_checked("input[name=window][value='1h']") and page.input_value("#group-by") == "dialect"
    page.select_option("#group-by", "model")
    page.check("input[name=window][value='30d']")
    page.wait_for_selector("#rankings[data-group-by='model'][data-window='30d']")
    assert set(table(page)) == {job.model for job in server.store.list()}


def test_playground_links_to_the_stats_page(page, server):
    open_playground(page, server.url)
    page.click("header >> text=Stats")
    page.wait_for_selector("#rankings[data-window]")
    assert page.url == f"{server.url}/stats"


@pytest.mark.parametrize("scheme, viewport", [("dark", {"width": 1400, "height": 900}),
                                              ("light", {"width": 390, "height": 844})])
def test_dark_and_narrow(browser, server, scheme, viewport):
    context = browser.new_context(color_scheme=scheme, viewport=viewport)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        open_stats(page, server.url)
        assert len(table(page)) >= 2
        # nothing wider than the screen but the table, which scrolls in its own box
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        name = "stats-dark" if scheme == "dark" else "stats-narrow"
        shot(page, name, full_page=True)
        if scheme == "light":  # scrolled to the last figures, the group's name stays in view
            page.eval_on_selector(".table-wrap", "(box) => { box.scrollLeft = box.scrollWidth; }")
            key = page.locator("#rankings tbody .key").first.bounding_box()
            box = page.locator(".table-wrap").bounding_box()
            assert box["x"] - 1 <= key["x"] <= box["x"] + 1
            shot(page, "stats-narrow-scrolled", full_page=True)
    finally:
        context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def locked(demo_settings):
    with Server(settings_for(demo_settings, "stats-page-auth"), auth_required=True, start_workers=False) as running:
        running.alice_id, running.alice = running.store.create_key("alice")
        bob_id, _ = running.store.create_key("bob")
        for owner in (running.alice_id, bob_id, bob_id):
            job = running.store.submit(endpoint=FLASH, dialect="fal", owner=owner,
                                       request={"model": "klein-4b", "prompt": "owned"})
            started = utcnow() - timedelta(seconds=5)
            with running.store.engine.begin() as conn:
                conn.execute(update(jobs).where(jobs.c.id == job.id).values(
                    status="completed", started_at=started, completed_at=started + timedelta(seconds=2)))
        yield running


def test_a_key_is_needed_and_shows_its_own_jobs(page, locked):
    open_stats(page, locked.url)
    assert "requires an API key" in page.text_content("#summary")
    assert page.locator("#summary").get_attribute("data-tone") == "error" and table(page) == {}
    page.evaluate("(key) => localStorage.setItem('fluxserve.key', key)", locked.alice)  # as the playground saves it
    page.reload()
    page.wait_for_selector("#rankings[data-window]")
    assert table(page)[FLASH][10] == "1"  # alice's job, not bob's two
    assert table(page)[FLASH][2] == "2,000ms"
