"""Part ``vae``: the FLUX.2 VAE decoder, eager in channels-last layout (what the engine runs) and compiled."""

from __future__ import annotations

import time

from gpu_parts.common import (
    Run,
    log,
    median,
    memory_reset,
    num,
    peak_gib,
    ratio,
    rel_error,
    sync,
    time_calls,
)

ESTIMATES = {
    "gpu": {"vae": 25},  # 16 s on an H200 (run 1)
    "tiny": {"vae": 10},
}


def part(run: Run, report: dict) -> dict:
    """The FLUX.2 VAE decoder with random weights at the run's resolution: eager in channels-last layout (what the
    engine runs), then compiled (``torch.compile`` of the decoder; on the CPU with the eager backend, which checks
    the code path without minutes of C++ compilation): warm ms, first-call (compile) time, error against eager."""
    import torch

    from fluxserve.engine import random_weights
    from fluxserve.engine.placement import place_component
    from fluxserve.engine.plan import MemoryPlan

    device, scale = run.device, run.scale
    arch = random_weights.tiny_architecture("klein-4b") if run.tiny else None
    vae = random_weights.build_vae("meta", run.dtype, arch)
    place_component(vae, "vae", device, MemoryPlan("bf16", "resident"),
                    materialise=random_weights.random_init(0, "vae"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator(device=device).manual_seed(5)
    latents = torch.randn(1, vae.config.latent_channels, scale.height // factor, scale.width // factor,
                          device=device, dtype=run.dtype, generator=generator).contiguous(
                              memory_format=torch.channels_last)

    def decode():
        with torch.no_grad():
            return vae.decode(latents, return_dict=False)[0]

    memory_reset(device)
    eager = median(time_calls(decode, device, warmup=1, repeat=scale.repeat))
    reference = decode().float()
    backend = "eager" if run.tiny else "inductor"
    vae.decoder.compile(backend=backend)
    start = time.perf_counter()
    decode()
    sync(device)
    cold = time.perf_counter() - start
    compiled = median(time_calls(decode, device, warmup=1, repeat=scale.repeat))
    error = rel_error(decode().float(), reference)
    speedup = ratio(eager, compiled)
    report.update(what=run.where("FLUX.2 VAE decoder", f"{scale.width}x{scale.height}",
                                 str(run.dtype).removeprefix("torch.")),
                  layout="channels_last", eager_ms=eager, compiled_ms=compiled, compile_backend=backend,
                  first_compiled_call_s=cold, speedup=speedup, rel_error_vs_eager=error,
                  peak_memory_gib=peak_gib(device),
                  note="compiling pays when the speed-up is well above 1 and the first call's cost is acceptable "
                       "at load time")
    log(f"{report['what']}: eager {num(eager)} ms, compiled ({backend}) {num(compiled)} ms, first compiled call "
        f"{cold:.1f} s, x{num(speedup)}, error vs eager {num(error)}")
    return {"what": report["what"], "eager_ms": eager, "compiled_ms": compiled, "speedup": speedup,
            "first_compiled_call_s": cold}


