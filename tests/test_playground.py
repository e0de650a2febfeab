"""The playground in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright) against a
real server (uvicorn on a free port, demo models). It generates through fal's queue API with a progress bar,
shows jobs of every dialect in the history (fal's request history API: pages, status filter), marks 422 fields, and asks for the API key when the server needs
one; follows a run with previews, a step counter and the time left in plain words; groups the endpoints under
friendly names; says when demo weights are loaded; takes reference images by drag and drop with their megapixels
against the limit; clears errors as the form changes. ``/api/history`` is checked over plain HTTP too.
Screenshots land in test-results/playground/."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest
from fal_helpers import Server, settings_for
from playground_helpers import FLASH, generate_and_wait, open_playground, pick, pick_small_flash, shot


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "playground")) as running:
        yield running


@pytest.fixture(scope="module")
def locked(demo_settings):
    with Server(settings_for(demo_settings, "playground-auth"), auth_required=True) as running:
        yield running


# ---- routes ------------------------------------------------------------------------------------------------------
def test_page_and_assets_are_served(server):
    for path in ("/", "/playground"):
        response = httpx.get(server.url + path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/web/app.js">' in response.text
    assert httpx.get(server.url + "/web/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/web/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(server.url + "/web/secrets.txt").status_code == 404


def test_history_route(server, locked):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        stored = client.post("/run/" + FLASH, json={"prompt": "kept prompt", "image_size": {"width": 512, "height": 512}})
        assert stored.status_code == 200, stored.text
        hidden = client.post("/queue/" + FLASH, headers={"X-Fal-Store-IO": "0"},
                             json={"prompt": "secret prompt", "image_size": {"width": 512, "height": 512}})
        hidden_id = hidden.json()["request_id"]
        server.store.wait(hidden_id, 60)

        body = client.get("/api/history", params={"limit": 50}).json()
        by_id = {item["id"]: item for item in body["items"]}
        kept = by_id[stored.headers["x-fal-request-id"]]
        assert kept["prompt"] == "kept prompt" and kept["dialect"] == "fal" and kept["status"] == "completed"
        assert kept["input"]["prompt"] == "kept prompt"
        assert kept["images"][0]["url"].startswith(server.url + "/files/")
        assert (kept["images"][0]["width"], kept["images"][0]["height"]) == (512, 512)
        assert client.get(kept["images"][0]["url"]).status_code == 200
        secret = by_id[hidden_id]
        assert secret["store_io"] is False
        assert secret["prompt"] is None and secret["input"] is None and secret["request"] is None
        assert "secret prompt" not in httpx.get(server.url + "/api/history").text

        newest_first = [item["created_at"] for item in body["items"]]
        assert newest_first == sorted(newest_first, reverse=True)
        page = client.get("/api/history", params={"limit": 1}).json()
        assert len(page["items"]) == 1 and page["next_before"] == page["items"][0]["created_at"]
        older = client.get("/api/history", params={"limit": 1, "before": page["next_before"]}).json()
        assert older["items"][0]["created_at"] < page["next_before"]

        bad = client.get("/api/history", params={"before": "yesterday"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "before"]
        assert client.get("/api/history", params={"limit": 0}).status_code == 422

    assert httpx.get(locked.url + "/api/history").status_code == 401
    _, secret_key = locked.store.create_key("history")
    locked.app.state.auth.forget()
    assert httpx.get(locked.url + "/api/history", headers={"Authorization": f"Key {secret_key}"}).status_code == 200


# ---- the page in Chromium -------------------------------------------------------------------------------------------
def test_generate_through_the_queue(page, server):
    open_playground(page, server.url)
    assert page.locator("#key-panel").is_hidden()  # loopback without keys: no key needed
    pick_small_flash(page, "a red lighthouse on a cliff at dusk")
    page.fill("#in-seed", "1234")
    result = generate_and_wait(page)

    assert (result["width"], result["height"]) == (512, 512)
    assert result["src"].startswith(server.url + "/files/outputs/")
    steps = result["steps"]
    assert steps and steps[-1] == 4, steps  # flash: 4 steps
    assert any(0 < s < 4 for s in steps), steps  # the bar moved through the steps, not straight to the end
    assert steps == sorted(steps)
    page.wait_for_selector("#status[data-tone='ok']")
    assert page.locator("#progress").evaluate("bar => bar.value === bar.max")
    assert page.locator("#logs li", has_text="step 4/4").count() == 1
    assert page.locator("dd[data-meta='seed']").inner_text() == "1234"
    download = page.locator("#images a[download]")
    assert download.get_attribute("href") == result["src"]
    assert download.get_attribute("download").endswith(".png")
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_disabled()

    # the job is in the history; clicking it re-opens its output and fills the form with its input
    page.wait_for_selector(f"#history .history-item[data-job='{page.inner_text('#job-id')}'] img")
    shot(page, "playground", full_page=True)
    page.emulate_media(color_scheme="dark")
    shot(page, "playground-dark", full_page=True)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 420, "height": 900})
    shot(page, "playground-narrow", full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})
    page.fill("#in-prompt", "something else")
    page.select_option("#in-image_size", "square_hd")
    page.locator("#history .history-item").first.click()
    page.wait_for_selector("#images img")
    assert page.input_value("#in-prompt") == "a red lighthouse on a cliff at dusk"
    assert page.input_value("#in-image_size") == "custom"
    assert page.input_value("#in-image_size-width") == "512"
    assert page.input_value("#in-seed") == "1234"


def test_cancel_a_running_job(page, server):
    open_playground(page, server.url)
    pick(page, "fal-ai/flux-2")  # up to 50 steps: long enough to cancel midway
    page.fill("#in-prompt", "to be cancelled")
    page.fill("#in-num_inference_steps", "50")
    page.click("#generate")
    page.wait_for_function("() => Number(document.getElementById('progress').dataset.step) >= 1", timeout=60_000)
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Cancelled')",
                           timeout=60_000)
    job = server.store.get(page.inner_text("#job-id"))
    assert job.status == "cancelled"
    assert page.locator("#images img").count() == 0
    assert page.locator("#generate").is_enabled()


def test_edit_with_a_picked_reference_image(page, server, reference_image):
    open_playground(page, server.url)
    pick(page, FLASH + "/edit")
    assert page.input_value("#in-image_size") == "auto"
    page.set_input_files("#in-image_urls", reference_image(576, 512))
    page.wait_for_selector("#field-image_urls .thumb img")
    page.fill("#in-prompt", "make it blue")
    result = generate_and_wait(page)
    assert (result["width"], result["height"]) == (576, 512)  # auto: the reference's size
    shot(page, "playground-edit")
    job = server.store.get(page.inner_text("#job-id"))
    assert job.input["image_urls"][0].startswith("data:image/png;base64,")


def test_history_shows_other_dialects(page, server):
    open_playground(page, server.url)
    pick(page, FLASH + "/edit")
    response = httpx.post(server.url + "/v1/images/generations", timeout=120,
                          json={"prompt": "an openai teapot", "model": "flux-2-flash", "size": "512x512",
                                "seed": 77})
    assert response.status_code == 200, response.text
    page.click("#history-refresh")
    item = page.locator("#history .history-item", has_text="an openai teapot")
    item.wait_for()
    assert item.locator("img").count() == 1
    assert "Completed" in item.inner_text() and "flux-2/flash" in item.inner_text()
    item.click()
    page.wait_for_function("() => document.querySelector('#images img')?.naturalWidth === 512")
    # OpenAI's body does not fit fal's form: the current form (the edit endpoint) takes over what matches
    assert page.input_value("#endpoint") == FLASH + "/edit"
    assert page.input_value("#in-prompt") == "an openai teapot"
    assert page.input_value("#in-seed") == "77"
    assert (page.input_value("#in-image_size-width"), page.input_value("#in-image_size-height")) == ("512", "512")
    assert '"model": "flux-2-flash"' in page.locator("#params").text_content()  # the request as it was sent
    page.click("#params-box summary")
    shot(page, "playground-history-openai", full_page=True)


def test_validation_errors_are_shown_at_their_fields(page, server):
    open_playground(page, server.url)
    pick_small_flash(page, "")
    page.fill("#in-image_size-width", "100")
    page.click("#generate")
    page.wait_for_selector("#err-prompt:not([hidden])")
    assert "at least 1 character" in page.inner_text("#err-prompt")
    assert page.locator("#in-prompt").get_attribute("aria-invalid") == "true"
    size_error = page.inner_text("#err-image_size")
    assert "width" in size_error and "512" in size_error
    assert "422" in page.inner_text("#status")
    shot(page, "playground-422")
    assert page.locator("#images img").count() == 0

    page.fill("#in-prompt", "fixed")  # errors clear on the next submit
    page.fill("#in-image_size-width", "512")
    assert generate_and_wait(page)["width"] == 512
    assert page.locator("#err-prompt").is_hidden()


def test_key_is_asked_for_when_the_server_needs_one(page, locked):
    _, secret = locked.store.create_key("playground")
    locked.app.state.auth.forget()
    open_playground(page, locked.url)
    panel = page.locator("#key-panel")
    assert panel.is_visible()
    assert "requires an API key" in page.inner_text("#key-message")
    assert "API key" in page.inner_text("#history-status")
    shot(page, "playground-key")

    page.fill("#key-input", "key_wrong:nope")
    page.click("#key-form button[type='submit']")
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('refused')")
    assert panel.is_visible()

    page.fill("#key-input", secret)
    page.click("#key-form button[type='submit']")
    panel.wait_for(state="hidden")
    assert page.evaluate("() => localStorage.getItem('fluxserve.key')") == secret
    pick_small_flash(page, "a locked door")
    assert generate_and_wait(page)["height"] == 512
    shot(page, "playground-auth", full_page=True)

    page.evaluate("() => localStorage.setItem('fluxserve.key', 'key_revoked:x')")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('401')")
    assert panel.is_visible() and "refused" in page.inner_text("#key-message")


def with_key(page, server, name: str) -> str:
    """A fresh key of the locked server, saved in the page's storage before the page loads; its secret."""
    _, secret = server.store.create_key(name)
    server.app.state.auth.forget()
    page.add_init_script(f"localStorage.setItem('fluxserve.key', {json.dumps(secret)})")
    return secret


