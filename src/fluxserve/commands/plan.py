"""``fluxserve plan``: what fits where, without a GPU.

For each model it prints where every component would go and in which precision on a GPU of the given memory,
the bytes of each, the working memory kept free, the placements that fit (the default marked) and what each
acceleration level would run. It is the engine's own plan (``fluxserve.engine.plan.plan_memory``), fed with the
byte counts of the published architectures (built on PyTorch's meta device: nothing is allocated or downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys

from fluxserve.commands.common import memory_flag

GIB = 1024**3
MODELS = ("dev", "klein-4b", "klein-9b")
ARCHITECTURE_OF = {"klein-4b-base": "klein-4b", "klein-9b-base": "klein-9b"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="what fits where: each model's placement on a GPU of a given memory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-memory", type=memory_flag("--gpu-memory"),
                        help="the GPU's memory, e.g. 80GiB (default: this machine's first GPU, free memory)")
    parser.add_argument("--model", action="append", choices=[*MODELS, *ARCHITECTURE_OF],
                        help="a model (repeatable; default: dev, klein-4b and klein-9b)")
    parser.add_argument("--acceleration", choices=["none", "regular", "high"],
                        help="show only this level (default: all three)")
    parser.add_argument("--transformer", choices=["auto", "bf16", "fp8", "stream"], default="auto",
                        help="force how the transformer is held, as fluxserve serve --transformer")
    parser.add_argument("--text-encoder", choices=["auto", "resident", "fp8", "stream"], default="auto",
                        help="force how the text encoder is held, as fluxserve serve --text-encoder")
    parser.add_argument("--no-fp8-matmul", action="store_true",
                        help="the GPU has no FP8 matrix units (before Ada/Hopper, e.g. A100)")
    parser.add_argument("--train-resolution", type=int, default=1024, metavar="PIXELS",
                        help="the training resolution the LoRA training plans are made for (default 1024)")
    parser.add_argument("--train-rank", type=int, default=16, metavar="RANK",
                        help="the LoRA rank the training plans are made for (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def model_sizes(model: str) -> dict[str, int]:
    """Bytes of each component of ``model``'s published architecture in bf16, and its FP8 and streamed
    footprints (built on the meta device: nothing allocated)."""
    from fluxserve.engine import random_weights

    return random_weights.meta_sizes(random_weights.build_meta_pipeline(ARCHITECTURE_OF.get(model, model)))


def levels(sizes: dict[str, int], chosen, fp8_matmul: bool, free_bytes: int) -> dict[str, str]:
    """What each acceleration level runs with the chosen placement."""
    if chosen.transformer == "stream":
        bf16 = "bf16 matmuls, eager (a streamed transformer is not compiled)"
        return {"none": bf16, "regular": bf16, "high": f"{bf16}: FP8 needs a resident transformer"}
    if chosen.transformer == "fp8":
        run = ("FP8 matmuls (weights and activations in FP8)" if fp8_matmul
               else "bf16 matmuls on FP8 weights dequantised at every step")
        return {"none": f"{run}, eager", "regular": f"{run}, compiled", "high": f"{run}, compiled"}
    copy = sizes["transformer"] - sizes["transformer_fp8"]
    if not fp8_matmul:
        high = "as regular: no FP8 matrix units"
    elif chosen.needed_bytes + copy <= free_bytes:
        high = f"FP8 matmuls on an FP8 copy of the blocks added beside the bf16 weights (+{copy / GIB:.1f} GiB)"
    else:
        high = (f"as regular: the FP8 copy (+{copy / GIB:.1f} GiB) does not fit beside the bf16 weights; "
                "--transformer fp8 holds the transformer in FP8 instead")
    return {"none": "bf16, eager: the reference",
            "regular": "bf16, lossless (fused QKV, fastest exact attention, compiled, CUDA graphs)", "high": high}


def plan_model(model: str, free_bytes: int, args: argparse.Namespace) -> dict:
    from fluxserve.engine import plan

    sizes = model_sizes(model)
    fp8_matmul = not args.no_fp8_matmul
    try:
        chosen = plan.plan_memory(sizes, free_bytes=free_bytes, transformer=args.transformer,
                                  text_encoder=args.text_encoder, fp8_matmul=fp8_matmul)
    except plan.DoesNotFit as exc:
        return {"model": model, "fits": False, "message": str(exc), "bytes": sizes}
    first = chosen.options[0]
    summary = f"{model}: {chosen.describe()}"
    if chosen.transformer == "stream":
        resident = min((o for o in chosen.options if o.transformer != "stream"), key=lambda o: o.needed_bytes,
                       default=None)
        summary = (f"{model} cannot be resident"
                   + (f" (the smallest resident placement, {resident.describe()}, needs "
                      f"{resident.needed_bytes / GIB:.1f} GiB)" if resident else "")
                   + f": it would stream the transformer from host memory block by block and the text encoder "
                   f"layer by layer (lossless but slow: every step moves "
                   f"{sizes['transformer'] / GIB:.0f} GiB across PCIe; no prompt expansion)")
    elif (chosen.transformer, chosen.text_encoder) != (first.transformer, first.text_encoder):
        summary += f" ({first.describe()} would need {first.needed_bytes / GIB:.1f} GiB)"
    wanted = [args.acceleration] if args.acceleration else ["none", "regular", "high"]
    runs = levels(sizes, chosen, fp8_matmul, free_bytes)
    return {"model": model, "fits": True, "summary": summary, "plan": chosen.as_dict(), "bytes": sizes,
            "acceleration": {level: runs[level] for level in wanted},
            "training": training(model, sizes, chosen, free_bytes, args)}


TRAINING_KINDS = (("text-to-image", 0), ("edit, 1 start image", 1))


def training(model: str, sizes: dict[str, int], chosen, free_bytes: int, args: argparse.Namespace) -> dict:
    """The LoRA training plans (``plan.plan_training``) of the model's trainable variant on the placement chosen
    for serving: text-to-image and edit datasets at ``--train-resolution`` and ``--train-rank``."""
    from fluxserve.engine import plan, random_weights
    from fluxserve.training.trainer import step_bytes

    trained = model if model == "dev" or model.endswith("-base") else f"{model}-base"
    transformer = random_weights.build_transformer(ARCHITECTURE_OF.get(trained, trained), "meta")
    plans = {}
    for kind, references in TRAINING_KINDS:
        step = step_bytes(transformer, resolution=args.train_resolution, rank=args.train_rank, references=references)
        try:
            plans[kind] = {"fits": True, **plan.plan_training(
                sizes, transformer=chosen.transformer, text_encoder=chosen.text_encoder, step_bytes=step,
                free_bytes=free_bytes).as_dict()}
        except plan.DoesNotFit as exc:
            plans[kind] = {"fits": False, "step_gib": round(step / GIB, 2), "message": str(exc)}
    return {"model": trained, "resolution": args.train_resolution, "rank": args.train_rank, "plans": plans}


def format_model(result: dict) -> str:
    sizes = result["bytes"]
    lines = [(f"== {result['model']}: transformer {sizes['transformer'] / GIB:.1f} GiB bf16 "
             f"({sizes['transformer_fp8'] / GIB:.1f} FP8), text encoder {sizes['text_encoder'] / GIB:.1f} GiB "
             f"({sizes['text_encoder_fp8'] / GIB:.1f} FP8), VAE {sizes['vae'] / GIB:.2f} GiB")]
    if not result["fits"]:
        return "\n".join([*lines, f"does not fit: {result['message']}"])
    chosen = result["plan"]
    lines.append(result["summary"])
    lines.append(f"placements ({chosen['free_gib']} GiB free, {chosen['headroom_gib']} GiB kept as working memory):")
    for option in chosen["options"]:
        mark = "*" if (option["transformer"], option["text_encoder"]) == (chosen["transformer"],
                                                                          chosen["text_encoder"]) else " "
        fits = "fits" if option["fits"] else "does not fit"
        lines.append(f"  {mark} {option['summary']:<44} {option['needed_gib']:>6.1f} GiB  {fits:<12}  "
                     f"{option['trade_off']}")
    lines.append("  (* the default; --transformer / --text-encoder choose another that fits)")
    for level, what in result["acceleration"].items():
        lines.append(f"  {level:<8} {what}")
    train = result["training"]
    lines.append(f"training {train['model']} (LoRA rank {train['rank']}, {train['resolution']}x{train['resolution']}, "
                 "the whole GPU, on the placement above):")
    for kind, row in train["plans"].items():
        if row["fits"]:
            lines.append(f"  {kind:<20} {row['needed_gib']:>6.1f} GiB  fits  ({row['step_gib']:.1f} GiB for the "
                         f"step)  {row['summary']}")
        else:
            lines.append(f"  {kind:<20} does not fit: {row['message']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    free_bytes = args.gpu_memory
    if free_bytes is None:
        import torch

        if not torch.cuda.is_available():
            print("fluxserve plan: no GPU here; give --gpu-memory, e.g. --gpu-memory 80GiB", file=sys.stderr)
            return 2
        from fluxserve.config import Settings
        from fluxserve.engine import memory

        device = torch.device("cuda")
        try:  # the cap the server would run under (FLUXSERVE_GPU_MEMORY_CAP) shapes the plan as it would there
            memory.apply_memory_cap(device, Settings.from_env().gpu_memory_cap)
        except ValueError as exc:
            print(f"fluxserve plan: {exc}", file=sys.stderr)
            return 2
        free_bytes, _ = memory.free_gpu_bytes(device)
    results = [plan_model(model, free_bytes, args) for model in (args.model or MODELS)]
    if args.json:
        print(json.dumps({"gpu_memory_gib": round(free_bytes / GIB, 2), "models": results}, indent=2))
    else:
        print(f"fluxserve plan for a GPU with {free_bytes / GIB:.1f} GiB free"
              + ("" if not args.no_fp8_matmul else " (no FP8 matrix units)"))
        print("\n\n".join(format_model(result) for result in results))
    return 0
