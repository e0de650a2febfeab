"""Shared fixtures: the demo weights are built once per test session into one data directory.

* ``demo_data_dir`` - that directory (``<tmp>/fluxserve-data``), holding ``cache/demo-weights/{dev,klein,safety}``.
* ``demo_settings`` - ``Settings(data_dir=demo_data_dir, demo=True, device="cpu")``.
* ``catalog`` - the packaged catalogue.
* ``engine`` - one session-wide ``Engine`` on the demo models (models load lazily and stay resident).
* ``reference_image`` - a factory: ``reference_image(width, height, seed=0) -> path of a PNG``.
* ``browser``, ``page`` - headless Chromium and a fresh page, for the playground's tests (playground_helpers.py).

Set ``FLUXSERVE_TEST_DATA_DIR`` to reuse a data directory (and its demo weights) across sessions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    from fluxserve.engine.demo import ensure_demo_weights

    configured = os.environ.get("FLUXSERVE_TEST_DATA_DIR")
    data_dir = Path(configured) if configured else tmp_path_factory.mktemp("fluxserve-data")
    ensure_demo_weights(data_dir / "cache" / "demo-weights")
    return data_dir


@pytest.fixture(scope="session")
def demo_settings(demo_data_dir):
    from fluxserve.config import Settings

    return Settings(data_dir=demo_data_dir, demo=True, device="cpu")


@pytest.fixture(scope="session")
def catalog():
    from fluxserve.catalog import Catalog

    return Catalog.load()


@pytest.fixture(scope="session")
def engine(demo_settings, catalog):
    from fluxserve.engine import Engine

    return Engine(demo_settings, catalog)


@pytest.fixture(scope="session")
def reference_image(tmp_path_factory):
    """Write a deterministic RGB test image (gradients + noise) and return its path."""
    import numpy as np
    from PIL import Image

    directory = tmp_path_factory.mktemp("references")

    def make(width: int, height: int, seed: int = 0) -> str:
        path = directory / f"ref-{width}x{height}-{seed}.png"
        if not path.exists():
            rng = np.random.default_rng(seed)
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                               rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(path)
        return str(path)

    return make


@pytest.fixture
def loopback_fetches():
    """Let outbound fetches (references, LoRAs, webhooks) reach the test servers on 127.0.0.1, as an operator's
    ``--fetch-allow 127.0.0.1`` does; the previous policy is restored afterwards."""
    from dataclasses import replace

    from fluxserve import fetch

    previous = fetch.configure(replace(fetch.current(), allow=fetch.parse_allow("127.0.0.1")))
    yield
    fetch.configure(previous)


@pytest.fixture
def default_fetches():
    """Outbound fetches under the default policy (no internal address allowed), whatever an app made earlier in
    this process configured (``create_app`` sets the process's policy from its settings); restored afterwards."""
    from dataclasses import replace

    from fluxserve import fetch

    previous = fetch.configure(replace(fetch.current(), allow=()))
    yield
    fetch.configure(previous)


CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's ``chromium``, driven by Playwright) for the playground's tests."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Chromium is not installed: `apt-get install chromium` (scripts/install test does it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A fresh page; any JavaScript error on it fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