@contextmanager
def workers_paused(server):
    """No job runs inside the block: queued requests stay queued until cancelled or failed."""
    for worker in server.app.state.workers:
        worker.stop()
    try:
        yield
    finally:
        for worker in server.app.state.workers:
            worker.start()


def submit(server, secret: str, prompt: str) -> dict:
    response = httpx.post(f"{server.url}/queue/{FLASH}", headers={"Authorization": f"Key {secret}"}, timeout=60,
                          json={"prompt": prompt, "image_size": {"width": 512, "height": 512}})
    assert response.status_code == 200, response.text
    return response.json()


def cancel(server, secret: str, queued: dict) -> None:
    response = httpx.put(queued["cancel_url"], headers={"Authorization": f"Key {secret}"}, timeout=60)
    assert response.status_code == 202, response.text


def history_prompts(page) -> list[str]:
    return page.locator("#history .history-prompt").all_inner_texts()


def test_history_pages_with_load_older(page, locked):
    secret = with_key(page, locked, "history pages")
    with workers_paused(locked):
        for i in range(32):  # one page of 30 and two more, ended one after another
            cancel(locked, secret, submit(locked, secret, f"page {i:02d}"))
    open_playground(page, locked.url)
    page.wait_for_selector("#history .history-item")
    newest_first = [f"page {i:02d}" for i in reversed(range(32))]
    assert history_prompts(page) == newest_first[:30]  # this key's requests only
    assert page.locator("#history-more").is_visible()
    assert "Cancelled" in page.locator("#history .history-item").first.inner_text()
    shot(page, "playground-history-pages")
    page.click("#history-more")
    page.wait_for_function("() => document.querySelectorAll('#history .history-item').length === 32")
    assert history_prompts(page) == newest_first  # the next page follows on: nothing repeated or skipped
    assert page.locator("#history-more").is_hidden()


