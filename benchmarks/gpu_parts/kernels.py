"""Part ``kernels``: each fused Triton kernel (``fluxserve.engine.kernels``) against what inductor makes of the same
torch code, on FLUX.2 [dev]'s shapes at 1024x1024 (ms, GB/s with bytes read and written counted once, and how each
output compares with eager PyTorch's bit for bit), and the error of ``_scaled_mm``'s fast accumulation on every FP8
GEMM shape of [dev]'s blocks (``fluxserve.engine.kernels.bench``). On the CPU the same code runs on tiny shapes."""

from __future__ import annotations

from gpu_parts.common import Run, log, num

ESTIMATES = {
    "gpu": {"kernels": 90, "kernels.fused": 90, "kernels.fast_accum": 20},
    "tiny": {"kernels": 30, "kernels.fused": 20, "kernels.fast_accum": 5},
}


def part(run: Run, report: dict) -> dict:
    from fluxserve.engine import fp8
    from fluxserve.engine.kernels import bench

    report.update(device=run.device_name, note="CUDA events, median; fused = the Triton kernel behind the custom op, "
                                               "compiled = torch.compile of the stock torch code for the same math")
    fused = run.step("kernels", report, "fused", lambda: bench.benchmark_kernels(run.device))
    if fused is not None:
        report["fused"] = fused
        run.save("kernels", report)
        log(f"kernels on {run.device_name}: {fused['triton']}")
        for name, row in fused["cases"].items():
            log(f"kernel {name}: fused {num(row['fused_ms'])} ms ({num(row['fused_gbps'])} GB/s), inductor "
                f"{num(row['compiled_ms'])} ms ({num(row['compiled_gbps'])} GB/s), x{num(row['speedup'])}; "
                f"vs eager {row['fused_vs_eager']}")
    if fp8.scaled_mm_supported(run.device) or run.tiny:
        accum = run.step("kernels", report, "fast_accum", lambda: bench.fast_accum_error(run.device))
        if accum is not None:
            report["fast_accum"] = accum
            run.save("kernels", report)
    else:
        report["fast_accum"] = {"skipped": f"no FP8 matrix products on {run.device_name}"}
    headline: dict = {}
    if fused is not None:
        headline["triton"] = fused["triton"]
        headline["cases"] = {name: {key: row[key] for key in ("fused_ms", "fused_gbps", "compiled_ms", "speedup")}
                             for name, row in fused["cases"].items()}
    return headline
