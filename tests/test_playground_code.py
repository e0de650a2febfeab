"""The playground's "Copy as code" in a real browser (headless Chromium) against a real server on the demo models.

The dialog's snippets are copied through the page's Copy buttons (the clipboard) and RUN, unchanged: the Python
ones (fal_client, openai, replicate) with this interpreter, the JavaScript one with node from tests/js (which has
@fal-ai/client), the cURL one with bash. Each must make the image the form asks for, with the key variable unset,
set to anything (a server without keys), or set to the key (a server that requires one). Screenshots land in
test-results/playground/.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fal_helpers import Server, settings_for
from PIL import Image
from playground_helpers import FLASH, open_playground, pick, pick_small_flash, shot

JS_DIR = Path(__file__).resolve().parent / "js"
CLIENTS = ("python", "js", "curl", "openai", "replicate")
KEY_VARIABLES = {"python": "FAL_KEY", "js": "FAL_KEY", "curl": "FAL_KEY", "openai": "OPENAI_API_KEY",
                 "replicate": "REPLICATE_API_TOKEN"}
FILE_URL = re.compile(r"https?://[^\s\"'\\]+/files/[^\s\"'\\]+")
# quotes, a shell variable, a backslash, a newline and non-ASCII: every snippet must carry them exactly
TRICKY_PROMPT = 'a "red" cube, $HOME\'s \\ corner\ncafé ☕'
RUN_TIMEOUT_S = 300  # a bound on a hung client, far above a demo-model generation


@pytest.fixture(scope="module")
def server(demo_settings):
    with Server(settings_for(demo_settings, "playground-code")) as running:
        yield running


@pytest.fixture(scope="module")
def locked(demo_settings):
    with Server(settings_for(demo_settings, "playground-code-auth"), auth_required=True) as running:
        yield running


# ---- helpers -------------------------------------------------------------------------------------------------------
def open_dialog(page) -> None:
    page.click("#copy-code")
    page.wait_for_selector("#code-dialog[open]")


def copied_snippets(page) -> dict[str, str]:
    """Each tab's snippet as its Copy button puts it on the clipboard (the complete text)."""
    codes = {}
    for client in CLIENTS:
        page.click(f"#code-tab-{client}")
        panel = page.locator(f"#code-panel-{client}")
        panel.locator(".code-copy").click()
        page.wait_for_function(f"() => document.querySelector('#code-panel-{client} .code-copied')"
                               ".textContent === 'Copied'")
        codes[client] = page.evaluate("() => navigator.clipboard.readText()")
    return codes