def test_history_status_filter(page, locked):
    secret = with_key(page, locked, "history filter")
    done = submit(locked, secret, "a finished harbour")
    locked.store.wait(done["request_id"], 120)
    with workers_paused(locked):
        cancel(locked, secret, submit(locked, secret, "a cancelled harbour"))
        failed = submit(locked, secret, "a broken harbour")
        locked.store.fail(failed["request_id"], "RuntimeError: the engine broke", "internal_error")
    open_playground(page, locked.url)
    page.wait_for_function("() => document.querySelectorAll('#history .history-item').length === 3")
    assert sorted(history_prompts(page)) == ["a broken harbour", "a cancelled harbour", "a finished harbour"]

    shown = {"success": "a finished harbour", "user_error": "a cancelled harbour", "error": "a broken harbour"}
    for status, prompt in shown.items():  # each filter shows its one request, ending on Failed
        page.select_option("#history-filter", status)
        page.wait_for_function("(p) => [...document.querySelectorAll('#history .history-prompt')]"
                               ".map((e) => e.textContent).join('|') === p", arg=prompt)
    item = page.locator("#history .history-item")
    assert "Failed" in item.inner_text()
    shot(page, "playground-history-failed")
    page.emulate_media(color_scheme="dark")
    shot(page, "playground-history-failed-dark")
    page.emulate_media(color_scheme="light")
    item.click()  # a failed fal request: its input fills the form, its error shows as the status
    page.wait_for_function("() => document.getElementById('status').textContent.includes('the engine broke')")
    assert page.input_value("#in-prompt") == "a broken harbour"
    assert page.inner_text("#job-id") == failed["request_id"]
    shot(page, "playground-history-failed-opened")

    page.select_option("#history-filter", "")
    page.wait_for_function("() => document.querySelectorAll('#history .history-item').length === 3")


