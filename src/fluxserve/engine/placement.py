"""Device placement: which model sits where, in which precision.

On CUDA every model stays resident when it fits in free memory. When it does not (``fp8.plan_memory`` decides
from ``torch.cuda.mem_get_info``), the text encoder (used once per request, for a few hundred tokens) gives way
first: stored in FP8 (weights only, per-output-channel scales, upcast in forward: half the bf16 bytes); then the
transformer's blocks are held in FP8 too; only then is the text encoder kept on the CPU and moved in for each
encoding (offload). The text-encoder choice can be forced with ``settings.text_encoder_placement``.
On the CPU everything is resident in float32.

The plan is made *before* anything reaches the GPU, from byte counts (``plan_for``): the loaders count the bf16
bytes from the checkpoint on disk (``weights.checkpoint_bytes``) or from a meta-device build
(``random_weights``). Each component is then put on the GPU one tensor at a time by ``place_module``: a Linear
the plan holds in FP8 is quantised as soon as its weight has arrived, so the GPU never holds the bf16 copy of a
component that is meant to be FP8 (peak: the FP8 component plus one bf16 Linear). The same routine
materialises meta tensors (random weights) and runs on any device, which is how it is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxserve.engine import fp8

GIB = 1024**3


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, counted in ``dtype`` for floating tensors when given."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        size = tensor.element_size()
        if dtype is not None and tensor.is_floating_point():
            size = torch.empty((), dtype=dtype).element_size()
        total += tensor.numel() * size
    return total


def headroom_bytes(total_bytes: int) -> int:
    """Working memory kept free for activations, attention and the VAE decode."""
    return max(4 * GIB, int(0.08 * total_bytes))


# ---- FP8 text encoder ----------------------------------------------------------------------------------------
def quantize_text_encoder(text_encoder: nn.Module) -> int:
    """Store the text encoder's Linear weights in float8_e4m3fn with per-output-channel scales, upcast in
    forward (weight-only; ``fluxserve.engine.fp8.FP8Linear``). The output head stays as it is (prompt
    expansion samples from it). Returns how many layers were converted."""
    return fp8.quantize_linears(text_encoder, include=lambda name, _m: "lm_head" not in name,
                                granularity="row", mode="weight_only")


# ---- placing a pipeline -------------------------------------------------------------------------------------
@dataclass
class Placement:
    device: str
    dtype: str
    text_encoder: str  # resident | fp8 | offload
    requested: str = "auto"
    bytes: dict[str, int] = field(default_factory=dict)
    transformer: str = ""  # the transformer's precision: bf16 | float32 | fp8
    free_bytes: int = 0  # free GPU memory the plan was made from (0 on the CPU)
    needed_bytes: int = 0  # what the plan expects to use, headroom included
    _hook: object = None

    def after_text_encoding(self) -> None:
        """Move an offloaded text encoder back to the CPU."""
        if self._hook is not None:
            self._hook.offload()

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "text_encoder": self.text_encoder,
            "transformer": self.transformer or self.dtype,
            "requested": self.requested,
            "bytes": dict(self.bytes),
            "plan": {"free_gib": round(self.free_bytes / GIB, 2), "needed_gib": round(self.needed_bytes / GIB, 2)},
        }


def plan_for(device: torch.device | str, sizes: dict[str, int], requested: str = "auto",
             free_bytes: int | None = None, total_bytes: int | None = None) -> fp8.MemoryPlan:
    """The memory plan for ``sizes`` (bf16 bytes of ``transformer``, ``text_encoder``, ``vae``) on ``device``.

    CUDA: ``fp8.plan_memory`` from ``torch.cuda.mem_get_info`` (or the given free/total bytes) with
    ``headroom_bytes`` kept free. Other devices: everything resident at the load dtype (no FP8 there)."""
    device = torch.device(device)
    if device.type != "cuda" and free_bytes is None:
        if requested not in fp8.TEXT_ENCODER_CHOICES:
            raise ValueError(f"text encoder placement {requested!r}: choose one of "
                             + ", ".join(fp8.TEXT_ENCODER_CHOICES))
        return fp8.MemoryPlan("bf16", "resident", sum(sizes.values()), 0)
    if free_bytes is None or total_bytes is None:
        free, total = torch.cuda.mem_get_info(device)
        free_bytes = free if free_bytes is None else free_bytes
        total_bytes = total if total_bytes is None else total_bytes
    return fp8.plan_memory(
        free_bytes=free_bytes, transformer_bytes=sizes["transformer"], text_encoder_bytes=sizes["text_encoder"],
        vae_bytes=sizes.get("vae", 0), reserve_bytes=headroom_bytes(total_bytes), text_encoder_choice=requested,
        transformer_fp8_bytes=sizes.get("transformer_fp8"), text_encoder_fp8_bytes=sizes.get("text_encoder_fp8"),
    )


def linear_shapes(module: nn.Module, include: Callable[[str, nn.Linear], bool]) -> list[tuple[int, int]]:
    """(out, in) of every ``nn.Linear`` under ``module`` that ``include`` accepts (works on the meta device)."""
    return [(m.out_features, m.in_features) for name, m in module.named_modules()
            if type(m) is nn.Linear and include(name, m)]


def pipeline_sizes(pipe, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each component at ``dtype``, and the FP8 footprints of the transformer and the text encoder
    (``transformer_fp8``, ``text_encoder_fp8``) for ``plan_for``. Works on meta-device modules."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = {name: module_bytes(getattr(pipe, name), dtype) for name in ("transformer", "text_encoder", "vae")}
    sizes["transformer_fp8"] = fp8.fp8_footprint(
        sizes["transformer"], linear_shapes(pipe.transformer, fp8.transformer_block_filter), size)
    sizes["text_encoder_fp8"] = fp8.fp8_footprint(
        sizes["text_encoder"], linear_shapes(pipe.text_encoder, text_encoder_filter), size)
    return sizes


# ---- one module, one tensor at a time ---------------------------------------------------------------------------
Materialise = Callable[[str, torch.Tensor, torch.device], torch.Tensor]


def text_encoder_filter(name: str, _module: nn.Linear) -> bool:
    """The text encoder's Linears held in FP8: all but the output head (prompt expansion samples from it)."""
    return "lm_head" not in name


