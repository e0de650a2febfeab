"""The kernel measurements a GPU run calls (engine/kernels/bench.py), on tiny shapes on the CPU: they run,
return JSON-able figures, and compare the outputs correctly (the CPU runs the torch references, which are the
stock computation, so every comparison with eager PyTorch is exact here). No timing is asserted."""

from __future__ import annotations

import json

from fluxserve.engine.kernels import bench


def test_benchmark_kernels_on_the_cpu():
    report = bench.benchmark_kernels("cpu", warmup=1, repeats=2)
    json.dumps(report)
    assert report["shapes"] == vars(bench.TINY) and report["compiled_with"] == "aot_eager"
    assert len(report["cases"]) == 7
    for name, case in report["cases"].items():
        assert case["fused_ms"] > 0 and case["compiled_ms"] > 0 and case["bytes"] > 0, name
        assert case["compiled_vs_eager"]["exact"], name
        if case["same_math"]:
            assert case["fused_vs_eager"]["exact"], name
        else:  # FP8 q/k quantised from float32 where the stock code quantises its bf16 output
            assert 0.9 < case["fused_vs_eager"]["equal"] < 1.0, name
    only = bench.benchmark_kernels("cpu", warmup=0, repeats=1, only=("(b)",))
    assert list(only["cases"]) == ["layernorm_modulation_quant (b)"]


def test_a_mismatch_is_reported():
    q, scale = bench._stock_norm_quant(*bench.cases(bench.torch.device("cpu"), bench.TINY)[3].inputs)
    moved = bench._match((q, scale * 2), (q, scale))
    assert not moved["exact"] and moved["scale_equal"] == 0.0 and moved["max_abs_diff"] > 0


def test_fast_accum_error_on_the_cpu():
    report = bench.fast_accum_error("cpu", warmup=0, repeats=1)
    json.dumps(report)
    assert set(report["gemms"]) == set(bench.gemm_shapes(bench.TINY))
    for name, gemm in report["gemms"].items():
        # the FP8 product against float32 on the same FP8 operands: bf16 output rounding, ~2^-9 relative
        assert 0 < gemm["default_rel_error"] < 1e-2 and 0 < gemm["fast_rel_error"] < 1e-2, name
