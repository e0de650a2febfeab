"""Part ``train``: LoRA training steps, rank 16: [klein] 4B base in bf16 and [dev] held in FP8 (s/step, peak
memory, the memory plan's estimate of a step's working memory)."""

from __future__ import annotations

import time

from gpu_parts.common import (
    Run,
    TransformerOnly,
    allocated_gib,
    free_memory,
    log,
    median,
    memory_reset,
    mfu,
    num,
    pct,
    peak_gib,
    sync,
)

ESTIMATES = {
    "gpu": {"train": 60, "train.klein-4b": 60, "train.dev": 130},
    "tiny": {"train": 20, "train.klein-4b": 8, "train.dev": 8},
}


TRAIN_RANK = 16
TRAIN_ROWS = (("klein-4b", "bf16"), ("dev", "fp8"))  # [klein] 4B base as any GPU holds it; [dev] as 80 GB does


def part(run: Run, report: dict) -> dict:
    """LoRA training steps (``trainer.train_cached``: the trainer's own step, on one cached example of random
    latents and caption embeddings of the real shapes) at the run's resolution: [klein] 4B base in bf16 and [dev]
    with its frozen transformer held in FP8. Seconds per step, peak memory, and the memory plan's estimate of
    the step's working memory against the measured peak less the resident weights."""
    scale = run.scale
    report.update(resolution=f"{scale.width}x{scale.height}", rank=TRAIN_RANK, device=run.device_name,
                  warmup_steps=scale.warmup + 1, measured_steps=scale.forward_repeat, rows={},
                  note="one example, batch 1, bf16 autocast with gradient checkpointing on CUDA, AdamW on the LoRA; "
                       "step time = wall time between steps (each ends with the loss read back, a sync)")
    for model, held in TRAIN_ROWS:
        row = run.step("train", report, model, lambda model=model, held=held: train_row(run, model, held))
        if row is not None:
            report["rows"][model] = row
            run.save("train", report)
    return {model: {key: row.get(key) for key in ("what", "step_s", "peak_memory_gib", "step_memory_gib",
                                                   "estimated_step_gib")}
            for model, row in report["rows"].items()}


def train_row(run: Run, model: str, held: str) -> dict:
    import torch
    from diffusers import Flux2Pipeline

    from fluxserve import bench
    from fluxserve.engine import accel, fp8, random_weights
    from fluxserve.engine.placement import place_module
    from fluxserve.training import trainer

    device, scale = run.device, run.scale
    arch = random_weights.tiny_architecture(model) if run.tiny else None
    transformer = random_weights.build_transformer(model, "meta", run.dtype, arch=arch)
    place_module(transformer, device, materialise=random_weights.random_init(0, "transformer"))
    if held == "fp8":
        accel.prepare_transformer(TransformerOnly(transformer), "fp8", device)
    precision = "fp8 weights (dequantised in training)" if fp8.has_fp8(transformer) else str(run.dtype).removeprefix(
        "torch.")
    config = transformer.config
    generator = torch.Generator(device=device).manual_seed(6)
    h, w = scale.height // 16, scale.width // 16
    embeds = torch.randn(1, scale.text_tokens, config.joint_attention_dim, device=device, dtype=run.dtype,
                         generator=generator)
    example = trainer.CachedExample(
        latents=torch.randn(1, config.in_channels, h, w, device=device, generator=generator),
        prompt_embeds=embeds, reference=None, reference_ids=None,
        text_ids=Flux2Pipeline._prepare_text_ids(torch.empty(1, scale.text_tokens, 1, device="meta")).to(device))
    sync(device)
    resident = allocated_gib(device)
    times: list[float] = []
    losses: list[float] = []
    mark = [time.perf_counter()]

    def on_progress(progress) -> None:
        now = time.perf_counter()
        times.append(now - mark[0])
        losses.append(progress.loss)
        mark[0] = now

    warmup = scale.warmup + 1
    memory_reset(device)
    mark[0] = time.perf_counter()
    trainer.train_cached(transformer, [example], steps=warmup + scale.forward_repeat, learning_rate=1e-4,
                         rank=TRAIN_RANK, seed=0, on_progress=on_progress)
    peak = peak_gib(device)
    step_s = median(times[warmup:])
    estimate = trainer.step_bytes(transformer, resolution=scale.width, rank=TRAIN_RANK) / 2**30
    flops = bench.config_flops(config, scale.width, scale.height, [])["forward"]
    row = {"what": run.where(f"{model} LoRA training", f"rank {TRAIN_RANK}, one step", precision),
           "held": held, "precision": precision, "step_s": step_s, "step_s_all": times,
           "first_step_s": times[0] if times else None, "losses": losses,
           "resident_gib": resident, "peak_memory_gib": peak,
           "step_memory_gib": round(peak - resident, 2) if peak is not None and resident is not None else None,
           "estimated_step_gib": round(estimate, 2), "estimated_step_bytes": round(estimate * 2**30),
           "mfu_3x_forward": mfu(3 * flops, step_s * 1000 if step_s else None, run.device_name, "bf16", device),
           "mfu_note": "3 x the forward's FLOPs (forward, its recomputation, the input gradients: the frozen "
                       "weights need no weight gradients) against the bf16 peak"}
    log(f"{row['what']}: {num(step_s)} s/step, first step {num(row['first_step_s'])} s, peak "
        f"{num(peak)} GiB (resident {num(resident)}, step {num(row['step_memory_gib'])}, plan's estimate "
        f"{estimate:.2f}), MFU {pct(row['mfu_3x_forward']['value'])}")
    del transformer, example
    free_memory(device)
    return row


