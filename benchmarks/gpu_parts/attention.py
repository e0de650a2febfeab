"""Part ``attention``: every attention backend on the attention geometry of FLUX.2 [dev] and of [klein] 4B at the
run's resolution, in bf16, on the layouts the blocks pass (the single blocks' strided v, the double blocks'
concatenations): ms and TFLOP/s (4 S^2 H D a call) per layout, the error against a float64 reference and against
bf16 SDPA, whether it traces without graph breaks, or why it did not run
(``attention_choice.attention_table``), FP8 attention among them; and what the engine decides at ``regular`` and
``high`` (the same decision the engine took when it loaded the model: it is measured once per GPU and geometry)."""

from __future__ import annotations

from gpu_parts.common import Run, log

ESTIMATES = {
    "gpu": {"attention": 45, "attention.dev": 45, "attention.klein-4b": 40},
    "tiny": {"attention": 16, "attention.dev": 8, "attention.klein-4b": 8},
}
MODELS = ("dev", "klein-4b")


def part(run: Run, report: dict) -> dict:
    report.update(device=run.device_name, resolution=f"{run.scale.width}x{run.scale.height}", models={})
    for model in MODELS:
        result = run.step("attention", report, model, lambda model=model: model_table(run, report, model))
        if result is not None:
            report["models"][model] = result
            run.save("attention", report)
    headline: dict = {}
    for model, result in report["models"].items():
        headline[model] = {"chosen_regular": result["decision_regular"]["backend"],
                           "chosen_high": result["decision_high"]["backend"],
                           "fp8_attention_high": result["decision_high"].get("fp8"),
                           "ms": {name: {layout: cell["ms"] for layout, cell in row["layouts"].items()}
                                  for name, row in result["backends"].items() if "layouts" in row}}
    return headline


def model_table(run: Run, report: dict, model: str) -> dict:
    from fluxserve.engine import attention_choice, random_weights

    arch = random_weights.tiny_architecture(model) if run.tiny else None
    meta = random_weights.build_transformer(model, "meta", run.dtype, arch=arch)
    device, scale = run.device, run.scale
    geometry = attention_choice.geometry_of(meta, image_tokens=(scale.width // 16) * (scale.height // 16),
                                            text_tokens=scale.text_tokens)
    result = attention_choice.attention_table(device, geometry, calls=scale.kernel_repeat, compile_check=True)
    result["model"] = model
    report["models"][model] = result
    run.save("attention", report)
    for name, row in result["backends"].items():
        if "skipped" in row:
            log(f"attention {model} {name}: skipped ({row['skipped']})")
            continue
        log(f"attention {model} {name} ({geometry.tokens} tokens, {geometry.heads} heads x {geometry.head_dim}, bf16) "
            f"on {run.device_name}: " + ", ".join(
                f"{layout} {cell['ms']:.3f} ms {cell['tflops'] or 0:.1f} TFLOP/s" for layout, cell in
                row["layouts"].items()) + f", error vs fp32 {row['rel_error_vs_fp32']}")
    for level in ("regular", "high"):
        decision = attention_choice.decide(device, geometry, level)
        result[f"decision_{level}"] = decision.as_dict()
        log(f"attention {model}: chosen by the engine at {level} on {run.device_name}: {decision.backend} "
            f"({decision.why}); FP8 attention: {decision.fp8_why}")
    result["chosen"] = result["decision_regular"]["backend"]
    return result