def place_module(
    module: nn.Module,
    device: torch.device | str,
    *,
    quantize: Callable[[str, nn.Linear], bool] | None = None,
    granularity: str = "row",
    materialise: Materialise | None = None,
) -> int:
    """Put ``module`` on ``device`` submodule by submodule; returns how many Linears became ``FP8Linear``.

    Each parameter and buffer is moved (or, when it is on the meta device, created by
    ``materialise(full_name, meta_tensor, device)``); right after a ``nn.Linear``'s tensors have arrived, it is
    replaced by an ``fp8.FP8Linear`` (weight-only mode) when ``quantize(name, linear)`` says so, which drops
    the bf16 weight. Tied tensors stay tied. Works on any device (tests run it on the CPU)."""
    device = torch.device(device)
    seen: dict[int, int] = {}
    for _name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    shared = {key for key, count in seen.items() if count > 1}
    done: dict[int, torch.Tensor] = {}
    count = 0
    for name, sub in list(module.named_modules()):
        for store in (sub._parameters, sub._buffers):
            for key, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) in done:
                    store[key] = done[id(tensor)]
                    continue
                full = f"{name}.{key}" if name else key
                with torch.no_grad():
                    if tensor.is_meta:
                        if materialise is None:
                            raise ValueError(f"{full} is on the meta device and nothing materialises it")
                        data = materialise(full, tensor, device)
                    else:
                        data = tensor.detach().to(device)
                new = nn.Parameter(data, requires_grad=False) if store is sub._parameters else data
                if id(tensor) in shared:
                    done[id(tensor)] = new
                store[key] = new
        if quantize is not None and type(sub) is nn.Linear and quantize(name, sub):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, fp8.FP8Linear(sub, granularity=granularity, mode="weight_only"))
            sub._parameters["weight"] = None  # release the full-precision weight now, not after the walk
            count += 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return count


