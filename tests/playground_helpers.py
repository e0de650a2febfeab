"""Shared pieces of the playground's browser tests (the ``browser`` and ``page`` fixtures are in conftest.py):
small actions on the page, and ``shot``, which writes a screenshot to ``test-results/playground/`` (or
``$FLUXSERVE_SCREENSHOTS``), the folder kept after a run so the pages can be looked at."""

from __future__ import annotations

import os
from pathlib import Path

FLASH = "fal-ai/flux-2/flash"
SCREENSHOTS = Path(os.environ.get("FLUXSERVE_SCREENSHOTS")
                   or Path(__file__).resolve().parent.parent / "test-results" / "playground")


def shot(page, name: str, **options) -> Path:
    """Save a screenshot of the page as ``<SCREENSHOTS>/<name>.png`` and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), **options)
    assert path.stat().st_size > 0
    return path


def open_playground(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")


def pick(page, endpoint: str) -> None:
    page.select_option("#endpoint", endpoint)
    page.wait_for_selector(f"#fields[data-endpoint='{endpoint}']")


def pick_small_flash(page, prompt: str) -> None:
    pick(page, FLASH)
    page.select_option("#in-image_size", "custom")
    page.fill("#in-image_size-width", "512")
    page.fill("#in-image_size-height", "512")
    page.fill("#in-prompt", prompt)


def generate_and_wait(page) -> dict:
    """Press Generate and wait for the image; returns its natural size and the progress steps the bar showed."""
    page.evaluate("""() => {
        const bar = document.getElementById('progress');
        window.__steps = [];
        new MutationObserver(() => { if (bar.dataset.step) window.__steps.push(Number(bar.dataset.step)); })
            .observe(bar, {attributes: true, attributeFilter: ['data-step']});
    }""")
    page.click("#generate")
    page.wait_for_function(
        "() => { const img = document.querySelector('#images img'); return img && img.complete && img.naturalWidth; }",
        timeout=60_000,
    )
    return page.evaluate("""() => {
        const img = document.querySelector('#images img');
        return {width: img.naturalWidth, height: img.naturalHeight, src: img.src, steps: window.__steps};
    }""")
