"""Lossless savings around the compiled transformer blocks, on at ``regular`` and ``high``, never at ``none``.

Each one computes what the stock code computes; the acceleration state (``AccelState.lossless``) says which ran,
and an environment variable (auto|1|0) turns each one off to measure it:

* ``FLUXSERVE_ROPE_CACHE``: the transformer's rotary tables (``Flux2PosEmbed``, about 30 small float64 ops per
  id grid, eager at every step) are kept per ids tensor (``RopeCache``): bit-identical, they are the very tensors
  the first step computed.
* ``FLUXSERVE_TEXT_ENCODER_COMPILE``: the text encoder's decoder compiled for the prompt encoding (fixed 512
  tokens), one graph for all its layers; auto: wherever the transformer compiles (CUDA). Not for a text encoder
  held in FP8 or streamed. Guarded: a compiler error falls back to eager for good and the state says so. Same
  function, rounding order aside.
* ``FLUXSERVE_DEVICE_POSTPROCESS``: ``VaeImageProcessor.postprocess(image, "pil")`` done on the VAE's device
  (``to_pil``): the same operations in the same dtypes, then uint8 pixels cross to the host instead of floats.
  Bit-identical pixels.
* ``FLUXSERVE_VAE_CUDNN_BENCHMARK``: ``torch.backends.cudnn.benchmark`` on while the VAE decodes (CUDA), so cuDNN
  times its convolution algorithms once per shape and keeps the fastest; the previous value is restored after.
  Same function; another algorithm may round differently.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from fluxserve.engine import fp8
from fluxserve.engine.compile_errors import is_compile_failure
from fluxserve.engine.switches import env_switch

ROPE_CACHE_ENTRIES = 4  # a request uses two (image and text ids); a 2048x2048 image's tables are 16 MiB
TEXT_ENCODER_COMPILE_FAILED = "torch.compile of the text encoder failed"


@dataclass
class LosslessOptions:
    """None = auto (see the module's docstring), True / False = on / off at ``regular`` and ``high``."""

    rope_cache: bool | None = None
    text_encoder_compile: bool | None = None
    device_postprocess: bool | None = None
    vae_cudnn_benchmark: bool | None = None

    @classmethod
    def from_env(cls) -> LosslessOptions:
        return cls(
            rope_cache=env_switch("FLUXSERVE_ROPE_CACHE"),
            text_encoder_compile=env_switch("FLUXSERVE_TEXT_ENCODER_COMPILE"),
            device_postprocess=env_switch("FLUXSERVE_DEVICE_POSTPROCESS"),
            vae_cudnn_benchmark=env_switch("FLUXSERVE_VAE_CUDNN_BENCHMARK"),
        )


@dataclass
class LosslessState:
    """What ran at the last ``apply`` (JSON-able through ``dataclasses.asdict``)."""

    rope_cache: bool = False
    text_encoder_compiled: bool = False
    text_encoder_compile_failed: str | None = None
    device_postprocess: bool = False
    vae_cudnn_benchmark: bool = False


def apply(pipe: Any, state: LosslessState, level: str, device: torch.device, options: LosslessOptions,
          *, compile_default: bool, notes: list[str]) -> None:
    """Switch every saving on (``level`` regular or high) or off (``none``) for ``pipe``, as ``options`` allow.
    ``compile_default``: whether the text encoder compiles when its option is auto (where the transformer does).
    Idempotent and cheap when nothing changes; notes say why a saving that was asked for is not on."""
    on = level != "none"
    pipe._fluxserve_lossless = state
    transformer = getattr(pipe, "transformer", None)
    state.rope_cache = transformer is not None and set_rope_cache(transformer, on and options.rope_cache is not False)
    want = options.text_encoder_compile if options.text_encoder_compile is not None else compile_default
    set_text_encoder_compiled(pipe, state, on and want, notes)
    state.device_postprocess = on and options.device_postprocess is not False
    state.vae_cudnn_benchmark = on and device.type == "cuda" and options.vae_cudnn_benchmark is not False


def state_of(pipe: Any) -> LosslessState | None:
    """The pipe's state as the last ``apply`` left it (None before any)."""
    return getattr(pipe, "_fluxserve_lossless", None)


# ---- 1. rotary tables kept per ids tensor ---------------------------------------------------------------------------
class RopeCache:
    """``Flux2PosEmbed`` outputs kept per ids tensor, bounded (least recently used entries go first).

    Invariant: a call gets a kept result only if its ids are the very memory the result was computed from,
    unmodified since. An entry holds its ids tensor, so that memory cannot be freed and reused by another tensor
    while the entry lives; a call matches an entry on the ids' address, shape, strides, dtype and device, and on
    PyTorch's version counter (shared by views, bumped by every in-place write). Two different id grids never
    share an entry, even with the same length (a 1024x512 and a 512x1024 image), and nothing is compared on the
    device, so there is no synchronisation. The transformer takes a view ``ids[0]`` of the pipeline's batched ids
    at every step: the same memory, so every step after the first hits. A new request makes new ids and computes
    its tables once. Inference-mode tensors (no version counter) and calls being traced by the compiler are not
    kept.
    """

    def __init__(self, max_entries: int = ROPE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, int, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, ids: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        key = _memory_key(ids)
        if key is None:
            return compute(ids)
        version = ids._version
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] == version:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[2]
        value = compute(ids)
        with self._lock:
            self.misses += 1
            self._entries[key] = (ids, version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _memory_key(ids: torch.Tensor) -> tuple | None:
    if torch.compiler.is_compiling() or ids.is_inference() or ids.device.type == "meta":
        return None
    return (ids.data_ptr(), tuple(ids.shape), ids.stride(), ids.dtype, str(ids.device))


def set_rope_cache(transformer: nn.Module, on: bool) -> bool:
    """Keep the rotary tables of ``transformer.pos_embed`` (a diffusers ``Flux2PosEmbed``) per ids tensor, or
    compute them at every call (``on`` False: the stock module, and the kept tables are let go). Returns whether
    the cache is on (False for a transformer without a ``Flux2PosEmbed``)."""
    pos_embed = getattr(transformer, "pos_embed", None)
    if type(pos_embed).__name__ != "Flux2PosEmbed":
        return False
    cache: RopeCache | None = getattr(pos_embed, "_fluxserve_rope_cache", None)
    if cache is None:
        if not on:
            return False
        cache = RopeCache()
        original = pos_embed.forward

        @functools.wraps(original)
        def forward(ids: torch.Tensor):
            if pos_embed._fluxserve_rope_cache_on:
                return cache.get(ids, original)
            return original(ids)

        pos_embed.forward = forward
        pos_embed._fluxserve_rope_cache = cache
    pos_embed._fluxserve_rope_cache_on = on
    if not on:
        cache.clear()
    return on


def rope_cache_of(transformer: nn.Module) -> RopeCache | None:
    return getattr(getattr(transformer, "pos_embed", None), "_fluxserve_rope_cache", None)


# ---- 2. the text encoder compiled for prompt encoding ---------------------------------------------------------------
def text_decoder(text_encoder: nn.Module | None) -> nn.Module | None:
    """The decoder stack of a causal-LM text encoder (Qwen3's ``model``, Mistral3's ``language_model``): what is
    compiled. None when there is none."""
    get_decoder = getattr(text_encoder, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and isinstance(getattr(decoder, "layers", None),
                                                                    nn.ModuleList) else None


def set_text_encoder_compiled(pipe: Any, state: LosslessState, on: bool, notes: list[str]) -> None:
    """Compile the text encoder's decoder (once, kept; static shapes: prompts are padded to a fixed length) and use
    it for prompt encoding, or run it eager. The compiled decoder runs only inside an encoding call (``use_cache``
    False, hidden states asked for), never for prompt expansion (``generate``), whose growing sequence and cache
    would recompile it. One graph serves every layer and every prompt of that length. A decoder whose compiled
    call failed, a streamed text encoder and one held in FP8 stay eager."""
    text_encoder = getattr(pipe, "text_encoder", None)
    decoder = text_decoder(text_encoder)
    if decoder is None:
        state.text_encoder_compiled = False
        return
    if on and getattr(text_encoder, "_fluxserve_streamed", False):  # placement.is_streamed, without the import
        notes.append("the text encoder is streamed from host memory: not compiled")
        on = False
    if on and fp8.has_fp8(text_encoder):
        notes.append("the text encoder is held in FP8: not compiled")
        on = False
    if on and state.text_encoder_compile_failed is not None:
        notes.append(f"{TEXT_ENCODER_COMPILE_FAILED} on its first call; encoding eager")
        on = False
    if on and "_fluxserve_compiled" not in decoder.__dict__:
        decoder._compiled_call_impl = None
        decoder.compile(dynamic=False)
        decoder._fluxserve_compiled = decoder._compiled_call_impl
        decoder._compiled_call_impl = None  # only inside encoding calls (the guard)
    if on:
        _install_text_encoder_guard(text_encoder, decoder, state)
    state.text_encoder_compiled = on


def is_encoding_call(kwargs: dict) -> bool:
    """The call the pipelines' prompt encoding makes (``use_cache=False``, ``output_hidden_states=True``), not a
    generation step."""
    return kwargs.get("use_cache") is False and bool(kwargs.get("output_hidden_states")) \
        and kwargs.get("past_key_values") is None and kwargs.get("cache") is None


def _install_text_encoder_guard(text_encoder: nn.Module, decoder: nn.Module, state: LosslessState) -> None:
    """Wrap ``text_encoder.forward`` once: an encoding call runs the compiled decoder, and a compiler error in it
    falls back to eager for good."""
    if getattr(text_encoder, "_fluxserve_compile_guard", False):
        return
    original = text_encoder.forward

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        compiled = getattr(decoder, "_fluxserve_compiled", None)
        if not (state.text_encoder_compiled and compiled is not None and is_encoding_call(kwargs)):
            return original(*args, **kwargs)
        decoder._compiled_call_impl = compiled
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            decoder._compiled_call_impl = None
            state.text_encoder_compiled = False
            state.text_encoder_compile_failed = f"{type(exc).__name__}: {exc}"[:500]
            return original(*args, **kwargs)
        finally:
            decoder._compiled_call_impl = None

    text_encoder.forward = guarded
    text_encoder._fluxserve_compile_guard = True


# ---- 3. post-processing on the device --------------------------------------------------------------------------------
def to_pil(processor: Any, image: torch.Tensor) -> list[Image.Image]:
    """``processor.postprocess(image, output_type="pil")`` (diffusers' ``VaeImageProcessor``), bit-identical, with
    the arithmetic done where ``image`` is and uint8 pixels copied to the host.

    The stock path: ``denormalize`` ((x * 0.5 + 0.5).clamp(0, 1), in the tensor's dtype, on its device), then
    ``.cpu().permute(0, 2, 3, 1).float().numpy()``, then numpy's ``(x * 255).round().astype("uint8")``. Here: the
    same ``denormalize`` on the device, the same exact float32 conversion, the same IEEE float32 product, the
    same round-half-to-even, and the cast of integers in [0, 255] (exact) on the device. NaN becomes 0, as the
    stock cast gives on x86 and ARM. A processor that does not normalise (unclamped values, whose uint8 cast the
    stock path leaves undefined) goes the stock way.
    """
    config = getattr(processor, "config", None)
    if not getattr(config, "do_normalize", False) or image.ndim != 4:
        return processor.postprocess(image, output_type="pil")
    pixels = processor.denormalize(image).permute(0, 2, 3, 1).float()
    pixels = torch.nan_to_num((pixels * 255).round(), nan=0.0).to(torch.uint8).contiguous().cpu().numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(one.squeeze(), mode="L") for one in pixels]
    return [Image.fromarray(one) for one in pixels]


def postprocess(pipe: Any, image: torch.Tensor) -> list[Image.Image]:
    """The pipe's ``image_processor.postprocess(image, "pil")``, on the device when its state has it on."""
    state = state_of(pipe)
    if state is not None and state.device_postprocess:
        return to_pil(pipe.image_processor, image)
    return pipe.image_processor.postprocess(image, output_type="pil")


# ---- 4. cudnn.benchmark while the VAE decodes ------------------------------------------------------------------------
_benchmark_lock = threading.Lock()
_benchmark_users = 0
_benchmark_saved = False


@contextmanager
def cudnn_benchmark(on: bool = True) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` True inside (when ``on``), the previous value restored when the last
    user leaves (threads of several engines may decode at once: the flag is process-wide)."""
    global _benchmark_users, _benchmark_saved
    if not on:
        yield
        return
    with _benchmark_lock:
        if _benchmark_users == 0:
            _benchmark_saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        _benchmark_users += 1
    try:
        yield
    finally:
        with _benchmark_lock:
            _benchmark_users -= 1
            if _benchmark_users == 0:
                torch.backends.cudnn.benchmark = _benchmark_saved


def vae_decoding(pipe: Any, device: torch.device) -> Any:
    """The context the VAE decodes in: cuDNN's benchmark mode when the pipe's state has it on and ``device`` is a
    CUDA device."""
    state = state_of(pipe)
    return cudnn_benchmark(bool(state is not None and state.vae_cudnn_benchmark and device.type == "cuda"))
