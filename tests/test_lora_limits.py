"""What one request's LoRAs may cost: the endpoint's count limit at submit (fal's 3), a LoRA cache bounded by size
(least recently used evicted first, never a LoRA a job holds, in this process or another), and a LoRA that does
not fit the model ending its job with a 4xx naming ``loras[i].path``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import fal_client
import httpx
import numpy as np
import pytest
import torch
from fal_helpers import Server, settings_for
from safetensors.torch import save, save_file
from test_lora import CountingHandler, engine_pixels, file_server, write_lora  # noqa: F401  (fixture)

import fluxserve.compat.fal
from fluxserve.catalog import Catalog
from fluxserve.engine.lora import resolve_lora
from fluxserve.engine.lora_cache import LoraCache
from fluxserve.request import InputError, LoraSpec

pytestmark = pytest.mark.usefixtures("loopback_fetches")
MIB = 1024**2
LORA_ENDPOINTS = ("fal-ai/flux-2/lora", "fal-ai/flux-2/lora/edit", "fal-ai/flux-2/klein/4b/base/lora",
                  "fal-ai/flux-2/klein/4b/base/edit/lora", "fal-ai/flux-2/klein/9b/base/lora",
                  "fal-ai/flux-2/klein/9b/base/edit/lora")


def safetensors_of(size_mib: int, seed: int) -> bytes:
    """A valid safetensors file of about ``size_mib`` MiB (cache tests need files of known size, not LoRAs)."""
    tensor = torch.randn(size_mib * MIB // 4 // 1024, 1024, generator=torch.Generator().manual_seed(seed))
    return save({"transformer.x.lora_A.weight": tensor})


def cached(root: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in (root / "loras").glob("*.safetensors")}


# ---- the count ---------------------------------------------------------------------------------------------
def test_catalogue_lora_endpoints_allow_three():
    catalog = Catalog.load()
    for endpoint_id in LORA_ENDPOINTS:
        assert catalog.endpoint(endpoint_id).max_loras == 3, endpoint_id
    assert {e.id for e in catalog.endpoints.values() if e.schema == "lora"} == set(LORA_ENDPOINTS)


def test_fal_refuses_more_loras_than_the_endpoint_allows(demo_settings):
    settings = settings_for(demo_settings, "lora-count")
    with Server(settings, start_workers=False) as server:
        fluxserve.compat.fal.use(server.url)
        loras = [{"path": f"https://example.com/style-{i}.safetensors", "scale": 1.0} for i in range(40)]
        with pytest.raises(fal_client.client.FalClientHTTPError) as info:
            fal_client.submit("fal-ai/flux-2/lora", arguments={"prompt": "a fox", "loras": loras})
        assert info.value.status_code == 422
        detail = info.value.response.json()["detail"]
        assert [entry["loc"] for entry in detail] == [["body", "loras"]]
        assert "at most 3" in detail[0]["msg"]
        assert server.store.counts().get("queued", 0) == 0  # nothing was queued
        handle = fal_client.submit("fal-ai/flux-2/lora", arguments={"prompt": "a fox", "loras": loras[:3]})
        assert len(server.store.get(handle.request_id).request["loras"]) == 3
        schema = httpx.get(f"{server.url}/api/openapi/queue/openapi.json",
                           params={"endpoint_id": "fal-ai/flux-2/lora"}).json()
        assert '"maxItems": 3' in str(schema).replace("'", '"')


# ---- the cache's bound ---------------------------------------------------------------------------------------
def test_cache_is_bounded_least_recently_used_first(file_server, tmp_path: Path):  # noqa: F811
    served, base = file_server
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        (served / f"{name}.safetensors").write_bytes(safetensors_of(1, seed))
    size = (served / "a.safetensors").stat().st_size
    cache = LoraCache(tmp_path / "loras", max_bytes=int(2.5 * size))  # room for two
    files = {}
    for name in ("a", "b"):
        files[name] = resolve_lora(f"{base}/{name}.safetensors", tmp_path, cache=cache)
        time.sleep(0.05)  # distinct modification times on file systems with coarse clocks
    resolve_lora(f"{base}/a.safetensors", tmp_path, cache=cache)  # a is used again: b is the oldest now
    time.sleep(0.05)
    files["c"] = resolve_lora(f"{base}/c.safetensors", tmp_path, cache=cache)
    assert set(cached(tmp_path)) == {files["a"].path.name, files["c"].path.name}  # b evicted
    assert sum(cached(tmp_path).values()) <= cache.max_bytes
    assert CountingHandler.counts == {"/a.safetensors": 1, "/b.safetensors": 1, "/c.safetensors": 1}
    resolve_lora(f"{base}/b.safetensors", tmp_path, cache=cache)  # downloaded again, a evicted now
    assert CountingHandler.counts["/b.safetensors"] == 2
    assert set(cached(tmp_path)) == {files["b"].path.name, files["c"].path.name}


def test_cache_never_evicts_a_lora_a_job_holds(file_server, tmp_path: Path):  # noqa: F811
    served, base = file_server
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        (served / f"{name}.safetensors").write_bytes(safetensors_of(1, seed))
    size = (served / "a.safetensors").stat().st_size
    cache = LoraCache(tmp_path / "loras", max_bytes=int(2.5 * size))
    with ExitStack() as held:
        first = resolve_lora(f"{base}/a.safetensors", tmp_path, cache=cache, held=held)
        for name in ("b", "c", "d"):
            time.sleep(0.05)
            resolve_lora(f"{base}/{name}.safetensors", tmp_path, cache=cache)
            assert first.path.is_file(), f"the held LoRA was evicted for {name}"
        assert sum(cached(tmp_path).values()) <= cache.max_bytes
    time.sleep(0.05)
    resolve_lora(f"{base}/b.safetensors", tmp_path, cache=cache)  # a is free now, and the oldest
    assert not first.path.exists()


HOLDER = textwrap.dedent("""
    import sys
    from contextlib import ExitStack
    from dataclasses import replace
    from pathlib import Path
    from fluxserve import fetch
    from fluxserve.engine.lora import resolve_lora
    from fluxserve.engine.lora_cache import LoraCache
    cache_dir = Path(sys.argv[1])
    fetch.configure(replace(fetch.current(), allow=fetch.parse_allow("127.0.0.1")))  # the test's file server
    with ExitStack() as held:
        file = resolve_lora(sys.argv[2], cache_dir, cache=LoraCache(cache_dir / "loras"), held=held)
        print(file.path, flush=True)
        sys.stdin.readline()  # hold it until told