# ---- live progress, endpoint groups, demo banner, references, errors ----------------------------------------------
def record_statuses(page) -> None:
    """Keep every text the status line shows, and every preview the page shows with whether an image was out."""
    page.evaluate("""() => {
        window.__statuses = [];
        window.__previews = [];
        const status = document.getElementById('status');
        new MutationObserver(() => window.__statuses.push(status.textContent))
            .observe(status, {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => {
            const preview = document.getElementById('preview-image');
            if (preview && preview.getAttribute('src')) {
                window.__previews.push({src: preview.getAttribute('src'),
                                        final: !!document.querySelector('#images img')});
            }
        }).observe(document.querySelector('.result-panel'), {subtree: true, attributeFilter: ['src']});
    }""")


def shots(page, name: str) -> None:
    """Light, dark and a 420 px wide screenshot of the page as it is now."""
    shot(page, name, full_page=True)
    page.emulate_media(color_scheme="dark")
    shot(page, f"{name}-dark", full_page=True)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 420, "height": 900})
    shot(page, f"{name}-narrow", full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})


def test_previews_step_counter_and_time_left(page, server):
    open_playground(page, server.url)
    pick(page, "fal-ai/flux-2")
    page.select_option("#in-image_size", "custom")
    page.fill("#in-image_size-width", "512")
    page.fill("#in-image_size-height", "512")
    page.fill("#in-num_inference_steps", "28")
    page.fill("#in-prompt", "a harbour at night, lanterns on the water")
    record_statuses(page)
    page.click("#generate")
    page.wait_for_selector("#preview:not([hidden]) #preview-image[src]", timeout=60_000)
    shots(page, "playground-preview")
    page.wait_for_function(
        "() => { const img = document.querySelector('#images img'); return img && img.complete && img.naturalWidth; }",
        timeout=60_000)

    previews = page.evaluate("window.__previews")
    early = [p for p in previews if not p["final"]]
    assert early, previews  # a preview was on the page before the final image
    assert all("/files/previews/" in p["src"] for p in previews)
    statuses = page.evaluate("window.__statuses")
    generating = [s for s in statuses if s.startswith("Generating · step")]
    assert generating and all(re.fullmatch(r"Generating · step \d+ of 28( · about \d+ (s|min) left)?", s)
                              for s in generating), statuses
    assert any(s.endswith(" left") for s in generating), statuses  # the estimate once 2+ steps were seen
    assert page.inner_text("#status") == "Completed"
    assert page.inner_text("#live-info").startswith("Took ")
    assert page.locator("#preview").is_hidden()
    final = page.locator("#images .image a").first  # the final image fades in over the last preview
    assert "/files/previews/" in final.evaluate("a => a.style.backgroundImage")
    page.wait_for_function("() => !document.querySelector('#images img.fading')")
    shots(page, "playground-preview-done")


