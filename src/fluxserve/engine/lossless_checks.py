"""Measurements of the lossless savings (``engine/lossless.py``) with each one off and on, for the GPU benchmark:
one function per saving, each returning a JSON-able dict of timings (CUDA events on a GPU, wall time elsewhere)
and of the exactness the saving promises. On the CPU they run in seconds on the tiny models (the tests call them),
where the timings mean nothing. Each puts the saving back as it found it.

* ``measure_rope_cache(transformer, inputs, device)``
* ``measure_text_encoder_compile(pipe, device)``
* ``measure_postprocess(processor, device)``
* ``measure_vae_cudnn_benchmark(pipe, device)``
* ``measure_graph_partitions(transformer, inputs, device)``: CUDA graph replays, host-side eager ops and GPU idle
  time per transformer forward (the fewer-partitions investigation, docs/performance.md).

``transformer_inputs`` makes the inputs the pipelines give the transformer (their own position ids).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fluxserve.engine import accel, lossless
from fluxserve.engine.text_encoder import encoding_only


def transformer_inputs(transformer: nn.Module, width: int, height: int, *, text_tokens: int = 512,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """Random inputs of the shapes ``Flux2Pipeline`` gives the transformer for one ``width`` x ``height`` image,
    with the position ids made by its own ``_prepare_latent_ids`` / ``_prepare_text_ids``."""
    from diffusers import Flux2Pipeline

    config = transformer.config
    h, w = height // 16, width // 16
    generator = torch.Generator(device=device).manual_seed(seed)
    guidance = torch.full((1,), 2.5, device=device, dtype=torch.float32) if config.guidance_embeds else None
    return {
        "hidden_states": torch.randn(1, h * w, config.in_channels, device=device, dtype=dtype, generator=generator),
        "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, device=device, dtype=dtype,
                                             generator=generator),
        "timestep": torch.full((1,), 0.75, device=device, dtype=dtype),
        "guidance": guidance,
        "img_ids": Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, h, w, device="meta")).to(device),
        "txt_ids": Flux2Pipeline._prepare_text_ids(torch.empty(1, text_tokens, 1, device="meta")).to(device),
        "return_dict": False,
    }


# ---- timing and counting --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` calls after ``warmup`` ones, with the device synchronised around each
    (wall time: what the caller waits, copies to the host included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) if times else None, "all_ms": [round(t, 4) for t in times]}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active (eager code only)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _forward(transformer: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0].clone()  # a CUDA graph's output is overwritten by the next replay


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- 1. RoPE tables -------------------------------------------------------------------------------------------------
def measure_rope_cache(transformer: nn.Module, inputs: dict, device: torch.device | str, *, repeat: int = 10,
                       warmup: int = 3) -> dict:
    """The transformer's forward (as the acceleration state has it: compiled, CUDA graphs) with the RoPE cache off
    and on: ms per forward, ms and ATen ops of the rotary tables per forward, and whether the outputs are
    bit-identical (off against on, and off against off to tell a nondeterministic forward apart)."""
    device = torch.device(device)
    pos_embed = transformer.pos_embed
    was_on = bool(getattr(pos_embed, "_fluxserve_rope_cache_on", False))
    img_ids = inputs["img_ids"][0] if inputs["img_ids"].ndim == 3 else inputs["img_ids"]
    txt_ids = inputs["txt_ids"][0] if inputs["txt_ids"].ndim == 3 else inputs["txt_ids"]

    def tables() -> None:
        with torch.no_grad():
            pos_embed(img_ids)
            pos_embed(txt_ids)

    report: dict = {"what": "transformer forward with the RoPE tables computed (off) or kept (on)",
                    "tokens": {"image": int(img_ids.shape[0]), "text": int(txt_ids.shape[0])}}
    outputs = {}
    try:
        for name, on in (("off", False), ("on", True)):
            lossless.set_rope_cache(transformer, on)
            outputs[name] = _forward(transformer, inputs)
            counter = _OpCounter()
            with counter:
                tables()
            report[name] = {"forward": _summary(_times_ms(lambda: _forward(transformer, inputs), device,
                                                          warmup=warmup, repeat=repeat)),
                            "tables": _summary(_times_ms(tables, device, warmup=1, repeat=repeat)),
                            "tables_aten_ops": counter.count}
        lossless.set_rope_cache(transformer, False)
        again = _forward(transformer, inputs)
    finally:
        lossless.set_rope_cache(transformer, was_on)
    report["bit_identical"] = torch.equal(outputs["off"], outputs["on"])
    report["off_is_deterministic"] = torch.equal(outputs["off"], again)
    report["max_abs_diff"] = float((outputs["off"].float() - outputs["on"].float()).abs().max())
    off, on = report["off"]["forward"]["median_ms"], report["on"]["forward"]["median_ms"]
    report["saved_ms_per_forward"] = off - on if off is not None and on is not None else None
    return report


# ---- 2. the text encoder compiled ------------------------------------------------------------------------------------
def measure_text_encoder_compile(pipe: Any, device: torch.device | str, *, repeat: int = 5) -> dict:
    """Prompt encoding (``encoding_only`` + the pipeline's own ``encode_prompt``, the prompt cache bypassed) with
    the text encoder eager and compiled: ms per prompt, the first compiled call (compilation) in seconds, the
    embeddings' error against eager, and how many graphs later prompts compiled (0: no recompile). The pipe must
    have been through ``accel.apply_acceleration``."""
    device = torch.device(device)
    state = lossless.state_of(pipe)
    if state is None:
        raise ValueError("measure_text_encoder_compile needs a pipe set up by accel.apply_acceleration")
    if lossless.text_decoder(getattr(pipe, "text_encoder", None)) is None:
        return {"status": "skipped", "why": "no text encoder with a decoder stack"}
    counter = iter(range(1_000_000))

    def encode(prompt: str | None = None) -> torch.Tensor:
        prompt = prompt if prompt is not None else f"a prompt never seen before, number {next(counter)}"
        with torch.no_grad(), encoding_only(pipe):  # the class's encode_prompt: no prompt cache in the way
            return type(pipe).encode_prompt(pipe, prompt=prompt, device=device, num_images_per_prompt=1)[0]

    was_on, notes = state.text_encoder_compiled, []
    probe = "a red fox in fresh snow, morning light"
    report: dict = {"what": "prompt encoding, text encoder eager (off) and compiled (on)"}
    try:
        lossless.set_text_encoder_compiled(pipe, state, False, notes)
        eager = encode(probe)
        report["off"] = _summary(_times_ms(encode, device, warmup=1, repeat=repeat))
        lossless.set_text_encoder_compiled(pipe, state, True, notes)
        report["compiled"] = state.text_encoder_compiled
        graphs = _unique_graphs()
        _sync(device)
        start = time.perf_counter()
        compiled = encode(probe)
        _sync(device)
        report["first_call_s"] = time.perf_counter() - start
        report["graphs_compiled"] = _unique_graphs() - graphs
        graphs = _unique_graphs()
        report["on"] = _summary(_times_ms(encode, device, warmup=1, repeat=repeat))
        encode("")  # the empty negative prompt of classifier-free guidance: the same padded length
        report["recompiles_for_later_prompts"] = _unique_graphs() - graphs
    finally:
        lossless.set_text_encoder_compiled(pipe, state, was_on, [])
    report.update(compile_failed=state.text_encoder_compile_failed, notes=notes,
                  shape=list(compiled.shape), dtype=str(compiled.dtype).removeprefix("torch."),
                  rel_error=_rel_error(compiled, eager),
                  max_abs_diff=float((compiled.float() - eager.float()).abs().max()),
                  bit_identical=torch.equal(compiled, eager))
    off, on = report["off"]["median_ms"], report["on"]["median_ms"]
    report["saved_ms_per_prompt"] = off - on if off is not None and on is not None else None
    return report


# ---- 3. post-processing on the device --------------------------------------------------------------------------------
def postprocess_probe(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (B, 3, 64, 2) of ``dtype`` whose values put the denormalised pixel (x * 0.5 + 0.5) * 255 at or right
    next to every .5 rounding boundary, plus -1, 1, values beyond them, infinities and NaN; for bf16 also every
    bf16 value from -2 to 2. What a bit-identical post-processing must get right."""
    halves = (torch.arange(256, dtype=torch.float64) + 0.5) / 255 * 2 - 1
    near = torch.cat([halves + k * 2.0**-24 for k in range(-8, 9)]).to(torch.float32)
    near = torch.cat([near, torch.nextafter(near, torch.full_like(near, 2.0)),
                      torch.nextafter(near, torch.full_like(near, -2.0))])
    specials = torch.tensor([-1.0, 1.0, 0.0, -0.0, -3.5, 2.25, 1e-30, -1e-30, float("inf"), float("-inf"),
                             float("nan")])
    values = torch.cat([near, specials]).to(dtype)
    if dtype == torch.bfloat16:
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        values = torch.cat([values, every[(every >= -2) & (every <= 2)]])
    per_image = 3 * 64
    padded = -(-values.numel() // per_image) * per_image
    values = torch.cat([values, torch.zeros(padded - values.numel(), dtype=dtype)])
    return values.reshape(-1, 3, 64, 1).expand(-1, -1, -1, 2).contiguous().to(device)


def same_pixels(stock: list, ours: list) -> bool:
    """Whether two lists of PIL images have the same modes, sizes and pixels."""
    return len(stock) == len(ours) and all(
        a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(stock, ours))


def measure_postprocess(processor: Any, device: torch.device | str, *, width: int = 1024, height: int = 1024,
                        dtype: torch.dtype = torch.bfloat16, batch: int = 1, repeat: int = 5) -> dict:
    """``processor.postprocess(image, "pil")`` (stock, off) against ``lossless.to_pil`` (on) on a random decoded
    image on ``device``: ms per call (the copy to the host included), bytes copied, and whether the pixels are
    identical, on that image and on ``postprocess_probe``'s boundary values."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    image = (torch.randn(batch, 3, height, width, device=device, generator=generator) * 0.6).to(dtype)
    stock = processor.postprocess(image, output_type="pil")
    ours = lossless.to_pil(processor, image)
    probe = postprocess_probe(dtype, device)
    return {
        "what": f"decoded image -> PIL, {batch} x {width}x{height} {str(dtype).removeprefix('torch.')}",
        "off": _summary(_times_ms(lambda: processor.postprocess(image, output_type="pil"), device, warmup=1,
                                  repeat=repeat)),
        "on": _summary(_times_ms(lambda: lossless.to_pil(processor, image), device, warmup=1, repeat=repeat)),
        "bytes_to_host": {"off": image.numel() * image.element_size(), "on": image.numel()},
        "bit_identical": same_pixels(stock, ours),
        "bit_identical_at_boundaries": same_pixels(processor.postprocess(probe, output_type="pil"),
                                                   lossless.to_pil(processor, probe)),
        "boundary_values": int(probe[..., 0].numel()),
    }


# ---- 4. cudnn.benchmark for the VAE ----------------------------------------------------------------------------------
def measure_vae_cudnn_benchmark(pipe: Any, device: torch.device | str, *, width: int = 1024, height: int = 1024,
                                repeat: int = 5) -> dict:
    """The VAE decode (as the acceleration state has it, compiled or not) with ``cudnn.benchmark`` off and on: ms
    per decode, the first call with benchmark on (cuDNN times its algorithms for the new shapes) and the error
    between the two (another algorithm may round differently)."""
    device = torch.device(device)
    vae = pipe.vae
    parameter = next(vae.parameters())
    generator = torch.Generator(device=parameter.device).manual_seed(0)
    latents = torch.randn(1, vae.config.latent_channels, height // 8, width // 8, device=parameter.device,
                          dtype=parameter.dtype, generator=generator)

    def decode() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(latents, return_dict=False)[0]

    saved = torch.backends.cudnn.benchmark
    report: dict = {"what": f"VAE decode {width}x{height}, cudnn.benchmark off and on",
                    "applies": device.type == "cuda"}
    try:
        torch.backends.cudnn.benchmark = False
        off = decode()
        report["off"] = _summary(_times_ms(decode, device, warmup=1, repeat=repeat))
        with lossless.cudnn_benchmark(True):
            _sync(device)
            start = time.perf_counter()
            on = decode()
            _sync(device)
            report["first_call_on_s"] = time.perf_counter() - start
            report["on"] = _summary(_times_ms(decode, device, warmup=1, repeat=repeat))
    finally:
        torch.backends.cudnn.benchmark = saved
    report.update(rel_error=_rel_error(on, off), bit_identical=torch.equal(on, off))
    return report


# ---- 5. graph partitions ---------------------------------------------------------------------------------------------
def measure_graph_partitions(transformer: nn.Module, inputs: dict, device: torch.device | str, *,
                             back_to_back: int = 4, gaps: int = 8) -> dict:
    """Per transformer forward (as the acceleration state has it): the CUDA graph replays, the compiled regions
    (repeated blocks) and the ATen ops the host runs outside them; on CUDA, from ``torch.profiler``: kernels,
    device-to-device copies, graph launches, and the GPU's idle time within a synchronised forward (what a
    benchmark timing one forward sees) and within ``back_to_back`` forwards queued without a sync (what a
    denoising loop sees), with the largest gaps between kernels and the kernels around them."""
    device = torch.device(device)
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    for _ in range(3):  # CUDA graph trees warm a shape up, record it, then replay it
        _forward(transformer, inputs)
    _sync(device)
    replays = _count_replays(lambda: _forward(transformer, inputs))
    report: dict = {
        "what": "one transformer forward: CUDA graph replays, compiled regions, eager work between them",
        "blocks": len(blocks), "compiled_regions_per_forward": len(blocks) if accel.is_compiled(transformer) else 0,
        "cuda_graph_replays_per_forward": replays,
    }
    single = _profile(lambda: _forward(transformer, inputs), device, gaps)
    report["synchronised_forward"] = single
    report["eager_aten_ops_per_forward"] = single.pop("eager_aten_ops")
    if device.type == "cuda" and back_to_back > 1:
        queued = _profile(lambda: [_forward(transformer, inputs) for _ in range(back_to_back)], device, gaps)
        queued.pop("eager_aten_ops")
        queued["forwards"] = back_to_back
        queued["idle_ms_per_forward"] = queued["idle_ms"] / back_to_back if queued.get("idle_ms") is not None else None
        report["back_to_back_forwards"] = queued
    return report


def _count_replays(fn: Callable[[], Any]) -> int:
    """CUDA graph replays during ``fn`` (0 without CUDA)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    from torch.cuda.graphs import CUDAGraph

    original, seen = CUDAGraph.replay, [0]

    def replay(self) -> None:
        seen[0] += 1
        original(self)

    CUDAGraph.replay = replay
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        CUDAGraph.replay = original
    return seen[0]


REGION = "fluxserve.measured"


def _profile(fn: Callable[[], Any], device: torch.device, gaps: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        with record_function(REGION):
            fn()
        _sync(device)
    events = list(prof.events())
    region = next(e for e in events if e.name == REGION)
    result: dict = {"host_ms": (region.time_range.end - region.time_range.start) / 1000,
                    "eager_aten_ops": sum(1 for e in events if _eager_top_level_aten(e)),
                    "cuda_graph_launches": sum(1 for e in events if e.name.startswith("cudaGraphLaunch"))}
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    if not kernels:
        return result
    busy, spans = 0.0, []
    end, last = kernels[0].time_range.start, kernels[0].name  # the union of the kernels' intervals, and its gaps
    for kernel in kernels:
        start, stop = kernel.time_range.start, kernel.time_range.end
        if start > end:
            spans.append((start - end, last, kernel.name))
        if stop > end:
            busy += stop - max(start, end)
            end, last = stop, kernel.name
    window = end - region.time_range.start
    lead_in = kernels[0].time_range.start - region.time_range.start
    spans.sort(reverse=True)
    result.update(
        kernels=len(kernels), memcpy_dtod=sum(1 for k in kernels if "DtoD" in k.name),
        gpu_busy_ms=busy / 1000, window_ms=window / 1000, idle_ms=(window - busy) / 1000,
        lead_in_ms=lead_in / 1000,
        largest_gaps=[{"ms": gap / 1000, "after": before[:120], "before": after[:120]}
                      for gap, before, after in spans[:gaps]],
    )
    return result


def _eager_top_level_aten(event) -> bool:
    """An ATen op the host ran itself: not inside another ATen op, nor inside a compiled region."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") or "Compiled" in parent.name or "CompiledFxGraph" in parent.name:
            return False
        parent = parent.cpu_parent
    return True
