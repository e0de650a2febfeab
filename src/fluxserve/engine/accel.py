"""Acceleration levels: the fal ``acceleration`` field (``go_fast`` of the OpenAI/Replicate dialects maps to
``high``).

* ``none``: the reference. Stock diffusers modules, eager, PyTorch's default SDPA dispatch, no prompt cache.
* ``regular`` (default): lossless transforms only. Fused QKV projections in the double-stream blocks, the
  fastest exact attention kernel, measured once per GPU and attention geometry (``attention_choice``),
  regional ``torch.compile`` of the repeated transformer blocks with dynamic shapes (one compiled graph per
  block class, reused by every block; a new resolution does not recompile the model), CUDA graphs on CUDA,
  and a prompt-embedding cache (an LRU of text-encoder outputs; a hit skips the text encoder).
* ``high``: ``regular`` plus FP8 weights and activations for the transformer blocks' Linear layers
  (``fluxserve.engine.fp8``, ``torch._scaled_mm``), and FP8 attention (FlashAttention-3's FP8 path) where a
  Hopper GPU and the kernel allow it and it is faster. CUDA with compute capability >= 8.9 only; elsewhere it
  runs as ``regular`` and the report says so.

The engine calls ``apply_acceleration(pipe, level, device)`` when a model loads and before every request; it
is idempotent and cheap when nothing changes, and switches between levels on the same resident weights.
``prepare_transformer(pipe, precision, device)`` is called once at load time when the memory plan
(``fp8.plan_memory``) holds the transformer in FP8. Compile and CUDA graphs are guarded: if the first compiled
forward fails, the model falls back to eager and the report says so.

Environment overrides: ``FLUXSERVE_COMPILE`` (auto|1|0; auto = on for CUDA, off on CPU where compiling a
block takes longer than it saves), ``FLUXSERVE_CUDA_GRAPHS`` (auto|1|0), ``FLUXSERVE_ATTENTION`` (an exact
attention backend forced at ``regular`` and ``high`` instead of the measured one: a diffusers name such as
``native`` or ``_flash_3``, or one of ``fluxserve.engine.attention``'s, such as ``sdpa_cudnn`` or ``fa3``),
``FLUXSERVE_FP8_ATTENTION`` (auto|1|0; auto = on at ``high`` where it runs within tolerance and is faster),
``FLUXSERVE_PROMPT_CACHE`` (entries; 0 disables), ``FLUXSERVE_PROMPT_CACHE_MB``, and the switches of the lossless
savings around the blocks (``fluxserve.engine.lossless``: RoPE tables kept, the text encoder compiled,
post-processing on the device, cudnn.benchmark for the VAE), ``FLUXSERVE_FUSED_KERNELS`` (auto|1|0: fluxserve's
block forwards on the fused Triton ops; auto = where Triton runs, i.e. CUDA), ``FLUXSERVE_SPLIT_PROJECTION``
(auto|1|0: the single blocks' in-projection as two GEMMs; auto = timed once on CUDA), ``FLUXSERVE_FP8_FAST_ACCUM``
(1 turns on ``_scaled_mm``'s fast accumulation at ``high``; lossy, off by default).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fluxserve.engine import attention, blocks, fp8, lossless, memory
from fluxserve.engine import split as split_mod
from fluxserve.engine.attention_choice import decide, geometry_of
from fluxserve.engine.compile_errors import is_compile_failure
from fluxserve.engine.kernels import runtime as kernel_runtime
from fluxserve.engine.lossless import LosslessOptions, LosslessState
from fluxserve.engine.plan import headroom_bytes
from fluxserve.engine.switches import env_switch

log = logging.getLogger(__name__)

LEVELS = ("none", "regular", "high")
DEFAULT_LEVEL = "regular"


def normalise_level(value: str | bool | None) -> str:
    """``"none" | "regular" | "high"`` from a level name, a ``go_fast`` boolean (True -> high,
    False -> regular) or None (the default, regular)."""
    if value is None:
        return DEFAULT_LEVEL
    if isinstance(value, bool):
        return level_from_go_fast(value)
    level = str(value).strip().lower()
    if level not in LEVELS:
        raise ValueError(f"acceleration must be one of {', '.join(LEVELS)}, not {value!r}")
    return level


def level_from_go_fast(go_fast: bool | None) -> str:
    """OpenAI/Replicate ``go_fast``: True -> ``high``, False or absent -> ``regular``."""
    return "high" if go_fast else DEFAULT_LEVEL


# ---- options ----------------------------------------------------------------------------------------
@dataclass
class AccelOptions:
    compile: bool | None = None  # None = auto: CUDA only
    cuda_graphs: bool | None = None  # None = auto: with compile on CUDA
    attention: str | None = None  # None = measured; else an exact backend forced at regular and high
    fp8_attention: bool | None = None  # None = auto: at high where it runs within tolerance and is faster
    prompt_cache_entries: int = 64
    prompt_cache_bytes: int = 2 * 1024**3
    cuda_graph_shapes: int = 4  # input shapes (resolution x batch) that get CUDA graphs; others run without
    lossless: LosslessOptions = field(default_factory=LosslessOptions)  # the savings of engine/lossless.py
    fused_kernels: bool | None = None  # None = auto: where the Triton kernels run (CUDA with Triton)
    split_projection: bool | None = None  # None = auto: timed on CUDA, fused elsewhere
    fp8_fast_accum: bool = False  # _scaled_mm's fast accumulation at high (lossy)

    @classmethod
    def from_env(cls) -> AccelOptions:
        return cls(
            compile=env_switch("FLUXSERVE_COMPILE"),
            cuda_graphs=env_switch("FLUXSERVE_CUDA_GRAPHS"),
            fused_kernels=env_switch("FLUXSERVE_FUSED_KERNELS"),
            split_projection=env_switch("FLUXSERVE_SPLIT_PROJECTION"),
            fp8_fast_accum=bool(env_switch("FLUXSERVE_FP8_FAST_ACCUM")),
            cuda_graph_shapes=int(os.environ.get("FLUXSERVE_CUDA_GRAPH_SHAPES", "4")),
            attention=os.environ.get("FLUXSERVE_ATTENTION") or None,
            fp8_attention=env_switch("FLUXSERVE_FP8_ATTENTION"),
            prompt_cache_entries=int(os.environ.get("FLUXSERVE_PROMPT_CACHE", "64")),
            prompt_cache_bytes=int(float(os.environ.get("FLUXSERVE_PROMPT_CACHE_MB", "2048")) * 1024**2),
            lossless=LosslessOptions.from_env(),
        )

    def compile_on(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def cuda_graphs_on(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return self.cuda_graphs if self.cuda_graphs is not None else True


# ---- fused QKV --------------------------------------------------------------------------------------
def _is_fusable(module: nn.Module) -> bool:
    return (
        getattr(module, "_supports_qkv_fusion", False)
        and hasattr(module, "fuse_projections")
        and hasattr(module, "to_q")
    )


def _fusable_attention(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules() if _is_fusable(m)]


def fuse_qkv(transformer: nn.Module) -> int:
    """Fuse Q/K/V (and the text stream's added Q/K/V) of the double-stream blocks into one projection each.

    Uses diffusers' ``fuse_projections`` and then turns the now-unused ``to_q``/``to_k``/``to_v`` weights
    into views of the fused weight, so fusing costs no extra memory and ``unfuse_qkv`` is free. The single
    stream blocks' QKV is fused in the checkpoint already. Returns the number of attention modules fused.
    """
    count = 0
    for attn in _fusable_attention(transformer):
        if getattr(attn, "fused_projections", False):
            continue
        if any(not isinstance(getattr(attn, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v")):
            continue  # wrapped (LoRA) or quantised projections: leave them alone
        with torch.no_grad():
            attn.fuse_projections()
            _share_storage(attn.to_qkv, [attn.to_q, attn.to_k, attn.to_v])
            if hasattr(attn, "to_added_qkv"):
                _share_storage(attn.to_added_qkv, [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
        count += 1
    return count


def _share_storage(fused: nn.Module, parts: list[nn.Module]) -> None:
    if not isinstance(fused, nn.Linear):
        return
    start = 0
    for part in parts:
        if not isinstance(part, nn.Linear):
            return
        rows = part.out_features
        part.weight = nn.Parameter(fused.weight.data[start : start + rows], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = nn.Parameter(fused.bias.data[start : start + rows], requires_grad=False)
        start += rows


def unfuse_qkv(transformer: nn.Module) -> int:
    """Go back to separate Q/K/V projections (diffusers' ``unfuse_projections`` drops the fused layers). The
    per-projection layers were kept as views of the fused weight (bf16 or FP8), so they still hold the same
    weights and nothing is copied. Returns the number of attention modules unfused."""
    count = 0
    for attn in _fusable_attention(transformer):
        if getattr(attn, "fused_projections", False):
            attn.unfuse_projections()
            count += 1
    return count


def is_fused(transformer: nn.Module) -> bool:
    return any(getattr(a, "fused_projections", False) for a in _fusable_attention(transformer))


def has_lora(module: nn.Module) -> bool:
    """True when peft LoRA layers are injected (fused QKV would bypass them, so it is undone)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _install_lora_guard(pipe: Any) -> None:
    """Unfuse QKV before any LoRA is loaded: peft wraps ``to_q``/``to_k``/``to_v``, which a fused projection
    would bypass. The next ``apply_acceleration`` sees the LoRA layers and keeps QKV unfused; once they are
    unloaded it fuses again from the current weights."""
    if getattr(pipe, "_fluxserve_lora_guard", False) or not hasattr(pipe, "load_lora_weights"):
        return
    original = pipe.load_lora_weights

    @functools.wraps(original)
    def load_lora_weights(*args, **kwargs):
        unfuse_qkv(pipe.transformer)
        state = getattr(pipe, "_fluxserve_accel", None)
        if state is not None:
            state.fused_qkv = False
        return original(*args, **kwargs)

    pipe.load_lora_weights = load_lora_weights
    pipe._fluxserve_lora_guard = True


# The fused projection of a double-stream attention module and the per-projection layers it replaces.
QKV_GROUPS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)


def _use_fused_rows(attn: nn.Module, whole: fp8.FP8Linear, part_names: tuple[str, ...]) -> None:
    """Make the per-projection layers row slices of the fused FP8 layer ``whole`` (no second copy); their
    previous weights are let go."""
    start = 0
    for part_name in part_names:
        rows = getattr(attn, part_name).out_features
        setattr(attn, part_name, whole.slice_rows(start, start + rows))
        start += rows


def quantize_fused_transformer(
    transformer: nn.Module,
    *,
    granularity: str,
    mode: str,
    keep_original: bool,
    on_layer: Callable[[str], None] | None = None,
) -> int:
    """FP8-quantise the transformer blocks; where QKV is fused, the unused per-projection layers become row
    slices of the fused FP8 weight (same bytes, no second copy).

    Each bf16 weight is let go as soon as its FP8 copy exists: a fused projection's per-projection views are
    replaced by FP8 slices right after the fused layer is converted, so the peak is the FP8 transformer plus
    one layer. ``on_layer(name)``, when given, is called after each layer is converted.
    """
    pending: dict[str, tuple[nn.Module, str, tuple[str, ...]]] = {}  # fused layer name -> where its parts are
    skip: set[int] = set()
    for attn_name, attn in transformer.named_modules():
        if not (_is_fusable(attn) and getattr(attn, "fused_projections", False)):
            continue
        for fused_name, part_names in QKV_GROUPS:
            if getattr(attn, fused_name, None) is None:
                continue
            pending[f"{attn_name}.{fused_name}"] = (attn, fused_name, part_names)
            skip.update(id(getattr(attn, n)) for n in part_names if getattr(attn, n, None) is not None)

    def include(name: str, module: nn.Linear) -> bool:
        return fp8.transformer_block_filter(name, module) and id(module) not in skip

    def converted(name: str) -> None:
        if name in pending:
            attn, fused_name, part_names = pending.pop(name)
            _use_fused_rows(attn, getattr(attn, fused_name), part_names)
        if on_layer is not None:
            on_layer(name)

    count = fp8.quantize_linears(
        transformer,
        include=include,
        granularity=granularity,
        mode=mode,
        keep_original=keep_original,
        on_layer=converted,
    )
    for attn, fused_name, part_names in pending.values():  # fused layers that were in FP8 already
        whole = getattr(attn, fused_name)
        if isinstance(whole, fp8.FP8Linear):
            _use_fused_rows(attn, whole, part_names)
    return count


def fuse_fp8_qkv(transformer: nn.Module) -> int:
    """Fuse Q/K/V (and the text stream's added Q/K/V) of a transformer held in FP8 into one ``FP8Linear``
    each, where diffusers' fused attention path reads them (``to_qkv``, ``to_added_qkv``,
    ``fused_projections``).

    Only for row-wise scales: each output row keeps its FP8 values and scale, and the activations are
    quantised per token of the same input, so the fused layer computes exactly what the three did. The
    per-projection layers become row slices of the fused one, so no second copy is held, and ``unfuse_qkv``
    restores them by dropping the fused layer. Attention modules with per-tensor scales (one scale per
    projection) stay unfused. Returns the number of attention modules fused.
    """
    count = 0
    for attn in _fusable_attention(transformer):
        if getattr(attn, "fused_projections", False):
            continue
        groups = [(fused, parts) for fused, parts in QKV_GROUPS if getattr(attn, parts[0], None) is not None]
        layers = [getattr(attn, n, None) for _, parts in groups for n in parts]
        if not all(isinstance(layer, fp8.FP8Linear) and layer.granularity == "row" for layer in layers):
            continue
        with torch.no_grad():
            for fused_name, part_names in groups:
                whole = fp8.FP8Linear.concat_rows([getattr(attn, n) for n in part_names])
                setattr(attn, fused_name, whole)
                _use_fused_rows(attn, whole, part_names)
        attn.fused_projections = True
        count += 1
    return count


# ---- regional compile -------------------------------------------------------------------------------
def _repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    names = set(
        getattr(transformer, "_repeated_blocks", None)
        or ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    )
    return [m for m in transformer.modules() if type(m).__name__ in names]


def compile_blocks(transformer: nn.Module, *, cuda_graphs: bool = False) -> int:
    """Compile the repeated blocks in place (``nn.Module.compile``) with dynamic shapes, so one graph per
    block class serves every block and every resolution. Kept per mode so switching levels does not
    recompile. Returns the number of blocks compiled."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mode = "reduce-overhead" if cuda_graphs else None
    blocks = _repeated_blocks(transformer)
    for block in blocks:
        saved: dict = block.__dict__.setdefault("_fluxserve_compiled", {})
        if mode not in saved:
            block._compiled_call_impl = None
            block.compile(dynamic=True, mode=mode)
            saved[mode] = block._compiled_call_impl
        block._compiled_call_impl = saved[mode]
    return len(blocks)


def uncompile_blocks(transformer: nn.Module) -> None:
    for block in _repeated_blocks(transformer):
        block._compiled_call_impl = None


def is_compiled(transformer: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in _repeated_blocks(transformer))


GRAPH_CAPTURE_CALLS = 3  # CUDA graph trees warm a shape up, then record it, then replay


def _shape_key(args: tuple, kwargs: dict) -> str:
    """The input shape a CUDA graph is captured for: image (+ reference) tokens, text tokens, batch."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    dims = [tuple(t.shape) for t in (hidden, text) if isinstance(t, torch.Tensor)]
    return " ".join("x".join(str(d) for d in shape) for shape in dims)


def _graphs_for(state: AccelState, transformer: nn.Module, key: str) -> bool:
    """Whether this call runs with CUDA graphs: shapes already captured do, and new shapes while fewer than
    ``cuda_graph_cap`` are captured; beyond the cap a shape runs compiled without graphs, so the graphs'
    memory stays bounded (each captured shape keeps its own static buffers)."""
    graphs = key in state.cuda_graph_shapes or len(state.cuda_graph_shapes) < state.cuda_graph_cap
    compile_blocks(transformer, cuda_graphs=graphs)
    return graphs


def _install_forward_guard(pipe: Any) -> None:
    """Wrap the transformer's forward once: choose CUDA graphs or not for the call's shape and mark a graph
    step, and fall back to eager if a compiled call fails (a compiler or CUDA-graph error must not take the
    server down)."""
    transformer = pipe.transformer
    if getattr(transformer, "_fluxserve_guarded", False):
        return
    original = transformer.forward
    capturing: dict[str, int] = {}  # shape -> calls seen while its graphs are warmed up and recorded

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        state: AccelState | None = getattr(pipe, "_fluxserve_accel", None)
        if state is None or not state.compiled:
            return original(*args, **kwargs)
        capture = None
        if state.cuda_graphs:
            ensure_cudagraph_thread()
            key = _shape_key(args, kwargs)
            if _graphs_for(state, transformer, key):
                torch.compiler.cudagraph_mark_step_begin()
                if key not in state.cuda_graph_shapes:
                    state.cuda_graph_shapes.append(key)
                    capturing[key] = 0
                if key in capturing:  # the first calls of a shape warm up and record its graphs
                    capture = (key, torch.cuda.memory_reserved(state.device))
        try:
            out = original(*args, **kwargs)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            log.warning(
                "compiled transformer failed (%s: %s); falling back to eager", type(exc).__name__, exc
            )
            uncompile_blocks(transformer)
            state.compiled = False
            state.cuda_graphs = False
            state.compile_failed = f"{type(exc).__name__}: {exc}"[:500]
            state.notes.append("torch.compile failed on the first call; running eager")
            return original(*args, **kwargs)
        if capture is not None:
            key, before = capture
            state.cuda_graph_bytes += max(0, torch.cuda.memory_reserved(state.device) - before)
            capturing[key] += 1
            if capturing[key] >= GRAPH_CAPTURE_CALLS:
                del capturing[key]
        return out

    transformer.forward = guarded
    transformer._fluxserve_guarded = True


def ensure_cudagraph_thread() -> None:
    """Give this thread the thread-local state CUDA graph trees keep their managers in. Some PyTorch releases
    (2.11) set it up only on the thread that imported ``torch._inductor.cudagraph_trees`` and fail an assertion
    on any other; later ones set it up per thread, as this does."""
    from torch._inductor import cudagraph_trees as trees

    name = "tree_manager_containers"
    if hasattr(trees.local, name) or torch._C._is_key_in_tls(name):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls(name, trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def set_vae_compiled(pipe: Any, state: AccelState, on: bool) -> None:
    """Compile the VAE decoder (kept, so switching levels does not recompile) or run it eager. A decoder whose
    first compiled call failed stays eager."""
    vae = getattr(pipe, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, nn.Module):
        return
    on = on and state.vae_compile_failed is None and not getattr(vae, "_fluxserve_streamed", False)
    if on:
        if "_fluxserve_compiled" not in decoder.__dict__:
            decoder._compiled_call_impl = None
            decoder.compile()
            decoder._fluxserve_compiled = decoder._compiled_call_impl
        decoder._compiled_call_impl = decoder._fluxserve_compiled
        _install_vae_guard(pipe.vae, state)
    else:
        decoder._compiled_call_impl = None
    state.vae_compiled = on


def _install_vae_guard(vae: nn.Module, state: AccelState) -> None:
    """Wrap ``vae.decode`` once: a compiler error in the decoder falls back to eager for good."""
    if getattr(vae, "_fluxserve_guarded", False):
        return
    original = vae.decode

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        if not state.vae_compiled:
            return original(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            log.warning("compiled VAE decoder failed (%s: %s); falling back to eager", type(exc).__name__, exc)
            vae.decoder._compiled_call_impl = None
            state.vae_compiled = False
            state.vae_compile_failed = f"{type(exc).__name__}: {exc}"[:500]
            state.notes.append("torch.compile of the VAE decoder failed; decoding eager")
            return original(*args, **kwargs)

    vae.decode = guarded
    vae._fluxserve_guarded = True


# ---- prompt-embedding cache -------------------------------------------------------------------------
class PromptCache:
    """LRU of ``encode_prompt`` outputs, bounded by entry count and bytes. Values stay on their device; a hit
    returns the very tensors stored (callers must not modify them in place)."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 2 * 1024**3) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, value: Any) -> None:
        size = _nbytes(value)
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                self.bytes -= self._data.pop(key)[1]
            self._data[key] = (value, size)
            self.bytes += size
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._data.popitem(last=False)
                self.bytes -= dropped

    def clear(self, model_token: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._data if model_token is None or k[0] == model_token]:
                self.bytes -= self._data.pop(key)[1]

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        return {
            "entries": len(self._data),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


_cache_lock = threading.Lock()
_shared_cache: PromptCache | None = None
_model_tokens = itertools.count(1)


def prompt_cache() -> PromptCache:
    """The process-wide prompt cache shared by every model (keys carry the model)."""
    global _shared_cache
    with _cache_lock:
        if _shared_cache is None:
            options = AccelOptions.from_env()
            _shared_cache = PromptCache(options.prompt_cache_entries, options.prompt_cache_bytes)
        return _shared_cache


def install_prompt_cache(pipe: Any, cache: PromptCache | None = None) -> None:
    """Wrap ``pipe.encode_prompt`` with the cache (once). The wrapper consults the cache only while the
    pipe's acceleration state enables it, so level ``none`` runs the text encoder every time."""
    if getattr(pipe, "_fluxserve_prompt_token", None) is not None:
        if cache is not None:
            pipe._fluxserve_prompt_cache = cache
        return
    pipe._fluxserve_prompt_token = next(_model_tokens)
    pipe._fluxserve_prompt_cache = cache
    original = pipe.encode_prompt

    @functools.wraps(original)
    def encode_prompt(
        prompt=None,
        device=None,
        num_images_per_prompt=1,
        prompt_embeds=None,
        max_sequence_length=512,
        text_encoder_out_layers=None,
        **kwargs,
    ):
        call = dict(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
            **kwargs,
        )
        if text_encoder_out_layers is not None:
            call["text_encoder_out_layers"] = text_encoder_out_layers
        state: AccelState | None = getattr(pipe, "_fluxserve_accel", None)
        cacheable = (
            state is not None
            and state.prompt_cache
            and prompt_embeds is None
            and not kwargs
            and (
                isinstance(prompt, str)
                or prompt is None
                or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
            )
        )
        if not cacheable:
            return original(**call)
        store = _cache_of(pipe)
        key = (
            pipe._fluxserve_prompt_token,
            getattr(pipe, "_fluxserve_text_encoder_version", 0),
            tuple(prompt) if isinstance(prompt, list) else prompt,
            int(num_images_per_prompt),
            int(max_sequence_length),
            tuple(text_encoder_out_layers) if text_encoder_out_layers else None,
            str(torch.device(device)) if device is not None else None,
        )
        hit = store.get(key)
        if hit is not None:
            return hit
        value = original(**call)
        store.put(key, value)
        return value

    pipe.encode_prompt = encode_prompt


def _cache_of(pipe: Any) -> PromptCache:
    cache = getattr(pipe, "_fluxserve_prompt_cache", None)
    return cache if cache is not None else prompt_cache()


def invalidate_prompt_cache(pipe: Any) -> None:
    """Forget a model's cached prompts (call after changing its text encoder's weights, e.g. a LoRA)."""
    pipe._fluxserve_text_encoder_version = getattr(pipe, "_fluxserve_text_encoder_version", 0) + 1
    token = getattr(pipe, "_fluxserve_prompt_token", None)
    if token is not None:
        (_cache_of(pipe)).clear(token)


# ---- the state and the entry points -----------------------------------------------------------------
@dataclass
class AccelState:
    requested: str = "none"
    level: str = "none"
    device: str = "cpu"
    fused_qkv: bool = False
    attention: str = "native"  # the backend the attention modules run
    attention_why: str = ""
    attention_figures: dict[str, dict] = field(default_factory=dict)  # backend -> measured figures, or why not
    fp8_attention: bool = False
    fp8_attention_why: str = ""
    compiled: bool = False
    cuda_graphs: bool = False
    cuda_graph_shapes: list[str] = field(default_factory=list)  # shapes captured, oldest first
    cuda_graph_cap: int = 0
    cuda_graph_bytes: int = 0  # GPU memory the captured graphs took (reserved-memory growth while capturing)
    prompt_cache: bool = False
    transformer_precision: str = "bf16"  # bf16 | fp16 | fp32 | fp8-w8a8 | fp8-weight-only
    held_in_fp8: bool = False
    streamed: bool = False
    compile_failed: str | None = None
    vae_compiled: bool = False  # the VAE decoder compiled (regular and high on CUDA)
    vae_compile_failed: str | None = None
    lossless: LosslessState = field(default_factory=LosslessState)  # RoPE cache, text encoder compiled, ...
    block_forward: str = "diffusers"  # diffusers | fluxserve (engine/blocks.py)
    fused_kernels: bool = False  # the fused Triton ops (engine/kernels) in fluxserve's block forwards
    split_projection: bool = False  # the single blocks' in-projection as two GEMMs
    split_measurement: dict | None = None  # the timing that chose it (split.measure_split)
    fp8_fast_accum: bool = False  # _scaled_mm's use_fast_accum (high only)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _dtype_name(module: nn.Module) -> str:
    for p in module.parameters():
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
            p.dtype, str(p.dtype)
        )
    return "unknown"


HELD_IN_FP8 = "transformer held in FP8"


def prepare_transformer(pipe: Any, precision: str, device: torch.device | str | None = None) -> str:
    """Load-time: hold the transformer in ``precision`` ("bf16" keeps it as loaded; "fp8" quantises the
    blocks' Linear layers, if not done yet, and frees their bf16 weights). Returns the precision held."""
    state = _state(pipe, device)
    dev = torch.device(device) if device is not None else _module_device(pipe.transformer)
    if precision == "fp8":
        if not fp8.has_fp8(pipe.transformer):
            quantize_fused_transformer(pipe.transformer, granularity=fp8.default_granularity(dev),
                                       mode="weight_only", keep_original=False)
        if not state.held_in_fp8:
            state.held_in_fp8 = True
            how = ("every level runs FP8 matmuls" if fp8.scaled_mm_supported(dev)
                   else "no FP8 matmuls on this device: every level dequantises the FP8 weights")
            state.notes.append(f"{HELD_IN_FP8}: {how}")
    return "fp8" if fp8.has_fp8(pipe.transformer) else _dtype_name(pipe.transformer)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _state(pipe: Any, device: torch.device | str | None) -> AccelState:
    state = getattr(pipe, "_fluxserve_accel", None)
    if state is None:
        dev = torch.device(device) if device is not None else _module_device(pipe.transformer)
        state = AccelState(device=str(dev))
        pipe._fluxserve_accel = state
    return state


def fp8_copy_bytes(transformer: nn.Module) -> int:
    """Bytes an FP8 copy of the transformer blocks' Linear weights adds beside the bf16 ones (one byte per
    weight plus the row scales), plus the largest single quantisation's working memory."""
    sizes = [(m.out_features, m.in_features) for name, m in transformer.named_modules()
             if type(m) is nn.Linear and fp8.transformer_block_filter(name, m)]
    return sum(o * i + 8 * o for o, i in sizes) + 2 * fp8.QUANTIZE_CHUNK_BYTES


def _fp8_room(transformer: nn.Module, device: torch.device) -> bool:
    """Room on the GPU to add FP8 copies of the block weights beside the bf16 ones, with working memory left
    (``plan.headroom_bytes``), in the GPU memory the plan sees (``memory.free_gpu_bytes``: under the cap)."""
    free, total = memory.free_gpu_bytes(device)
    return free >= fp8_copy_bytes(transformer) + headroom_bytes(total)


def _keep_note(note: str) -> bool:
    return note.startswith((HELD_IN_FP8, "torch.compile failed", "torch.compile of the VAE"))


def apply_acceleration(
    pipe: Any,
    level: str | bool | None,
    device: torch.device | str | None = None,
    options: AccelOptions | None = None,
) -> dict:
    """Put ``pipe`` (a Flux2Pipeline / Flux2KleinPipeline) in acceleration ``level`` on ``device``.

    Idempotent; safe to call before every request. Returns the state as a dict: requested and effective
    level, what is on (fused_qkv, attention, compiled, cuda_graphs, prompt_cache), the transformer's
    precision, and notes explaining any fallback.
    """
    requested = normalise_level(level)
    options = options or AccelOptions.from_env()
    state = _state(pipe, device)
    dev = torch.device(device) if device is not None else torch.device(state.device)
    state.device = str(dev)
    state.requested = requested
    transformer = pipe.transformer
    effective = requested
    notes: list[str] = [n for n in state.notes if _keep_note(n)]
    streamed = bool(getattr(transformer, "_fluxserve_streamed", False))
    state.streamed = streamed
    fp8_matmul = fp8.scaled_mm_supported(dev)

    if effective == "high" and not fp8_matmul:
        effective = "regular"
        notes.append(
            f"high needs FP8 matrix units (CUDA, compute capability >= 8.9); {dev.type} runs regular"
        )
        log.info("acceleration high is not available on %s: running regular", dev)
    if effective == "high" and streamed:
        effective = "regular"
        notes.append("high: the transformer is streamed from host memory (bf16); running regular")
    if effective == "high" and not fp8.has_fp8(transformer):
        if _fp8_room(transformer, dev):
            quantize_fused_transformer(
                transformer, granularity=fp8.default_granularity(dev), mode="weight_only", keep_original=True
            ) if is_fused(transformer) else fp8.quantize_transformer(
                transformer, granularity=fp8.default_granularity(dev), mode="weight_only", keep_original=True
            )
        else:
            effective = "regular"
            notes.append("high: not enough free GPU memory to add FP8 weights beside the bf16 ones; running "
                         "regular (hold the transformer in FP8 with --transformer fp8 to run FP8)")

    _install_lora_guard(pipe)
    lora = has_lora(transformer)
    # 1. fused QKV (lossless); undone for none and whenever LoRA layers are injected. A streamed transformer
    # keeps its layers as the streaming hooks know them.
    if effective == "none" or lora or streamed:
        unfuse_qkv(transformer)
        if lora and effective != "none":
            notes.append("LoRA active: QKV left unfused so the adapters apply")
    elif state.held_in_fp8:
        fuse_fp8_qkv(transformer)
    else:
        fuse_qkv(transformer)
    state.fused_qkv = is_fused(transformer)

    # 2. attention kernel: measured once per GPU and geometry (stock native for none); FP8 attention at high.
    decision = decide(dev, geometry_of(transformer), effective, forced=options.attention,
                      fp8=options.fp8_attention)
    if decision.backend != state.attention or not getattr(pipe, "_fluxserve_attention_set", False):
        state.attention = attention.set_attention_backend(transformer, decision.backend)
        pipe._fluxserve_attention_set = True
    state.attention_why, state.attention_figures = decision.why, decision.figures
    state.fp8_attention = decision.fp8 and state.attention == "fa3_fp8"
    state.fp8_attention_why = decision.fp8_why if state.attention == decision.backend else (
        f"{decision.backend} could not be set; running {state.attention}")

    # 3. FP8 mode of the transformer's quantised layers (if any). Held in FP8: FP8 matmuls at every level
    # where the GPU has them (dequantising the weights at every step would be slower and no more exact).
    if fp8.has_fp8(transformer):
        if effective == "high" or (state.held_in_fp8 and fp8_matmul):
            used = fp8.set_fp8_mode(transformer, "w8a8")
        else:
            used = fp8.set_fp8_mode(transformer, "original")
        state.transformer_precision = {"w8a8": "fp8-w8a8", "weight_only": "fp8-weight-only"}.get(
            used or "", _dtype_name(transformer)
        )
    else:
        state.transformer_precision = _dtype_name(transformer)

    # 3b. fluxserve's block forwards (fused kernels, split in-projection) at regular and high; fast accumulation
    # only ever at high.
    set_block_forwards(transformer, state, effective, dev, options, notes, lora)

    # 4. regional compile (+ CUDA graphs), guarded.
    _install_forward_guard(pipe)
    want_compile = (effective != "none" and not streamed and options.compile_on(dev)
                    and state.compile_failed is None)
    if want_compile:
        graphs = options.cuda_graphs_on(dev)
        compile_blocks(transformer, cuda_graphs=graphs)
        state.compiled, state.cuda_graphs = True, graphs
        state.cuda_graph_cap = options.cuda_graph_shapes if graphs else 0
    else:
        uncompile_blocks(transformer)
        state.compiled, state.cuda_graphs = False, False
        if streamed and effective != "none":
            notes.append("the transformer is streamed from host memory: not compiled")

    # 4b. the VAE decoder compiled too (on an H200 at 1024x1024 it decodes in about a third of the eager time),
    # guarded the same way.
    set_vae_compiled(pipe, state, want_compile)

    # 4c. the lossless savings around the blocks (engine/lossless.py): RoPE tables kept, the text encoder compiled,
    # post-processing on the device, cudnn.benchmark for the VAE.
    lossless.apply(pipe, state.lossless, effective, dev, options.lossless, notes=notes,
                   compile_default=options.compile_on(dev))

    # 5. prompt cache.
    install_prompt_cache(pipe)
    state.prompt_cache = effective != "none" and options.prompt_cache_entries > 0

    state.level = effective
    state.notes = notes
    return state.as_dict()


def set_block_forwards(transformer: nn.Module, state: AccelState, level: str, device: torch.device,
                       options: AccelOptions, notes: list[str], lora: bool) -> None:
    """Stock diffusers block forwards at ``none`` and on a streamed transformer (its hooks move the blocks as
    they are); fluxserve's (``blocks.install``) otherwise, with the fused kernels where they run and the
    in-projection split where it was measured faster. Records the choices and their reasons in ``state``."""
    fast_accum = level == "high" and options.fp8_fast_accum and fp8.has_fp8(transformer)
    fp8.set_fast_accum(transformer, fast_accum)
    state.fp8_fast_accum = fast_accum
    if level == "none" or state.streamed:
        blocks.use_stock(transformer)
        state.block_forward, state.fused_kernels, state.split_projection = "diffusers", False, False
        state.split_measurement = None
        if state.streamed and level != "none":
            notes.append("the transformer is streamed from host memory: its blocks run diffusers' forward")
        return
    reason = kernel_runtime.unavailable_reason(device)
    kernels = options.fused_kernels if options.fused_kernels is not None else reason is None
    if not kernels:
        why = "FLUXSERVE_FUSED_KERNELS=0" if options.fused_kernels is False else reason
        notes.append(f"fused kernels off: {why}")
    elif reason is not None:
        notes.append(f"fused kernels on as torch references: {reason}")
    if kernels and fp8.has_fp8(transformer) and any(layer.granularity != "row" for layer in fp8.fp8_layers(transformer)):
        notes.append("fused FP8 quantisation needs row-wise scales: per-tensor FP8 layers quantise their input "
                     "as before")
    split, figures = split_mod.choose_split(transformer, device, options.split_projection)
    if figures is not None and "error" in figures:
        notes.append(f"split in-projection not timed ({figures['error']}): kept fused")
    if lora:
        notes.append("LoRA active: the double-stream blocks run diffusers' forward (QKV unfused); fused "
                     "FP8 quantisation only where a layer is not wrapped by an adapter")
    blocks.install(transformer, blocks.BlockOptions(state.attention, kernels, split))
    state.block_forward, state.fused_kernels = "fluxserve", kernels
    state.split_projection, state.split_measurement = split, figures


def acceleration_state(pipe: Any) -> dict | None:
    state = getattr(pipe, "_fluxserve_accel", None)
    return state.as_dict() if state is not None else None
