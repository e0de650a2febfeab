"""FP8 (e4m3) Linear layers for the FLUX.2 transformer and text encoder.

``FP8Linear`` keeps its weight in ``float8_e4m3fn`` with a float32 scale, per output row (``"row"``) or one
per tensor (``"tensor"``), and runs in one of three modes:

* ``"w8a8"``: weights *and* activations in FP8 through ``torch._scaled_mm`` (the activations are quantised
  per token, or per tensor, on the fly). This is the ``high`` acceleration level on Hopper/Ada GPUs.
* ``"weight_only"``: the weight is dequantised to the activation dtype and multiplied in bf16/fp32. Works
  everywhere; used when ``_scaled_mm`` cannot run (CPU, pre-Ada GPUs, odd shapes) and for the lossless levels
  on a model that is held in FP8 only because bf16 did not fit.
* ``"original"``: the bf16 weight that was kept beside the FP8 copy (``keep_original=True``), bit-exact with
  the unquantised layer.

Weights are quantised a block of rows at a time (``quantize_weight``) and each full-precision weight is let
go as soon as its FP8 copy exists (``quantize_linears``), so converting a model on a nearly full GPU needs
little more than the FP8 model plus one layer.

Which components are held in FP8 is decided by the memory plan (``fluxserve.engine.plan``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MODES = ("w8a8", "weight_only", "original")
GRANULARITIES = ("row", "tensor")
SCALE_FLOOR = 1e-12


# ---- quantisation -----------------------------------------------------------------------------------
# float32 bytes of the block of weight rows that ``quantize_weight`` works on at a time: converting FLUX.2
# [dev]'s largest Linear (55296 x 6144 bf16, 0.68 GB) in one piece would take ~4 GB of float32 temporaries.
QUANTIZE_CHUNK_BYTES = 64 * 1024**2


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")


def quantize_tensor(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (2-D, rows = output features or tokens) to e4m3 in one piece.

    Returns ``(q, scale)`` with ``x ~= q.float() * scale``; ``scale`` is float32, shape ``(rows, 1)`` for
    ``"row"`` and ``()`` for ``"tensor"``. This is the path for activations (small, quantised every forward,
    fused by ``torch.compile``); whole weights go through ``quantize_weight``.
    """
    _check_granularity(granularity)
    xf = x.float()
    if granularity == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32)


