"""Part ``checks``: the device and library versions; bf16 and FP8 (``torch._scaled_mm``, row-wise scales) matrix
products on FLUX.2 [dev]'s Linear shapes at the run's resolution, and the whole FP8 w8a8 layer (activation
quantisation included). The attention kernels have a part of their own (``attention``)."""

from __future__ import annotations

import platform
import statistics

from gpu_parts.common import Run, dev_transformer_meta, error_record, log, median, rel_error, time_calls

ESTIMATES = {
    "gpu": {"checks": 15, "checks.environment": 3, "checks.matmul": 12},
    "tiny": {"checks": 6, "checks.environment": 2, "checks.matmul": 3},
}


def part(run: Run, report: dict) -> dict:
    report["environment"] = run.step("checks", report, "environment", lambda: environment(run))
    matmul = run.step("checks", report, "matmul", lambda: matmul_checks(run, report))
    headline: dict = {"device": run.device_name}
    if matmul:
        for kind in ("bf16", "fp8_scaled_mm", "fp8_linear_w8a8"):
            rates = [row[kind]["tflops"] for row in matmul["shapes"] if "tflops" in row.get(kind, {})]
            if rates:
                headline[f"{kind}_tflops_best"] = round(max(rates), 1)
                headline[f"{kind}_tflops_median"] = round(statistics.median(rates), 1)
        headline["matmul_tokens"] = matmul["tokens"]
    return headline


def environment(run: Run) -> dict:
    import torch

    from fluxserve import bench

    info = bench.environment(run.device)
    info["python"] = platform.python_version()
    info["versions"] = package_versions()
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        free, total = torch.cuda.mem_get_info(run.device)
        info.update(multiprocessors=props.multi_processor_count, free_gib=round(free / 2**30, 2),
                    total_gib=round(total / 2**30, 2), cudnn=torch.backends.cudnn.version())
    log(f"device: {run.device_name}; torch {info['torch']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
        f"diffusers {info.get('diffusers')}, transformers {info.get('transformers')}")
    return info


def package_versions() -> dict:
    """Versions of the packages the run imports (the ones carried as wheels to a machine without them too)."""
    from importlib import metadata

    names = ("torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface-hub", "accelerate",
             "safetensors", "peft", "pydantic", "pydantic-core", "numpy", "pillow", "flash-attn", "flash-attn-3")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def linear_shapes(run: Run) -> tuple[list[dict], int]:
    """The distinct (out, in) Linear shapes of the [dev] transformer blocks with the layers that have them, plus
    the fused Q/K/V of the double-stream blocks (3 x hidden by hidden); and the hidden size."""
    import re

    from torch import nn

    from fluxserve.engine import fp8

    transformer = dev_transformer_meta(run)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    shapes: dict[tuple[int, int], dict] = {}
    for name, module in transformer.named_modules():
        if type(module) is nn.Linear and fp8.transformer_block_filter(name, module):
            row = shapes.setdefault((module.out_features, module.in_features), {"layers": 0, "names": set()})
            row["layers"] += 1
            row["names"].add(re.sub(r"\.\d+\.", ".*.", name))
    fused = (3 * hidden, hidden)
    if fused not in shapes:
        shapes[fused] = {"layers": 0, "names": {"transformer_blocks.*.attn.to_qkv (fused Q/K/V, regular/high)"}}
    rows = [{"out": o, "in": i, "layers": r["layers"], "names": sorted(r["names"])}
            for (o, i), r in sorted(shapes.items())]
    return rows, hidden