def run_snippet(client: str, code: str, cwd: Path, key: str | None) -> str:
    """Run one snippet as a user would; returns its stdout. ``key`` None: the key variable unset."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES.values()}
    if key is not None:
        env[KEY_VARIABLES[client]] = key
    if client == "js":
        command, cwd = ["node", "--input-type=module"], JS_DIR  # resolves @fal-ai/client from tests/js
    elif client == "curl":
        command = ["bash"]
    else:
        command = [sys.executable, "-"]
    done = subprocess.run(command, input=code, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{client} snippet failed:\n{done.stderr}\n{done.stdout}"
    return done.stdout


def image_sizes(stdout: str, headers: dict | None = None) -> list[tuple[int, int]]:
    """The sizes of the images whose URLs a snippet printed (downloaded and decoded)."""
    sizes = []
    for url in FILE_URL.findall(stdout):
        response = httpx.get(url, headers=headers or {}, timeout=60)
        assert response.status_code == 200, url
        sizes.append(Image.open(io.BytesIO(response.content)).size)
    return sizes


def grant_clipboard(page, url: str) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)


# ---- the snippets in Chromium, then run ----------------------------------------------------------------------------
def test_every_snippet_runs_and_makes_the_form_s_image(page, server, tmp_path):
    grant_clipboard(page, server.url)
    open_playground(page, server.url)
    pick_small_flash(page, TRICKY_PROMPT)
    page.fill("#in-seed", "1234")
    open_dialog(page)
    shot(page, "code-dialog")
    page.emulate_media(color_scheme="dark")
    page.click("#code-tab-openai")
    shot(page, "code-dialog-dark")
    page.emulate_media(color_scheme="light")

    codes = copied_snippets(page)
    for client, code in codes.items():
        assert page.text_content(f"#code-panel-{client} pre") == code  # nothing long to shorten here
        assert KEY_VARIABLES[client] in code.splitlines()[1]  # the comment line that names the key variable
    assert '"fal-ai/flux-2/flash"' in codes["python"] and "fal_client.subscribe" in codes["python"]
    assert 'model="flux-2-flash"' in codes["openai"] and 'size="512x512"' in codes["openai"]
    assert f'base_url="{server.url}/v1"' in codes["openai"]
    assert '"black-forest-labs/flux-2-flash"' in codes["replicate"]
    assert f"{server.url}/run/{FLASH}" in codes["curl"]

    keys = {"python": None, "js": "anything", "curl": None, "openai": "anything", "replicate": None}
    for client, code in codes.items():
        stdout = run_snippet(client, code, tmp_path, keys[client])
        assert image_sizes(stdout) == [(512, 512)], (client, stdout)

    # each made one job with exactly the form's prompt and seed, through its own dialect
    items = httpx.get(server.url + "/api/history", params={"limit": 5}).json()["items"]
    assert sorted(item["dialect"] for item in items) == ["fal", "fal", "fal", "openai", "replicate"]
    for item in items:
        assert item["status"] == "completed" and item["prompt"] == TRICKY_PROMPT, item
        assert item["seed"] == 1234 and item["endpoint"] == FLASH, item


def test_snippets_send_the_key_a_server_requires(page, locked, tmp_path):
    _, secret = locked.store.create_key("snippets")
    locked.app.state.auth.forget()
    grant_clipboard(page, locked.url)
    page.add_init_script(f"localStorage.setItem('fluxserve.key', {secret!r})")
    open_playground(page, locked.url)
    pick_small_flash(page, "a locked door")
    open_dialog(page)
    codes = copied_snippets(page)
    assert secret not in "".join(codes.values())  # the key stays in the environment, never in the code
    for client, code in codes.items():
        stdout = run_snippet(client, code, tmp_path, secret)
        assert image_sizes(stdout, {"Authorization": f"Key {secret}"}) == [(512, 512)], (client, stdout)
    refused = subprocess.run([sys.executable, "-"], input=codes["openai"], env=os.environ | {"OPENAI_API_KEY": "x"},
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert refused.returncode != 0 and "401" in refused.stderr


def test_edit_snippets_carry_the_reference_image(page, server, reference_image, tmp_path):
    grant_clipboard(page, server.url)
    open_playground(page, server.url)
    pick(page, FLASH + "/edit")
    page.set_input_files("#in-image_urls", reference_image(576, 512))
    page.wait_for_selector("#field-image_urls .thumb img")
    page.fill("#in-prompt", "make it blue")
    page.fill("#in-seed", "7")
    open_dialog(page)
    codes = copied_snippets(page)
    page.click("#code-tab-replicate")
    shot(page, "code-dialog-edit")

    uri = re.search(r"data:image/png;base64,[A-Za-z0-9+/=]+", codes["python"]).group(0)
    assert len(uri) > 1000
    for client, code in codes.items():
        assert uri in code, client  # the copied text is complete
        shown = page.text_content(f"#code-panel-{client} pre")
        assert uri not in shown and f"({len(uri)} characters)" in shown  # the display shortens it
        assert page.get_attribute(f"#code-panel-{client} pre", "data-elided") == "true"
    assert "client.images.edit(" in codes["openai"] and 'size="auto"' in codes["openai"]
    assert '"aspect_ratio": "match_input_image"' in codes["replicate"]

    for client, code in codes.items():
        stdout = run_snippet(client, code, tmp_path, None)
        assert image_sizes(stdout) == [(576, 512)], (client, stdout)  # auto: the reference's size


def test_endpoints_and_fields_without_an_equivalent_say_so(page, server):
    open_playground(page, server.url)
    pick(page, "fal-ai/flux-2/lora")
    page.fill("#in-prompt", "a watercolour fox")
    open_dialog(page)
    page.click("#code-tab-openai")
    message = page.inner_text("#code-panel-openai .code-unavailable")
    assert message.startswith("No OpenAI model reaches fal-ai/flux-2/lora")
    assert page.locator("#code-panel-openai pre").count() == 0
    assert page.locator("#code-panel-openai .code-copy").count() == 0
    assert "No Replicate model reaches fal-ai/flux-2/lora" in page.inner_text("#code-panel-replicate")
    assert "fal_client.subscribe" in page.inner_text("#code-panel-python pre")  # fal's clients still work
    shot(page, "code-dialog-unavailable")
    page.emulate_media(color_scheme="dark")
    shot(page, "code-dialog-unavailable-dark")
    page.emulate_media(color_scheme="light")
    page.keyboard.press("Escape")

    pick_small_flash(page, "two foxes")
    page.fill("#in-num_images", "2")
    page.fill("#in-guidance_scale", "12")
    open_dialog(page)
    page.click("#code-tab-replicate")
    note = page.inner_text("#code-panel-replicate .code-dropped")
    assert note == "Not sent (no Replicate equivalent): num_images=2, guidance_scale=12 (Replicate takes 0-10)"
    code = page.inner_text("#code-panel-replicate pre")
    assert "# Not sent (no Replicate equivalent): num_images=2, guidance_scale=12" in code
    assert '"guidance"' not in code
    shot(page, "code-dialog-dropped")
    assert page.locator("#code-panel-openai .code-dropped").count() == 0  # n=2 maps
    assert "n=2," in page.inner_text("#code-panel-openai pre")
    assert '"guidance_scale": 12' in page.inner_text("#code-panel-openai pre")


def test_dialog_tabs_keyboard_and_closing(page, server):
    open_playground(page, server.url)
    pick_small_flash(page, "first prompt")
    open_dialog(page)
    tabs = page.locator("#code-dialog [role='tab']")
    assert tabs.count() == 5
    assert page.get_attribute("#code-dialog [role='tablist']", "aria-label") == "Client"

    def selected() -> str:
        return page.evaluate("() => document.activeElement.dataset.client + ' ' + "
                             "document.querySelector('[role=tab][aria-selected=true]').dataset.client")

    assert selected() == "python python"  # the selected tab has the focus
    page.keyboard.press("ArrowRight")
    assert selected() == "js js"
    assert page.locator("#code-panel-js").is_visible() and page.locator("#code-panel-python").is_hidden()
    assert page.get_attribute("#code-tab-js", "tabindex") == "0"
    assert page.get_attribute("#code-tab-python", "tabindex") == "-1"
    page.keyboard.press("End")
    assert selected() == "replicate replicate"
    page.keyboard.press("ArrowRight")
    assert selected() == "python python"  # wraps around
    page.keyboard.press("ArrowLeft")
    assert selected() == "replicate replicate"
    page.keyboard.press("Home")
    assert selected() == "python python"
    panel = page.locator("#code-panel-python")
    assert panel.get_attribute("aria-labelledby") == "code-tab-python"
    assert page.get_attribute("#code-tab-python", "aria-controls") == "code-panel-python"

    page.keyboard.press("Escape")
    page.wait_for_selector("#code-dialog:not([open])", state="attached")
    assert page.evaluate("() => document.activeElement.id") == "copy-code"

    # reopened, it shows the form as it is now, on the tab chosen last
    page.fill("#in-prompt", "second prompt")
    page.select_option("#in-image_size", "landscape_16_9")
    open_dialog(page)
    page.click("#code-tab-openai")
    page.click("#code-dialog .code-head button")  # Close
    open_dialog(page)
    assert page.get_attribute("#code-tab-openai", "aria-selected") == "true"
    code = page.inner_text("#code-panel-openai pre")
    assert '"second prompt"' in code and 'size="1024x576"' in code and "first prompt" not in code
    page.click("#code-dialog .code-head button")
    page.wait_for_selector("#code-dialog:not([open])", state="attached")

    # a field the form cannot read keeps the dialog shut and says which
    pick(page, "fal-ai/flux-2/lora")
    page.fill("#in-prompt", "x")
    page.fill("#in-loras", "[not json")
    page.click("#copy-code")
    page.wait_for_selector("#err-loras:not([hidden])")
    assert "Invalid JSON" in page.inner_text("#err-loras")
    assert page.locator("#code-dialog[open]").count() == 0


def test_snippet_functions(page, server):
    """The pure functions of /web/snippets.js, in the browser."""
    open_playground(page, server.url)
    result = page.evaluate("""async () => {
        const { snippets, elide } = await import('/web/snippets.js');
        const info = { openai_model: 'flux-2-pro', replicate_model: 'black-forest-labs/flux-2-pro',
                       defaults: { output_format: 'jpeg', safety_tolerance: '2', enable_safety_checker: true } };
        const input = { prompt: 'p', image_size: 'portrait_16_9', output_format: 'png', safety_tolerance: '4',
                        enable_safety_checker: false, future_field: 3 };
        const all = snippets('fal-ai/flux-2-pro', input, 'http://h:1', info);
        const long = 'data:image/png;base64,' + 'A'.repeat(500);
        return { ids: all.map((s) => s.id), byId: Object.fromEntries(all.map((s) => [s.id, s])),
                 elided: elide(`x = "${long}"`), short: elide('x = "data:image/png;base64,AAAA"') };
    }""")
    assert result["ids"] == list(CLIENTS)
    openai, replicate = result["byId"]["openai"], result["byId"]["replicate"]
    assert 'size="576x1024"' in openai["code"] and '"safety_tolerance": 4' in openai["code"]
    assert '"enable_safety_checker": False' in openai["code"] and 'output_format="png"' in openai["code"]
    assert openai["dropped"] == ["future_field=3"]  # unknown to the dialect and not at its default
    assert '"width": 576' in replicate["code"] and '"height": 1024' in replicate["code"]
    assert '"disable_safety_checker": True' in replicate["code"] and '"safety_tolerance": 4' in replicate["code"]
    assert "future_field=3" in replicate["dropped"]
    assert '"enable_safety_checker": False' in result["byId"]["python"]["code"]
    assert '"enable_safety_checker": false' in result["byId"]["curl"]["code"]
    assert "enable_safety_checker: false" in result["byId"]["js"]["code"]
    assert result["elided"].startswith('x = "data:image/png;base64,AAAA') and "(522 characters)" in result["elided"]
    assert result["short"] == 'x = "data:image/png;base64,AAAA"'
