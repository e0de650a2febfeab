"""The top CUDA kernels of one warm [dev] step (the ``dev`` part profiles each level it runs but ``none``)."""

from __future__ import annotations

import time

from gpu_parts.common import Run, log, sync


def profile_step(run: Run, pipe, inputs: dict, level: str) -> dict:
    """The top kernels of one warm [dev] transformer step at ``level`` as the transformer is now
    (``torch.profiler``; on the CPU the top operators)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fluxserve.engine import accel

    device = run.device
    state = accel.apply_acceleration(pipe, level, device)

    def forward():
        with torch.no_grad():
            return pipe.transformer(**inputs)[0]

    for _ in range(2):
        forward()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        forward()
        sync(device)
    step_ms = (time.perf_counter() - start) * 1000
    rows = top_kernels(prof, cuda, step_ms)
    precision = state.get("transformer_precision", "unknown")
    record = {"what": run.where("dev transformer", "one step (one forward)", precision, level),
              "level": level, "precision": precision, "activity": "CUDA kernels" if cuda else "CPU operators",
              "step_ms_under_profiler": step_ms, "kernels_seen": rows["count"], "kernel_ms_total": rows["total_ms"],
              "top": rows["top"],
              "note": "ms: the kernel's (CPU: the operator's own) time summed over its calls in one step; "
                      "pct_of_step: of the profiled step's wall time; pct_of_kernels: of all kernel time"}
    if cuda and rows["total_ms"] < 0.5 * step_ms:
        record["warning"] = (f"the profiler saw kernels for {rows['total_ms']:.1f} of the step's {step_ms:.1f} ms "
                             "(kernels replayed inside CUDA graphs may be hidden from it)")
    for row in rows["top"][:10]:
        log(f"profile {level} ({precision}): {row['ms']:8.2f} ms {row['pct_of_step']:5.1f}% x{row['calls']:<4} "
            f"{row['name'][:90]}")
    return record


def top_kernels(prof, cuda: bool, step_ms: float, count: int = 30) -> dict:
    """The ``count`` kernels (CPU: operators) with the most total time in the profile."""
    import torch

    rows = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = event.self_cuda_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key[:300], "calls": event.count, "ms": us / 1000})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    total = sum(r["ms"] for r in rows)
    for row in rows:
        row["pct_of_step"] = 100 * row["ms"] / step_ms if step_ms else None
        row["pct_of_kernels"] = 100 * row["ms"] / total if total else None
    return {"count": len(rows), "total_ms": total, "top": rows[:count]}


