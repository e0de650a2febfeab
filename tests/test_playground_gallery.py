"""The playground's gallery: ``/api/history``'s filters and ``DELETE /api/history/{id}`` over plain HTTP, then the
gallery in headless Chromium against a real server on the demo models: jobs made through all three APIs, the
filters and text search, the lightbox, "Use these parameters", compare and delete. Screenshots land in
test-results/playground/ (light, dark and 420 px wide)."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from fal_helpers import Server, settings_for
from playground_helpers import FLASH, open_playground, shot
from sqlalchemy import insert, update

from fluxserve.jobs import models
from fluxserve.jobs.store import utcnow

SMALL = {"image_size": {"width": 512, "height": 512}}
FILLERS = 26  # older failed jobs: more than a page of the gallery (24 tiles)


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "gallery")) as running:
        yield running


@pytest.fixture(scope="module")
def locked(demo_settings):
    with Server(settings_for(demo_settings, "gallery-auth"), auth_required=True) as running:
        yield running


@pytest.fixture(scope="module")
def made(server):
    """Four finished jobs, one per API and two fal ones with different parameters: {name: job id}; before them,
    older failed jobs without images (written straight into the store, so no worker runs them)."""
    long_ago = utcnow() - timedelta(hours=1)
    with server.store._write() as conn:
        conn.execute(insert(models.jobs), [
            {"id": f"filler-{i:02d}", "endpoint": FLASH, "dialect": "fal", "model": "flash", "status": "failed",
             "request": {"prompt": f"filler {i}"}, "error": "Out of memory", "error_type": "internal_error",
             "created_at": long_ago + timedelta(seconds=i), "updated_at": long_ago, "completed_at": long_ago}
            for i in range(FILLERS)])
    with httpx.Client(base_url=server.url, timeout=120) as client:
        fox = client.post("/run/" + FLASH, json={"prompt": "a red fox in the snow", "seed": 7, **SMALL})
        assert fox.status_code == 200, fox.text
        owl = client.post("/run/" + FLASH, json={"prompt": "a snowy owl at night", "seed": 8,
                                                 "image_size": {"width": 512, "height": 768}})
        assert owl.status_code == 200, owl.text
        teapot = client.post("/v1/images/generations",
                             json={"prompt": "an openai teapot", "model": "flux-2-flash", "size": "512x512"})
        assert teapot.status_code == 200, teapot.text
        boat = client.post("/v1/models/black-forest-labs/flux-2-flash/predictions", headers={"Prefer": "wait=60"},
                           json={"input": {"prompt": "a replicate sailing boat", "aspect_ratio": "custom",
                                           "width": 512, "height": 512}})
        assert boat.status_code in (200, 201), boat.text
        assert boat.json()["status"] == "succeeded", boat.text
    items = httpx.get(server.url + "/api/history", params={"limit": 200}).json()["items"]
    by_prompt = {item["prompt"]: item["id"] for item in items}
    return {"fox": fox.headers["x-fal-request-id"], "owl": owl.headers["x-fal-request-id"],
            "teapot": by_prompt["an openai teapot"], "boat": boat.json()["id"]}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Key {secret}"}


# ---- routes ------------------------------------------------------------------------------------------------------
def test_history_filters(server, made):
    def ids(**params):
        response = httpx.get(server.url + "/api/history", params={"limit": 200, **params})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert ids(dialect="openai") == [made["teapot"]]
    assert ids(dialect="replicate") == [made["boat"]]
    assert set(ids(dialect="fal")) >= {made["fox"], made["owl"]} and made["teapot"] not in ids(dialect="fal")
    assert ids(q="SNOW") == [made["owl"], made["fox"]]  # case-insensitive, newest first
    assert ids(q="snow", dialect="fal", endpoint=FLASH, status="completed") == [made["owl"], made["fox"]]
    assert ids(q="snow", status="failed") == [] and ids(q="no such words") == []
    assert ids(q="  owl ") == [made["owl"]]  # surrounding spaces are not part of the search
    page = httpx.get(server.url + "/api/history", params={"q": "snow", "limit": 1}).json()
    assert [item["id"] for item in page["items"]] == [made["owl"]]
    assert ids(q="snow", before=page["next_before"]) == [made["fox"]]

    for field, value in (("dialect", "grpc"), ("status", "done"), ("endpoint", "fal-ai/nope"), ("q", "x" * 201),
                         ("q", "nul\x00"), ("before", "yesterday")):
        bad = httpx.get(server.url + "/api/history", params={field: value})
        assert bad.status_code == 422, (field, bad.text)
        assert bad.json()["detail"][0]["loc"] == ["query", field]
        assert bad.json()["detail"][0]["msg"]


def test_delete_a_job_with_its_files(locked):
    alice_id, alice = locked.store.create_key("alice")
    _, bob = locked.store.create_key("bob")
    locked.app.state.auth.forget()
    storage = locked.app.state.storage
    with httpx.Client(base_url=locked.url, timeout=120) as client:
        made = client.post("/run/" + FLASH, json={"prompt": "to delete", **SMALL}, headers=auth(alice))
        assert made.status_code == 200, made.text
        job_id = made.headers["x-fal-request-id"]
        keys = locked.store.job_files(job_id)
        assert any(key.startswith("outputs/") for key in keys) and all(storage.exists(key) for key in keys)
        image_url = client.get("/api/history", headers=auth(alice)).json()["items"][0]["images"][0]["url"]
        assert client.get(image_url, headers=auth(alice)).status_code == 200

        assert client.delete(f"/api/history/{job_id}").status_code == 401
        other = client.delete(f"/api/history/{job_id}", headers=auth(bob))  # another key's job: unknown to bob
        assert other.status_code == 404 and job_id in other.json()["detail"]
        assert client.delete("/api/history/no-such-job", headers=auth(alice)).status_code == 404

        running = locked.store.submit(endpoint=FLASH, dialect="fal", request={"prompt": "busy"}, owner=alice_id)
        with locked.store._write() as conn:  # held by a worker elsewhere, so this server's workers leave it alone
            conn.execute(update(models.jobs).where(models.jobs.c.id == running.id).values(
                status="running", worker_id="elsewhere/1", lease_expires_at=utcnow().replace(year=2100)))
        busy = client.delete(f"/api/history/{running.id}", headers=auth(alice))
        assert busy.status_code == 409 and "cancel it first" in busy.json()["detail"]
        assert locked.store.get(running.id).status == "running"
        locked.store.fail(running.id, "stopped", status="cancelled")  # once cancelled, an admin key may delete it
        _, admin = locked.store.create_key("ops", admin=True)
        locked.app.state.auth.forget()
        assert client.delete(f"/api/history/{running.id}", headers=auth(bob)).status_code == 404
        assert client.delete(f"/api/history/{running.id}", headers=auth(admin)).status_code == 204
        assert locked.store.get(running.id) is None

        assert client.get(f"/queue/fal-ai/flux-2/requests/{job_id}/status", headers=auth(alice)).status_code == 200
        gone = client.delete(f"/api/history/{job_id}", headers=auth(alice))
        assert gone.status_code == 204
        assert not any(storage.exists(key) for key in keys)
        assert client.get(image_url, headers=auth(alice)).status_code == 404
        assert job_id not in client.get("/api/history", headers=auth(alice)).text
        assert client.get(f"/queue/fal-ai/flux-2/requests/{job_id}/status", headers=auth(alice)).status_code == 404
        assert client.delete(f"/api/history/{job_id}", headers=auth(alice)).status_code == 404


# ---- the gallery in Chromium ----------------------------------------------------------------------------------------
def tile(page, job_id: str):
    return page.locator(f"#gallery-grid .tile[data-job='{job_id}']")


def tile_jobs(page) -> list[str]:
    return page.eval_on_selector_all("#gallery-grid .tile", "tiles => tiles.map(t => t.dataset.job)")


def open_gallery(page, url: str) -> None:
    open_playground(page, url)
    page.wait_for_selector("#gallery-grid .tile")


def shots(page, name: str, *, full_page: bool = False) -> None:
    """Light, dark and 420 px wide screenshots of the page as it is now (scrolled to the gallery)."""
    scroll = "() => document.getElementById('gallery-panel').scrollIntoView()"
    page.evaluate(scroll)
    shot(page, name, full_page=full_page)
    page.emulate_media(color_scheme="dark")
    shot(page, name + "-dark", full_page=full_page)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 420, "height": 900})
    page.evaluate(scroll)
    shot(page, name + "-narrow", full_page=full_page)
    page.set_viewport_size({"width": 1400, "height": 900})


def test_gallery_grid_badges_and_paging(page, server, made):
    open_gallery(page, server.url)
    jobs = tile_jobs(page)
    assert jobs[:4] == [made["boat"], made["teapot"], made["owl"], made["fox"]]  # newest first
    assert len(jobs) == 24 and page.locator("#gallery-more").is_visible()
    assert tile(page, made["fox"]).locator("img").get_attribute("src").startswith(server.url + "/files/")
    assert tile(page, made["teapot"]).locator(".badge.dialect").inner_text() == "OpenAI"
    assert tile(page, made["boat"]).locator(".badge.dialect").inner_text() == "Replicate"
    assert tile(page, made["fox"]).locator(".badge.status-completed").inner_text() == "Completed"
    assert "flux-2/flash" in tile(page, made["fox"]).locator(".badge.endpoint").inner_text()
    filler = tile(page, "filler-25")
    assert filler.locator(".badge.status-failed").inner_text() == "Failed"
    assert filler.locator(".tile-empty").inner_text() == "Failed"  # no image: the tile says why
    shots(page, "gallery", full_page=True)

    page.click("#gallery-more")
    page.wait_for_function(f"() => document.querySelectorAll('#gallery-grid .tile').length === {4 + FILLERS}")
    assert tile_jobs(page)[-1] == "filler-00" and page.locator("#gallery-more").is_hidden()
    # the history panel words statuses for people too; the API is the gallery's to show (fal's history omits it)
    entry = page.locator(f"#history .history-item[data-job='{made['teapot']}']")
    assert "Completed" in entry.inner_text() and "OpenAI" not in entry.inner_text()


def test_gallery_filters_and_search(page, server, made):
    open_gallery(page, server.url)
    page.select_option("#gallery-dialect", "openai")
    page.wait_for_function("() => [...document.querySelectorAll('#gallery-grid .tile')]"
                           ".every(t => t.dataset.dialect === 'openai')")
    assert tile_jobs(page) == [made["teapot"]]

    page.select_option("#gallery-dialect", "")
    page.select_option("#gallery-status-filter", "failed")
    page.wait_for_function("() => [...document.querySelectorAll('#gallery-grid .tile')]"
                           ".every(t => t.dataset.status === 'failed')")
    assert len(tile_jobs(page)) == 24 and {t.split("-")[0] for t in tile_jobs(page)} == {"filler"}

    page.select_option("#gallery-status-filter", "completed")
    page.select_option("#gallery-endpoint", FLASH)
    with page.expect_response(lambda r: "/api/history?" in r.url and "q=Snow" in r.url):
        page.locator("#gallery-search").press_sequentially("Snow", delay=20)  # one request once typing stops
    page.wait_for_function("() => document.querySelectorAll('#gallery-grid .tile').length === 2")
    assert tile_jobs(page) == [made["owl"], made["fox"]]
    shots(page, "gallery-filtered")

    page.fill("#gallery-search", "no such words at all")
    page.wait_for_selector("#gallery-status:text('Nothing matches these filters.')")
    assert page.locator("#gallery-grid .tile").count() == 0


def test_lightbox_keys_focus_and_download(page, server, made):
    open_gallery(page, server.url)
    opener = tile(page, made["owl"]).locator(".tile-open")
    opener.click()
    box = page.locator("#lightbox")
    box.wait_for()
    assert page.locator("#lightbox-prompt").inner_text() == "a snowy owl at night"
    assert page.inner_text("#lightbox-params dd[data-param='seed']") == "8"
    assert page.inner_text("#lightbox-params dd[data-param='size']") == "512×768"
    assert page.inner_text("#lightbox-params dd[data-param='api']") == "fal"
    page.wait_for_function("() => document.getElementById('lightbox-image').naturalHeight === 768")
    download = page.locator("#lightbox-download")
    assert download.get_attribute("href") == tile(page, made["owl"]).locator("img").get_attribute("src")
    assert download.get_attribute("download").endswith(".png")
    shots(page, "gallery-lightbox")

    page.keyboard.press("ArrowRight")  # the next older image
    page.wait_for_function("() => document.getElementById('lightbox-prompt').textContent === 'a red fox in the snow'")
    assert page.inner_text("#lightbox-params dd[data-param='size']") == "512×512"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.getElementById('lightbox-prompt').textContent === 'an openai teapot'")
    assert page.inner_text("#lightbox-params dd[data-param='api']") == "OpenAI"
    for key in ["Tab"] * 12 + ["Shift+Tab"] * 12:  # focus stays inside the open dialog
        page.keyboard.press(key)
        assert page.evaluate("() => document.getElementById('lightbox').contains(document.activeElement)"), key
    page.keyboard.press("Escape")
    box.wait_for(state="hidden")
    page.wait_for_function("(el) => document.activeElement === el", arg=opener.element_handle())  # focus is back


def test_use_these_parameters(page, server, made):
    open_gallery(page, server.url)
    page.fill("#in-prompt", "something else")
    tile(page, made["owl"]).locator(".tile-open").click()
    page.click("#lightbox-use")
    page.locator("#lightbox").wait_for(state="hidden")
    page.wait_for_function("() => document.getElementById('in-prompt').value === 'a snowy owl at night'")
    assert page.input_value("#in-seed") == "8"
    assert page.input_value("#in-image_size") == "custom"
    assert (page.input_value("#in-image_size-width"), page.input_value("#in-image_size-height")) == ("512", "768")
    page.wait_for_function("() => document.querySelector('#images img')?.naturalHeight === 768")  # and its output

    tile(page, made["boat"]).locator(".tile-open").click()  # another API: what the form has a field for
    page.click("#lightbox-use")
    page.wait_for_function("() => document.getElementById('in-prompt').value === 'a replicate sailing boat'")
    assert '"dialect": "replicate"' in page.locator("#params").text_content()


def test_compare_two_images(page, server, made):
    open_gallery(page, server.url)
    assert page.locator("#gallery-compare-bar").is_hidden()
    tile(page, made["fox"]).locator(".compare-pick").check()
    assert "pick one more" in page.inner_text("#gallery-compare-count")
    assert page.locator("#gallery-compare").is_disabled()
    tile(page, made["owl"]).locator(".tile-open").click()  # the lightbox picks the second
    page.click("#lightbox-pick")
    assert page.get_attribute("#lightbox-pick", "aria-pressed") == "true"
    page.keyboard.press("Escape")
    assert tile(page, made["owl"]).locator(".compare-pick").is_checked()
    assert page.inner_text("#gallery-compare-count") == "2 images picked"
    shot(page, "gallery-picked")

    page.click("#gallery-compare")
    page.locator("#compare").wait_for()
    assert page.locator("#compare-side img").count() == 2
    differing = page.eval_on_selector_all("#compare-diff tbody tr", "rows => rows.map(r => r.dataset.param)")
    assert set(differing) == {"seed", "size", "prompt"}, differing  # same endpoint, API, steps...: not listed
    assert page.inner_text("#compare-diff tr[data-param='seed']").split() == ["Seed", "7", "8"]
    shots(page, "gallery-compare")

    page.click("#compare-mode-slider")
    assert page.locator("#compare-side").is_hidden() and page.locator("#compare-slider").is_visible()
    page.fill("#compare-reveal", "20")
    assert page.get_attribute("#compare-top", "style") == "clip-path: inset(0px 80% 0px 0px);"
    shots(page, "gallery-compare-slider")
    page.keyboard.press("Escape")
    page.locator("#compare").wait_for(state="hidden")

    page.click("#gallery-compare-bar button:text('Clear')")
    assert page.locator("#gallery-compare-bar").is_hidden()
    assert page.locator("#gallery-grid .compare-pick:checked").count() == 0


def test_delete_from_the_lightbox(page, server, made):
    made_now = httpx.post(server.url + "/run/" + FLASH, timeout=120, json={"prompt": "a job to delete", **SMALL})
    assert made_now.status_code == 200, made_now.text
    job_id = made_now.headers["x-fal-request-id"]
    keys = server.store.job_files(job_id)
    storage = server.app.state.storage
    assert keys and all(storage.exists(key) for key in keys)
    open_gallery(page, server.url)
    tile(page, job_id).locator(".tile-open").click()

    page.once("dialog", lambda dialog: dialog.dismiss())  # changed their mind: nothing happens
    page.click("#lightbox-delete")
    assert tile(page, job_id).count() == 1 and server.store.get(job_id) is not None

    messages = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    page.click("#lightbox-delete")
    tile(page, job_id).wait_for(state="detached")
    assert "cannot be undone" in messages[0]
    assert server.store.get(job_id) is None and not any(storage.exists(key) for key in keys)
    assert page.locator("#lightbox").is_visible()  # the next image is shown
    assert page.inner_text("#lightbox-prompt") == "a replicate sailing boat"
    page.wait_for_selector(f"#history .history-item[data-job='{job_id}']", state="detached")
    page.keyboard.press("Escape")
    assert page.inner_text("#gallery-status") == "Deleted."
