"""Device placement: put each component of a pipeline where the memory plan says, in its precision.

The plan (``fluxserve.engine.plan``) is made *before* anything reaches the GPU, from byte counts
(``pipeline_sizes`` from a meta-device build, ``weights.checkpoint_bytes`` from the checkpoint on disk) and the
GPU's free memory (``memory.free_gpu_bytes``: what the driver reports plus what PyTorch's allocator holds but
does not use, under the process's GPU memory cap when one is set). Each component is then put on the GPU one
tensor at a time by ``place_module``: a Linear the plan holds in FP8 is quantised as soon as its weight has
arrived and its full-precision weight is released, so the GPU never holds the bf16 copy of a component that is
meant to be FP8 (peak: the FP8 component plus one bf16 Linear). A
streamed component stays in host memory and is moved to the GPU layer by layer while it runs (diffusers' group
offloading, the next layer copied on a side stream while the current one computes).

The same routines materialise meta tensors (random weights) and run on any device, which is how they are tested
on the CPU. On the CPU the engine keeps everything resident in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxserve.engine import fp8, memory, plan
from fluxserve.engine.plan import GIB, MemoryPlan

COMPONENTS = ("transformer", "text_encoder", "vae")


def _element_size(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return tensor.element_size()


def named_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> Iterable[tuple[str, int]]:
    """(name, bytes) of ``module``'s parameters (tied ones once) and buffers, floating tensors counted in
    ``dtype`` when given. Works on the meta device."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        yield name, tensor.numel() * _element_size(tensor, dtype)


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, counted in ``dtype`` for floating tensors when given."""
    return sum(size for _, size in named_bytes(module, dtype))


def device_bytes(module: nn.Module | None, device: torch.device | str) -> int:
    """Bytes of ``module``'s parameters and buffers held on ``device``'s kind (0 for None)."""
    if module is None:
        return 0
    kind = torch.device(device).type
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == kind)


# ---- the plan ---------------------------------------------------------------------------------------------------
def linear_shapes(module: nn.Module, include: Callable[[str, nn.Linear], bool]) -> list[tuple[int, int]]:
    """(out, in) of every ``nn.Linear`` under ``module`` that ``include`` accepts (works on the meta device)."""
    return [(m.out_features, m.in_features) for name, m in module.named_modules()
            if type(m) is nn.Linear and include(name, m)]


def text_encoder_filter(name: str, _module: nn.Linear) -> bool:
    """The text encoder's Linears held in FP8: all but the output head (prompt expansion samples from it)."""
    return "lm_head" not in name


def pipeline_sizes(pipe, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each component at ``dtype``, and the FP8 and streamed footprints of the transformer and the text
    encoder (``transformer_fp8``, ``transformer_stream``, ...) for ``plan.plan_memory``. Works on meta modules."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = {name: module_bytes(getattr(pipe, name), dtype) for name in COMPONENTS}
    sizes["transformer_fp8"] = plan.fp8_footprint(
        sizes["transformer"], linear_shapes(pipe.transformer, fp8.transformer_block_filter), size)
    sizes["text_encoder_fp8"] = plan.fp8_footprint(
        sizes["text_encoder"], linear_shapes(pipe.text_encoder, text_encoder_filter), size)
    for name in ("transformer", "text_encoder"):
        sizes[f"{name}_stream"] = plan.stream_footprint(name, named_bytes(getattr(pipe, name), dtype))
    return sizes


def plan_for(device: torch.device | str, sizes: dict[str, int], transformer: str = "auto",
             text_encoder: str = "auto", free_bytes: int | None = None, total_bytes: int | None = None,
             fp8_matmul: bool | None = None) -> MemoryPlan:
    """The memory plan for ``sizes`` on ``device``.

    CUDA: ``plan.plan_memory`` from ``memory.free_gpu_bytes`` (or the given free/total bytes), FP8 matmuls where
    the GPU has them (assumed when planning without a GPU). Other devices: everything resident at the load
    dtype."""
    device = torch.device(device)
    if device.type != "cuda" and free_bytes is None:
        plan.candidates(transformer, text_encoder)  # rejects unknown choices
        return MemoryPlan("bf16", "resident", sum(sizes.get(c, 0) for c in COMPONENTS))
    if free_bytes is None or total_bytes is None:
        free, total = memory.free_gpu_bytes(device)
        free_bytes = free if free_bytes is None else free_bytes
        total_bytes = total if total_bytes is None else total_bytes
    if fp8_matmul is None:
        fp8_matmul = fp8.scaled_mm_supported(device) if torch.cuda.is_available() else True
    return plan.plan_memory(sizes, free_bytes=free_bytes, total_bytes=total_bytes, transformer=transformer,
                            text_encoder=text_encoder, fp8_matmul=fp8_matmul)


# ---- one module, one tensor at a time ---------------------------------------------------------------------------
Materialise = Callable[[str, torch.Tensor, torch.device], torch.Tensor]


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


def stream_module(module: nn.Module, component: str, device: torch.device) -> None:
    """Keep ``module`` in host memory and move it to ``device`` one repeated layer at a time while it runs
    (diffusers' block-level group offloading; on CUDA the next layer is copied on a side stream while the
    current one computes). ``module`` must be on the CPU."""
    from diffusers.hooks import apply_group_offloading

    blocks = None
    if component == "text_encoder":
        # the decoder layers sit a level or two down (Qwen3: model.layers; Mistral3: model.language_model.layers)
        layers = [name for name, sub in module.named_modules()
                  if isinstance(sub, nn.ModuleList) and name.endswith("layers") and "vision" not in name]
        blocks = sorted({part for name in layers[:1] for part in name.split(".")[:-1]})
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1,
                           use_stream=device.type == "cuda", block_modules=blocks)
    module._fluxserve_streamed = True


