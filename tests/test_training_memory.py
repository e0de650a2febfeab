"""What a training dataset costs in memory. The API checks it by its headers at submit and decodes nothing, so
a small archive of large images costs the API a few megabytes, not the gigabytes of its pixels (measured on a
real ``fluxserve serve --no-workers`` process); the worker decodes its images one at a time as the trainer
encodes them (measured in a process of its own). Peak resident memory is read from /proc (VmHWM, reset before
each measurement), with bounds ten times wider than the fix needs."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fal_helpers import free_port
from PIL import Image
from probe_helpers import ROOT, get, stop, wait_for

TRAINER = "fal-ai/flux-2-trainer"
MIB = 1024**2
IMAGES = 120  # 2048x2048 each: 1.4 GiB of RGB pixels in a 1.9 MB archive
BOUND = 300 * MIB  # the API's peak growth allowed for a submit (the headers check needs a few MiB)

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")


def solid_png(side: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(out, "PNG")
    return out.getvalue()


def dataset_uri(count: int, side: int) -> str:
    """``count`` solid-colour PNGs of ``side`` pixels, stored (not deflated), as a data URI."""
    png = solid_png(side, (200, 30, 30))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"{i:03d}.png", png)
    return "data:application/zip;base64," + base64.b64encode(out.getvalue()).decode()


class ApiProcess:
    """``fluxserve serve --demo --no-workers`` in its own process: the API alone, jobs stay queued."""

    def __init__(self, data_dir: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "fluxserve", "serve", "--demo", "--no-workers", "--data-dir", str(data_dir),
               "--port", str(self.port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.communicate()[0]}")
            response = get(f"{self.url}/health")
            return response is not None and response.status_code == 200

        wait_for(ready, 120, "the API to answer /health")

    def reset_peak(self) -> int:
        """Reset the process's peak resident memory to its current value, which is returned (bytes)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def _status(self, name: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {name} in /proc/{self.process.pid}/status")

    def submit(self, uri: str) -> httpx.Response:
        return httpx.post(f"{self.url}/queue/{TRAINER}", json={"image_data_url": uri, "default_caption": "red"},
                          timeout=300)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[ApiProcess]:
    server = ApiProcess(tmp_path_factory.mktemp("submit-memory"))
    try:
        server.wait_ready()
        warm = server.submit(dataset_uri(2, 512))  # imports and pools in place before anything is measured
        assert warm.status_code == 200, warm.text
        yield server
    finally:
        stop(server.process)


def test_one_submit_of_large_images_costs_the_api_megabytes_not_their_pixels(api):
    uri = dataset_uri(IMAGES, 2048)
    assert len(uri) < 4 * MIB
    before = api.reset_peak()
    response = api.submit(uri)
    grown = api.peak() - before
    assert response.status_code == 200, response.text
    assert grown < BOUND, f"the API grew {grown / MIB:.0f} MiB for one submit"


def test_two_submits_at_once_stay_within_the_same_bound(api):
    uri = dataset_uri(IMAGES, 2048)
    responses: list[httpx.Response] = []
    before = api.reset_peak()
    threads = [threading.Thread(target=lambda: responses.append(api.submit(uri))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    grown = api.peak() - before
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert grown < BOUND, f"the API grew {grown / MIB:.0f} MiB for two submits at once"


WORKER_SCRIPT = """
import io, sys, zipfile
from pathlib import Path
from PIL import Image
from fluxserve.training.dataset import load_dataset

def status(name):
    line = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(name + ':'))
    return int(line.split()[1]) * 1024

count = int(sys.argv[1])
png = io.BytesIO()
Image.new('RGB', (2048, 2048), (200, 30, 30)).save(png, 'PNG')
archive = io.BytesIO()
with zipfile.ZipFile(archive, 'w', zipfile.ZIP_STORED) as z:
    for i in range(count):
        z.writestr(f'{i:03d}.png', png.getvalue())
data = archive.getvalue()
del png, archive
Path('/proc/self/clear_refs').write_text('5')
before = status('VmRSS')
with load_dataset(data, default_caption='red') as dataset:
    loaded = status('VmHWM') - before
    sizes = [example.image.size for example in dataset.examples]  # as the trainer encodes them: one at a time
print(count, len(set(sizes)), sizes[0][0], loaded, status('VmHWM') - before)
"""


def test_the_worker_decodes_one_image_at_a_time():
    """60 images of 2048x2048 (720 MiB of RGB pixels): opening the dataset decodes none, and going through its
    examples as the trainer does holds about one image's pixels at a time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, "60"], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    count, distinct, side, loaded, decoded = (int(value) for value in done.stdout.split())
    assert (count, distinct, side) == (60, 1, 2048)
    assert loaded < 50 * MIB, f"opening the dataset grew {loaded / MIB:.0f} MiB"
    assert decoded < BOUND, f"decoding its examples one after another grew {decoded / MIB:.0f} MiB"