def place_components(pipe, device: torch.device, dtype: torch.dtype, plan: fp8.MemoryPlan, *,
                     requested: str = "auto", sizes: dict[str, int] | None = None,
                     materialise: Callable[[str], Materialise] | None = None) -> Placement:
    """Put ``pipe``'s transformer, text encoder and VAE where ``plan`` says, each with ``place_module``.

    ``materialise(component)`` gives the random initialiser for a meta-device build (``random_weights``);
    real weights are moved; tensors already on ``device`` (a loader put a bf16-resident component there with
    ``device_map``) are not copied."""
    device = torch.device(device)
    make = materialise or (lambda _component: None)
    granularity = fp8.default_granularity(device)
    place_module(pipe.vae, device, materialise=make("vae"))
    fp8_transformer = plan.transformer == "fp8"
    place_module(pipe.transformer, device, materialise=make("transformer"), granularity=granularity,
                 quantize=fp8.transformer_block_filter if fp8_transformer else None)
    hook = None
    if plan.text_encoder == "offload":
        place_module(pipe.text_encoder, "cpu", materialise=make("text_encoder"))
        from accelerate import cpu_offload_with_hook

        _, hook = cpu_offload_with_hook(pipe.text_encoder, execution_device=device)
    else:
        place_module(pipe.text_encoder, device, materialise=make("text_encoder"), granularity="row",
                     quantize=text_encoder_filter if plan.text_encoder == "fp8" else None)
    if device.type != "cuda":
        pipe.vae.to(memory_format=torch.channels_last)
    name = str(dtype).removeprefix("torch.")
    precision = _dtype_name(dtype)
    if fp8_transformer:
        precision = _mark_held_in_fp8(pipe, device)
    component_bytes = {k: v for k, v in (sizes or {}).items() if k in ("transformer", "text_encoder", "vae")}
    return Placement(str(device), name, plan.text_encoder, requested=requested, bytes=component_bytes,
                     transformer=precision, free_bytes=plan.free_bytes, needed_bytes=plan.needed_bytes,
                     _hook=hook)


def _dtype_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def _mark_held_in_fp8(pipe, device: torch.device) -> str:
    """Tell the acceleration state that the transformer is held in FP8 (its blocks are quantised already)."""
    from fluxserve.engine import accel

    precision = accel.prepare_transformer(pipe, "fp8", device)
    state = getattr(pipe, "_fluxserve_accel", None)
    if state is not None and not state.held_in_fp8:
        state.held_in_fp8 = True
        state.notes.append("transformer held in FP8 (bf16 did not fit): lossless levels dequantise FP8 weights")
    return precision


def place_pipeline(pipe, device: torch.device, dtype: torch.dtype, requested: str = "auto") -> Placement:
    """Place an already loaded pipeline (``weights.load_pipeline``) on ``device`` following the memory plan.

    On the CPU everything stays resident at ``dtype`` (today's simple path). On CUDA the plan comes from the
    modules' byte counts and each component is moved with ``place_module`` (FP8 layers quantised as they
    arrive). The real-weight loader (``weights.load_placed_pipeline``) plans from disk instead and never holds
    the whole pipeline on the CPU."""
    sizes = pipeline_sizes(pipe, dtype)
    if device.type != "cuda":
        pipe.to(device)
        # oneDNN convolutions are several times faster in channels-last layout on the CPU (the VAE is all convs)
        pipe.vae.to(memory_format=torch.channels_last)
        name = str(dtype).removeprefix("torch.")
        component_bytes = {k: sizes[k] for k in ("transformer", "text_encoder", "vae")}
        return Placement(str(device), name, "resident", requested=requested, transformer=name, bytes=component_bytes)
    plan = plan_for(device, sizes, requested)
    return place_components(pipe, device, dtype, plan, requested=requested, sizes=sizes)