def test_queue_position_in_words(page, server):
    blockers = [httpx.post(server.url + "/queue/fal-ai/flux-2", timeout=60,
                           json={"prompt": "blocker", "num_inference_steps": 50,
                                 "image_size": {"width": 1024, "height": 1024}}).json() for _ in range(2)]
    try:
        open_playground(page, server.url)
        pick_small_flash(page, "waiting my turn")
        record_statuses(page)
        page.click("#generate")
        page.wait_for_function("() => window.__statuses.some((s) => s.startsWith('In queue · '))", timeout=60_000)
    finally:
        for blocker in blockers:
            httpx.put(blocker["cancel_url"], timeout=60)
    page.wait_for_selector("#status[data-tone='ok']", timeout=60_000)
    queued = [s for s in page.evaluate("window.__statuses") if s.startswith("In queue · ")]
    assert all(re.fullmatch(r"In queue · (next|\d+ ahead)", s) for s in queued), queued
    assert page.inner_text("#status") == "Completed"


def test_endpoints_are_grouped_with_friendly_names(page, server):
    open_playground(page, server.url)
    groups = page.eval_on_selector_all("#endpoint optgroup", "gs => gs.map((g) => g.label)")
    assert groups == ["Text to image", "Edit", "LoRA", "klein"]

    def option(endpoint: str) -> tuple[str, str]:
        return page.eval_on_selector(f"#endpoint option[value='{endpoint}']",
                                     "o => [o.parentElement.label, o.textContent]")

    assert option("fal-ai/flux-2") == ["Text to image", "FLUX.2 [dev]"]
    assert option("fal-ai/flux-2/turbo") == ["Text to image", "FLUX.2 [dev] · Turbo"]
    assert option("fal-ai/flux-2/turbo/edit") == ["Edit", "FLUX.2 [dev] · Turbo"]
    assert option("fal-ai/flux-2-pro") == ["Text to image", "FLUX.2 [pro]"]
    assert option("fal-ai/flux-2/lora") == ["LoRA", "FLUX.2 [dev]"]
    assert option("fal-ai/flux-2/lora/edit") == ["LoRA", "FLUX.2 [dev] · Edit"]
    assert option("fal-ai/flux-2/klein/9b/base/edit") == ["klein", "FLUX.2 [klein] Base 9B · Edit"]
    pick(page, "fal-ai/flux-2-pro/edit")
    assert page.inner_text("#endpoint-id") == "fal-ai/flux-2-pro/edit"  # the raw id, as secondary text
    assert "served by [dev] weights" in page.inner_text("#endpoint-info")
    page.eval_on_selector("#endpoint", "s => { s.size = 14; }")  # opened, for the screenshots
    shots(page, "playground-endpoints")