def quantize_weight(
    w: torch.Tensor, granularity: str = "row", chunk_bytes: int = QUANTIZE_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to e4m3 a block of rows at a time; the result is bit-identical to
    ``quantize_tensor``.

    The extra memory is about two float32 blocks of at most ``chunk_bytes`` each, whatever the weight's size,
    so a weight can be converted on a GPU that is nearly full. For ``"tensor"`` the global amax is found
    block by block first.
    """
    _check_granularity(granularity)
    rows, cols = w.shape
    step = max(1, chunk_bytes // max(1, cols * 4))
    if rows <= step:
        return quantize_tensor(w, granularity)
    blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    if granularity == "row":
        scale = torch.empty((rows, 1), dtype=torch.float32, device=w.device)
    else:
        amax = None
        for start, stop in blocks:
            part = w[start:stop].float().abs().amax()
            amax = part if amax is None else torch.maximum(amax, part)
        scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)
    for start, stop in blocks:
        xf = w[start:stop].float()
        if granularity == "row":
            block_scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=SCALE_FLOOR)
            scale[start:stop] = block_scale
        else:
            block_scale = scale
        scaled = xf / block_scale
        del xf
        q[start:stop] = scaled.clamp_(-FP8_MAX, FP8_MAX)
        del scaled
    return q, scale.to(torch.float32)


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def scaled_mm_supported(device: torch.device | str | None) -> bool:
    """True where ``torch._scaled_mm`` runs FP8 x FP8 on the tensor cores: CUDA with compute capability
    8.9 (Ada) or 9.x+ (Hopper and later)."""
    if not hasattr(torch, "_scaled_mm") or device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


def default_granularity(device: torch.device | str | None) -> str:
    """Row-wise scales on Hopper+ (better accuracy, supported by ``_scaled_mm`` there), per tensor on Ada."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "row" if major >= 9 else "tensor"
    return "row"


class FP8Linear(nn.Module):
    """A ``Linear`` whose weight is stored in FP8 (see the module docstring for the modes)."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        granularity: str = "row",
        mode: str = "weight_only",
        keep_original: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        with torch.no_grad():
            q, scale = quantize_weight(linear.weight.detach(), granularity)
        self._set_tensors(
            in_features=linear.in_features,
            granularity=granularity,
            compute_dtype=linear.weight.dtype,
            weight_fp8=q,
            weight_scale=scale,
            bias=linear.bias,
            original=linear.weight if keep_original else None,
            mode=mode,
        )

    def _set_tensors(
        self,
        *,
        in_features: int,
        granularity: str,
        compute_dtype: torch.dtype,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        original: torch.Tensor | None,
        mode: str,
    ) -> None:
        self.in_features = in_features
        self.out_features = weight_fp8.shape[0]
        self.granularity = granularity
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        # _scaled_mm wants mat_b column-major: (in, out) with stride (1, in), which is weight.t() as stored.
        row = granularity == "row"
        self.register_buffer("weight_scale_row", weight_scale.reshape(1, -1) if row else weight_scale)
        self.bias = _parameter(bias)
        self.original = _parameter(original)
        # _scaled_mm needs both matrix dimensions divisible by 16.
        self.mm_shapes_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.fast_accum = False
        self.mode = "weight_only"
        self.set_mode(mode)

    @classmethod
    def _assemble(cls, **fields: Any) -> FP8Linear:
        """A layer from FP8 tensors that exist already (slices or concatenations of other layers)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_tensors(**fields)
        return layer

    def slice_rows(self, start: int, stop: int) -> FP8Linear:
        """A layer computing output features ``start:stop`` that shares this layer's FP8 storage (used for
        the per-projection views of a fused QKV projection)."""
        row = self.granularity == "row"
        return FP8Linear._assemble(
            in_features=self.in_features,
            granularity=self.granularity,
            compute_dtype=self.compute_dtype,
            weight_fp8=self.weight_fp8[start:stop],
            weight_scale=self.weight_scale[start:stop].clone() if row else self.weight_scale,
            bias=None if self.bias is None else self.bias.data[start:stop],
            original=None if self.original is None else self.original.data[start:stop],
            mode=self.mode,
        )

    @classmethod
    def concat_rows(cls, layers: Sequence[FP8Linear]) -> FP8Linear:
        """One layer computing the outputs of ``layers`` (same input, row-wise scales) one after the other,
        e.g. a fused QKV projection from Q, K and V. Exactly the same computation: each output row keeps its
        FP8 values and its scale, and activations are quantised per token of the shared input.

        Where the layers are already consecutive rows of one storage (the slices of a layer fused before),
        the fused weight is a view of it and nothing is copied; otherwise the weights are concatenated.
        """
        first = layers[0]
        if any(layer.granularity != "row" for layer in layers):
            raise ValueError("only layers with row-wise scales can be concatenated")
        if any(layer.in_features != first.in_features for layer in layers):
            raise ValueError("layers with different inputs cannot be concatenated")
        if len({layer.bias is None for layer in layers}) > 1:
            raise ValueError("either all layers or none have a bias")
        if len({layer.original is None for layer in layers}) > 1:
            raise ValueError("either all layers or none keep their original weight")
        return cls._assemble(
            in_features=first.in_features,
            granularity="row",
            compute_dtype=first.compute_dtype,
            weight_fp8=_join_rows([layer.weight_fp8 for layer in layers]),
            weight_scale=torch.cat([layer.weight_scale for layer in layers]),
            bias=None if first.bias is None else _join_rows([layer.bias.data for layer in layers]),
            original=None if first.original is None else _join_rows([layer.original.data for layer in layers]),
            mode=first.mode,
        )

    def set_mode(self, mode: str) -> str:
        """Switch mode; returns the mode actually used (``"original"`` needs a kept weight, ``"w8a8"``
        needs shapes that ``_scaled_mm`` accepts)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "original" and self.original is None:
            mode = "weight_only"
        if mode == "w8a8" and not self.mm_shapes_ok:
            mode = "weight_only"
        self.mode = mode
        return mode

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads ``.weight`` of a Linear, e.g. dtype checks)."""
        if self.original is not None:
            return self.original
        return dequantize_tensor(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "original":
            return F.linear(x, self.original, self.bias)
        if self.mode == "weight_only":
            w = dequantize_tensor(self.weight_fp8, self.weight_scale, x.dtype)
            return F.linear(x, w, self.bias)
        return self._forward_w8a8(x)

    def _forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = quantize_tensor(x.reshape(-1, shape[-1]), self.granularity)
        return self.forward_quantized(xq, x_scale, shape[:-1], x.dtype)

    def forward_quantized(
        self,
        xq: torch.Tensor,
        x_scale: torch.Tensor,
        lead_shape: Sequence[int],
        dtype: torch.dtype,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The w8a8 product for an input quantised already: ``xq`` (tokens, in) float8_e4m3fn and ``x_scale``
        as ``quantize_tensor(x, self.granularity)`` gives them (a fused kernel may have written both). Returns
        ``(*lead_shape, out)`` in ``dtype`` (the input's dtype), exactly what ``forward`` returns for that ``x``.
        ``rows=(start, stop)`` computes only those output features, on views of the weight rows (no copy).
        ``fast_accum`` (off unless the ``high`` level turns it on) is ``_scaled_mm``'s ``use_fast_accum``."""
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        if self.granularity == "row" and out_dtype != torch.bfloat16:
            out_dtype_mm = torch.bfloat16  # row-wise scaling requires bf16 output on CUDA
        else:
            out_dtype_mm = out_dtype
        weight, weight_scale, bias = self.weight_fp8, self.weight_scale_row, self.bias
        if rows is not None:
            start, stop = rows
            weight = weight[start:stop]
            weight_scale = weight_scale[:, start:stop] if self.granularity == "row" else weight_scale
            bias = None if bias is None else bias[start:stop]
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype_mm,
                             use_fast_accum=self.fast_accum)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(out_dtype).reshape(*lead_shape, weight.shape[0])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"granularity={self.granularity}, mode={self.mode}, kept_original={self.original is not None}"
        )


def _parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A frozen Parameter holding ``tensor`` (kept as it is when it is a Parameter already)."""
    if tensor is None or isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)


def _join_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)``, or a view without a copy when they are consecutive rows of one storage."""
    first = tensors[0]
    offset = first.storage_offset()
    for tensor in tensors:
        same_storage = tensor.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same_storage and tensor.is_contiguous() and tensor.storage_offset() == offset):
            return torch.cat(tensors)
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _default_filter(name: str, module: nn.Linear) -> bool:
    return True


def quantize_linears(
    root: nn.Module,
    *,
    include: Callable[[str, nn.Linear], bool] | None = None,
    granularity: str = "row",
    mode: str = "weight_only",
    keep_original: bool = False,
    on_layer: Callable[[str], None] | None = None,
) -> int:
    """Replace every ``nn.Linear`` under ``root`` that ``include(name, module)`` accepts with an
    ``FP8Linear``; return how many were replaced. Already-quantised layers are left alone.

    Layers are converted one at a time and each full-precision weight is let go as soon as its FP8 copy
    exists (unless ``keep_original`` keeps it, or something else holds it), so the conversion needs the FP8
    model plus one layer, never the two models side by side. ``on_layer(name)``, when given, is called after
    each layer is converted (progress reporting).
    """
    targets = _linear_targets(root, include or _default_filter)
    for parent, child_name, full in targets:
        linear = getattr(parent, child_name)
        layer = FP8Linear(linear, granularity=granularity, mode=mode, keep_original=keep_original)
        setattr(parent, child_name, layer)
        del linear, layer
        if on_layer is not None:
            on_layer(full)
    if targets and root_device_is_cuda(root):
        torch.cuda.empty_cache()
    return len(targets)


def _linear_targets(
    root: nn.Module, include: Callable[[str, nn.Linear], bool]
) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of each Linear to convert; no reference to the Linear itself is kept,
    so its weight can be freed as soon as it is replaced."""
    targets: list[tuple[nn.Module, str, str]] = []
    for parent_name, parent in root.named_modules():
        if isinstance(parent, FP8Linear):
            continue
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if include(full, child):
                    targets.append((parent, child_name, full))
    return targets


def root_device_is_cuda(root: nn.Module) -> bool:
    for tensor in root.buffers():
        return tensor.device.type == "cuda"
    return False


def transformer_block_filter(name: str, module: nn.Linear) -> bool:
    """Quantise the Linear layers inside the repeated transformer blocks (where ~97% of the FLOPs are);
    keep the embedders, the modulation and the final projection in bf16."""
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def quantize_transformer(
    transformer: nn.Module,
    *,
    granularity: str = "row",
    mode: str = "weight_only",
    keep_original: bool = False,
    on_layer: Callable[[str], None] | None = None,
) -> int:
    """FP8-quantise the Linears of the transformer blocks (``quantize_linears`` with
    ``transformer_block_filter``)."""
    return quantize_linears(
        transformer,
        include=transformer_block_filter,
        granularity=granularity,
        mode=mode,
        keep_original=keep_original,
        on_layer=on_layer,
    )


def fp8_layers(root: nn.Module) -> Iterable[FP8Linear]:
    return (m for m in root.modules() if isinstance(m, FP8Linear))


def set_fp8_mode(root: nn.Module, mode: str) -> str | None:
    """Set every FP8Linear's mode; returns the mode most layers ended in (None when there are none)."""
    counts: dict[str, int] = {}
    for layer in fp8_layers(root):
        used = layer.set_mode(mode)
        counts[used] = counts.get(used, 0) + 1
    return max(counts, key=counts.get) if counts else None


def set_fast_accum(root: nn.Module, on: bool) -> None:
    """Turn ``_scaled_mm``'s fast accumulation on or off for every FP8Linear under ``root`` (lossy: only ever
    at ``high``)."""
    for layer in fp8_layers(root):
        layer.fast_accum = bool(on)


def has_fp8(root: nn.Module) -> bool:
    return any(True for _ in fp8_layers(root))