def matmul_checks(run: Run, report: dict) -> dict:
    """bf16, FP8 ``_scaled_mm`` and ``FP8Linear`` w8a8 on each Linear shape of [dev]'s blocks, M tokens."""
    import torch

    from fluxserve.engine import fp8

    device, scale = run.device, run.scale
    tokens = (scale.width // 16) * (scale.height // 16) + scale.text_tokens
    rows, hidden = linear_shapes(run)
    fp8_ok = fp8.scaled_mm_supported(device)
    not_here = None if fp8_ok else (f"not supported on {device.type}: torch._scaled_mm FP8 needs CUDA with compute "
                                    "capability >= 8.9")
    result = {"tokens": tokens, "hidden": hidden, "dtype": "bf16", "granularity": fp8.default_granularity(device),
              "note": "M tokens = image + text at the run's resolution (in the double blocks the image and text "
                      "projections see 4096 and 512 of them); FLOPs 2*M*out*in; CUDA events, median",
              "shapes": rows}
    report["matmul"] = result
    generator = torch.Generator(device=device).manual_seed(0)
    for row in rows:
        matmul_row(run, row, tokens, generator, not_here)
        run.save("checks", report)
    return result


def matmul_row(run: Run, row: dict, tokens: int, generator, not_here: str | None) -> None:
    """One (out, in) shape: bf16 ``F.linear``, then the FP8 product alone and the whole FP8 layer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fluxserve.engine import fp8

    device = run.device
    n, k = row["out"], row["in"]
    flops = 2 * tokens * n * k
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, generator=generator)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator) * k**-0.5
    ref = F.linear(x, w)
    ms = median(time_calls(lambda: F.linear(x, w), device, warmup=3, repeat=run.scale.kernel_repeat))
    row["bf16"] = {"ms": ms, "tflops": flops / (ms / 1000) / 1e12}
    if not_here:
        row["fp8_scaled_mm"] = {"skipped": not_here}
        row["fp8_linear_w8a8"] = {"skipped": not_here}
    else:
        row["fp8_scaled_mm"] = _scaled_mm_row(x, w, ref, flops, run)
        row["fp8_linear_w8a8"] = _fp8_linear_row(nn, fp8, x, w, ref, flops, run)
    log(f"matmul {tokens}x{n}x{k} (bf16 in) on {run.device_name}: bf16 {row['bf16']['tflops']:.1f} TFLOP/s; "
        f"FP8 _scaled_mm {_rate(row['fp8_scaled_mm'])}; FP8Linear w8a8 {_rate(row['fp8_linear_w8a8'])}")


def _rate(row: dict) -> str:
    return f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row else row.get("skipped") or row.get("error", "?")


def _scaled_mm_row(x, w, ref, flops: float, run: Run) -> dict:
    """The FP8 matrix product alone: activations (M, 1) and weights (1, N) float32 row scales, bf16 out,
    mat_b column-major (the weight's transpose as stored)."""
    import torch

    from fluxserve.engine import fp8

    try:
        xq, x_scale = fp8.quantize_tensor(x, "row")
        wq, w_scale = fp8.quantize_tensor(w, "row")
        w_scale = w_scale.reshape(1, -1)

        def call():
            return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

        error = rel_error(call(), ref)
        ms = median(time_calls(call, run.device, warmup=3, repeat=run.scale.kernel_repeat))
        return {"ms": ms, "tflops": flops / (ms / 1000) / 1e12, "rel_error_vs_bf16": error}
    except Exception as exc:  # noqa: BLE001 - recorded per shape
        return error_record(exc)


def _fp8_linear_row(nn, fp8, x, w, ref, flops: float, run: Run) -> dict:
    """``FP8Linear`` in w8a8 mode, eager: the activation quantisation plus the matrix product."""
    try:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight.data = w
        layer = fp8.FP8Linear(linear, granularity=fp8.default_granularity(run.device), mode="w8a8")
        error = rel_error(layer(x), ref)
        ms = median(time_calls(lambda: layer(x), run.device, warmup=3, repeat=run.scale.kernel_repeat))
        return {"ms": ms, "tflops": flops / (ms / 1000) / 1e12, "rel_error_vs_bf16": error, "mode": layer.mode}
    except Exception as exc:  # noqa: BLE001 - recorded per shape
        return error_record(exc)