def test_demo_banner(page, server, demo_settings):
    open_playground(page, server.url)
    banner = page.locator("#demo-banner")
    assert banner.is_visible() and "Demo weights: images are noise" in banner.inner_text()
    shots(page, "playground-demo-banner")
    real = replace(settings_for(demo_settings, "playground-real"), demo=False)
    with Server(real, start_workers=False) as other:
        open_playground(page, other.url)
        assert page.locator("#demo-banner").count() == 0


DROP = """async ([selector, sizes]) => {
    const transfer = new DataTransfer();
    for (const [width, height] of sizes) {
        const canvas = document.createElement('canvas');
        canvas.width = width; canvas.height = height;
        const ctx = canvas.getContext('2d');
        ctx.fillStyle = `hsl(${(width + height) % 360} 70% 55%)`;
        ctx.fillRect(0, 0, width, height);
        const blob = await new Promise((ok) => canvas.toBlob(ok, 'image/png'));
        transfer.items.add(new File([blob], `ref-${width}x${height}.png`, {type: 'image/png'}));
    }
    const zone = document.querySelector(selector);
    zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""


def test_drop_references_with_megapixels(page, server):
    open_playground(page, server.url)
    pick(page, FLASH + "/edit")
    page.dispatch_event("#drop-image_urls", "dragover")
    assert "dragging" in page.get_attribute("#drop-image_urls", "class")
    page.evaluate(DROP, ["#drop-image_urls", [[640, 512], [4096, 3072]]])
    page.wait_for_function("() => document.querySelectorAll('#field-image_urls .thumb').length === 2")
    captions = page.locator("#field-image_urls .thumb figcaption").all_inner_texts()
    assert [c.split() for c in captions] == [["640×512", "0.31", "MP"], ["4096×3072", "12.00", "MP"]]
    assert page.inner_text("#mp-image_urls") == "12.31 MP of 14 MP"
    assert "dragging" not in page.get_attribute("#drop-image_urls", "class")

    page.evaluate(DROP, ["#drop-image_urls", [[2048, 1024]]])
    page.wait_for_selector("#mp-image_urls.over")
    assert page.inner_text("#mp-image_urls") == "14.31 MP of 14 MP · over the limit"
    page.fill("#in-prompt", "make it blue")
    page.click("#generate")  # warned before sending: nothing submitted
    page.wait_for_selector("#err-image_urls:not([hidden])")
    assert "14.31 MP" in page.inner_text("#err-image_urls") and "at most 14 MP" in page.inner_text("#err-image_urls")
    assert page.inner_text("#job-id") == ""
    shots(page, "playground-references")

    page.click("#field-image_urls .thumb:nth-child(2) .remove")  # the change clears the warning
    assert page.locator("#err-image_urls").is_hidden()
    assert page.inner_text("#mp-image_urls") == "2.31 MP of 14 MP"
    result = generate_and_wait(page)
    assert (result["width"], result["height"]) == (640, 512)  # auto: the first reference's size
    job = server.store.get(page.inner_text("#job-id"))
    assert len(job.input["image_urls"]) == 2


def test_errors_clear_when_the_form_changes(page, server):
    open_playground(page, server.url)
    pick_small_flash(page, "")
    page.fill("#in-image_size-width", "100")
    page.click("#generate")
    page.wait_for_selector("#err-prompt:not([hidden])")
    assert page.locator("#err-image_size").is_visible()
    page.fill("#in-prompt", "a fixed prompt")  # this field's error goes, the other stays
    assert page.locator("#err-prompt").is_hidden()
    assert page.locator("#in-prompt").get_attribute("aria-invalid") is None
    assert page.locator("#err-image_size").is_visible()
    page.fill("#in-image_size-width", "512")
    assert page.locator("#err-image_size").is_hidden()

    # the general box (errors without a field of their own) goes on any change
    page.evaluate("""() => { const box = document.getElementById('form-errors');
        box.textContent = 'body: something general'; box.hidden = false; }""")
    page.fill("#in-seed", "7")
    assert page.locator("#form-errors").is_hidden()