""")


def test_cache_never_evicts_a_lora_another_process_holds(file_server, tmp_path: Path):  # noqa: F811
    served, base = file_server
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        (served / f"{name}.safetensors").write_bytes(safetensors_of(1, seed))
    size = (served / "a.safetensors").stat().st_size
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), f"{base}/a.safetensors"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        held_path = Path(holder.stdout.readline().strip())
        assert held_path.is_file(), "the holder process did not resolve its LoRA"
        cache = LoraCache(tmp_path / "loras", max_bytes=int(1.5 * size))  # room for one
        for name in ("b", "c"):
            time.sleep(0.05)
            resolve_lora(f"{base}/{name}.safetensors", tmp_path, cache=cache)
            assert held_path.is_file(), f"another process's LoRA was evicted for {name}"
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    cache.make_room()
    assert not held_path.exists()  # released: evicted now
    assert sum(cached(tmp_path).values()) <= cache.max_bytes


def test_a_lora_larger_than_the_whole_cache_is_refused_with_the_field(file_server, tmp_path: Path):  # noqa: F811
    served, base = file_server
    (served / "big.safetensors").write_bytes(safetensors_of(2, 5))
    cache = LoraCache(tmp_path / "loras", max_bytes=MIB)
    with pytest.raises(InputError) as info:
        resolve_lora(f"{base}/big.safetensors", tmp_path, "loras[1].path", cache=cache)
    assert info.value.field == "loras[1].path" and "FLUXSERVE_LORA_CACHE_GB" in info.value.message
    assert cached(tmp_path) == {} and not list((tmp_path / "loras").glob(".download-*"))


def test_engine_bounds_its_cache_by_the_setting(demo_settings, catalog, file_server):  # noqa: F811
    """``Settings.lora_cache_gb`` reaches the cache the engine's jobs use."""
    from diffusers import Flux2Transformer2DModel

    from fluxserve.engine import Engine

    served, base = file_server
    transformer = Flux2Transformer2DModel.from_pretrained(demo_settings.demo_dir / "dev", subfolder="transformer")
    for seed in range(3):
        write_lora(served / f"s{seed}.safetensors", transformer, seed=20 + seed, rank=64)
    size = (served / "s0.safetensors").stat().st_size
    bounded = Engine(replace(demo_settings, lora_cache_gb=1.5 * size / 1024**3), catalog)
    shas = []
    for seed in range(3):
        engine_pixels(bounded, loras=[LoraSpec(path=f"{base}/s{seed}.safetensors")])
        shas.append(resolve_lora(str(served / f"s{seed}.safetensors"), demo_settings.cache_dir).sha256)
    present = [f"{sha}.safetensors" in cached(demo_settings.cache_dir) for sha in shas]
    assert present == [False, False, True]  # only the last one fits
    assert sum(cached(demo_settings.cache_dir).values()) <= 1.5 * size


# ---- a LoRA that does not fit the model ------------------------------------------------------------------------
NOT_THIS_MODEL = {  # diffusers-style keys of modules the FLUX.2 transformer does not have
    "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8),
    "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2),
}


def test_a_lora_with_no_layer_of_the_model_is_an_input_error(engine, tmp_path: Path):
    wrong = tmp_path / "for-another-model.safetensors"
    save_file(NOT_THIS_MODEL, str(wrong))
    base = engine_pixels(engine)
    with pytest.raises(InputError) as info:
        engine_pixels(engine, loras=[LoraSpec(path=str(engine.settings.demo_dir / "turbo-lora.safetensors")),
                                     LoraSpec(path=str(wrong))])
    assert info.value.field == "loras[1].path"
    assert "none of its layers" in info.value.message
    assert np.array_equal(engine_pixels(engine)[0], base[0])  # nothing of either LoRA is left behind


def test_fal_job_with_a_lora_of_another_model_fails_naming_the_field(demo_settings, tmp_path: Path):
    settings = settings_for(demo_settings, "lora-misfit")
    wrong = tmp_path / "wrong.safetensors"
    save_file(NOT_THIS_MODEL, str(wrong))
    with Server(settings) as server:
        fluxserve.compat.fal.use(server.url)
        url = fal_client.upload(wrong.read_bytes(), "application/octet-stream", file_name="wrong.safetensors")
        handle = fal_client.submit("fal-ai/flux-2/lora", arguments={
            "prompt": "a fox", "num_inference_steps": 4, "image_size": {"width": 512, "height": 512},
            "loras": [{"path": url}]})
        with pytest.raises(fal_client.client.FalClientHTTPError) as info:
            handle.get()
    assert info.value.status_code == 422
    (entry,) = info.value.response.json()["detail"]
    assert entry["loc"] == ["body", "loras", 0, "path"]
    assert "none of its layers" in entry["msg"] and "ValueError" not in entry["msg"]