def is_streamed(module: nn.Module) -> bool:
    return bool(getattr(module, "_fluxserve_streamed", False))


def place_component(module: nn.Module, component: str, device: torch.device | str, memory_plan: MemoryPlan, *,
                    materialise: Materialise | None = None) -> nn.Module:
    """Put one component (``transformer`` | ``text_encoder`` | ``vae``) where ``memory_plan`` says. Tensors
    already on ``device`` (a loader put a bf16 component there) are not copied."""
    device = torch.device(device)
    if component == "vae":
        place_module(module, device, materialise=materialise)
        # convolutions run faster in channels-last layout, on cuDNN as on oneDNN (the VAE is all convs)
        module.to(memory_format=torch.channels_last)
        return module
    held = memory_plan.transformer if component == "transformer" else memory_plan.text_encoder
    if held == "stream" and device.type == "cuda":
        place_module(module, "cpu", materialise=materialise)
        stream_module(module, component, device)
    elif held == "stream":  # nothing to stream from on the CPU: the same hooks, run in place (tests)
        place_module(module, device, materialise=materialise)
        stream_module(module, component, device)
    elif held == "fp8":
        is_transformer = component == "transformer"
        place_module(module, device, materialise=materialise,
                     quantize=fp8.transformer_block_filter if is_transformer else text_encoder_filter,
                     granularity=fp8.default_granularity(device) if is_transformer else "row")
    else:
        place_module(module, device, materialise=materialise)
    return module


# ---- placing a pipeline -------------------------------------------------------------------------------------
@dataclass
class Placement:
    """Where a loaded model's components are and how they are held."""

    device: str
    dtype: str
    transformer: str  # bf16 | fp8 | stream on CUDA; the load dtype (float32) on the CPU
    text_encoder: str  # resident | fp8 | stream
    requested: dict[str, str] = field(default_factory=lambda: {"transformer": "auto", "text_encoder": "auto"})
    bytes: dict[str, int] = field(default_factory=dict)
    plan: MemoryPlan | None = None

    def describe(self) -> str:
        if self.transformer not in plan.TRANSFORMER_PLACEMENTS:
            return f"everything resident in {self.dtype}"
        return plan.describe(self.transformer, self.text_encoder)

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "summary": self.describe(),
            "requested": dict(self.requested),
            "bytes": dict(self.bytes),
            "plan": self.plan.as_dict() if self.plan is not None and self.plan.free_bytes else {},
        }


def placement_of(device: torch.device, dtype: torch.dtype, memory_plan: MemoryPlan, pipe, *,
                 requested: dict[str, str] | None = None, sizes: dict[str, int] | None = None) -> Placement:
    """The ``Placement`` record of a pipeline placed by ``memory_plan`` (and, for a transformer held in FP8,
    the acceleration state told so)."""
    if memory_plan.transformer == "fp8":
        from fluxserve.engine import accel

        accel.prepare_transformer(pipe, "fp8", device)
    component_bytes = {k: v for k, v in (sizes or {}).items() if k in COMPONENTS}
    return Placement(str(device), str(dtype).removeprefix("torch."), memory_plan.transformer,
                     memory_plan.text_encoder, requested=dict(requested or {"transformer": "auto",
                                                                             "text_encoder": "auto"}),
                     bytes=component_bytes, plan=memory_plan)


def place_components(pipe, device: torch.device, dtype: torch.dtype, memory_plan: MemoryPlan, *,
                     requested: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
                     materialise: Callable[[str], Materialise] | None = None) -> Placement:
    """Put ``pipe``'s VAE, transformer and text encoder where ``memory_plan`` says (``place_component``).

    ``materialise(component)`` gives the random initialiser for a meta-device build (``random_weights``)."""
    device = torch.device(device)
    make = materialise or (lambda _component: None)
    for component in ("vae", "transformer", "text_encoder"):
        place_component(getattr(pipe, component), component, device, memory_plan, materialise=make(component))
    return placement_of(device, dtype, memory_plan, pipe, requested=requested, sizes=sizes)


def place_pipeline(pipe, device: torch.device, dtype: torch.dtype, requested: dict[str, str] | None = None
                   ) -> Placement:
    """Place an already loaded pipeline (``weights.load_pipeline``) on ``device`` following the memory plan.

    On the CPU everything stays resident at ``dtype``. On CUDA the plan comes from the modules' byte counts and
    each component is placed with ``place_component``. The real-weight loader (``weights.load_placed_pipeline``)
    plans from disk instead and never holds the whole pipeline on the CPU."""
    sizes = pipeline_sizes(pipe, dtype)
    requested = requested or {"transformer": "auto", "text_encoder": "auto"}
    if device.type != "cuda":
        pipe.to(device)
        pipe.vae.to(memory_format=torch.channels_last)
        name = str(dtype).removeprefix("torch.")
        return Placement(str(device), name, name, "resident", requested=dict(requested),
                         bytes={k: sizes[k] for k in COMPONENTS})
    memory_plan = plan_for(device, sizes, requested["transformer"], requested["text_encoder"])
    return place_components(pipe, device, dtype, memory_plan, requested=requested, sizes=sizes)


__all__ = [
    "GIB",
    "Placement",
    "module_bytes",
    "pipeline_sizes",
    "place_component",
    "place_components",
    "place_module",
    "place_pipeline",
    "plan_for",
    "stream_module",
]
