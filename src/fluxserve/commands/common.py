"""Flags shared by every command that loads models or opens the job store."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fluxserve import fetch
from fluxserve.config import Settings, memory_size


def memory_flag(flag: str) -> Callable[[str], int]:
    """The argparse type of a memory size flag ("80GiB", "141GB", "24"): bytes; a bad size names ``flag``."""

    def parse(text: str) -> int:
        try:
            return memory_size(text, flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true", default=None,
                        help="serve every endpoint with the tiny demo models (built on first use)")
    parser.add_argument("--catalog", help="endpoint catalogue TOML (default: the packaged catalog.toml)")
    parser.add_argument("--data-dir", help="where the database, files and model cache live")
    parser.add_argument("--device", help="cuda, cuda:N, a list like cuda:0,cuda:1, or cpu (default: every CUDA GPU, "
                        "one engine and its workers each; the CPU without one)")
    parser.add_argument("--transformer", dest="transformer_placement", choices=["auto", "bf16", "fp8", "stream"],
                        help="how the transformer is held on CUDA: bf16, fp8 (FP8 weights, FP8 matmuls where the "
                        "GPU has them) or stream (host memory, block by block); default: auto, from free GPU "
                        "memory (see fluxserve plan)")
    parser.add_argument("--text-encoder", dest="text_encoder_placement",
                        choices=["auto", "resident", "fp8", "stream"],
                        help="how the text encoder is held on CUDA: resident (bf16), fp8, or stream (host "
                        "memory, layer by layer; no prompt expansion); default: auto")
    parser.add_argument("--gpu-memory-cap", dest="gpu_memory_cap", type=memory_flag("--gpu-memory-cap"),
                        metavar="SIZE",
                        help="use at most SIZE of each GPU (e.g. 80GiB: a larger GPU plans, places and runs as an "
                        "80 GB one; GiB unless GB is written); applied at engine start with "
                        "torch.cuda.set_per_process_memory_fraction; ignored on the CPU (default: the whole GPU, "
                        "or FLUXSERVE_GPU_MEMORY_CAP)")
    parser.add_argument("--upstream", action="append", metavar="NAME=URL",
                        help="a provider that serves the closed models' routes (repeatable), e.g. "
                        "fal=https://queue.fal.run; its key from FLUXSERVE_UPSTREAM_<NAME>_KEY (see docs/gateway.md)")
    parser.add_argument("--fetch-allow", metavar="CIDR[:PORT],...",
                        help="internal addresses that reference image, LoRA and webhook URLs may reach, e.g. "
                        "10.0.0.0/8 or 192.168.1.5:8080 (default: none; loopback, private and link-local "
                        "addresses are refused)")


def add_random_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-weights", action="store_true", default=None,
                        help="build the catalogue models' full-size architectures with seeded random weights "
                        "directly on the CUDA GPU instead of loading weights: no download, noise images, the "
                        "safety checker off (benchmarks of speed and memory; FLUXSERVE_RANDOM_WEIGHTS=1)")


def random_weights_refusal(settings: Settings) -> str | None:
    """Why the setting ``random_weights`` cannot run on the devices these settings serve on (no CUDA GPU,
    --demo with it), or None; said before anything is built."""
    if not settings.random_weights:
        return None
    from fluxserve.engine.pipeline import serving_devices
    from fluxserve.engine.random_weights import RandomWeightsUnavailable, check_setting

    try:
        for device in serving_devices(settings.device):
            check_setting(settings.random_weights, device, settings.demo)
    except RandomWeightsUnavailable as exc:
        return str(exc)
    return None


def random_weights_note(settings: Settings) -> str:
    """The start-up line's words for what the engines serve instead of weights ("" when they load weights)."""
    if not settings.random_weights:
        return ""
    from fluxserve.engine.random_weights import SAFETY_OFF

    what = "full-size architectures" if settings.random_weights == "full" else "tiny stand-in architectures"
    return f"random weights: the catalogue models' {what}, seeded, noise images; safety checker {SAFETY_OFF}"


def settings_from_args(args: argparse.Namespace, **extra) -> Settings:
    from pathlib import Path

    overrides = {
        "demo": getattr(args, "demo", None),
        "catalog": getattr(args, "catalog", None),
        "data_dir": Path(args.data_dir) if getattr(args, "data_dir", None) else None,
        "device": getattr(args, "device", None),
        "transformer_placement": getattr(args, "transformer_placement", None),
        "text_encoder_placement": getattr(args, "text_encoder_placement", None),
        "gpu_memory_cap": getattr(args, "gpu_memory_cap", None),
        "fetch_allow": getattr(args, "fetch_allow", None),
        "upstream": ",".join(args.upstream) if getattr(args, "upstream", None) else None,
        "random_weights": "full" if getattr(args, "random_weights", None) else None,
    }
    overrides.update(extra)
    try:
        settings = Settings.from_env(**overrides)
        fetch.configure(fetch.FetchPolicy.from_settings(settings))
        settings.upstreams  # noqa: B018 - a malformed --upstream stops here, naming it
    except ValueError as exc:
        raise SystemExit(f"fluxserve: {exc}") from None
    return settings
