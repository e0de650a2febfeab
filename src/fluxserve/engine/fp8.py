"""FP8 (e4m3) Linear layers for the FLUX.2 transformer, and the memory plan that decides when to use them.

``FP8Linear`` keeps its weight in ``float8_e4m3fn`` with a float32 scale, per output row (``"row"``) or one
per tensor (``"tensor"``), and runs in one of three modes:

* ``"w8a8"``: weights *and* activations in FP8 through ``torch._scaled_mm`` (the activations are quantised
  per token, or per tensor, on the fly). This is the ``high`` acceleration level on Hopper/Ada GPUs.
* ``"weight_only"``: the weight is dequantised to the activation dtype and multiplied in bf16/fp32. Works
  everywhere; used when ``_scaled_mm`` cannot run (CPU, pre-Ada GPUs, odd shapes) and for the lossless levels
  on a model that is held in FP8 only because bf16 did not fit.
* ``"original"``: the bf16 weight that was kept beside the FP8 copy (``keep_original=True``), bit-exact with
  the unquantised layer.

``plan_memory`` is the pure function that decides, from free GPU memory, whether the transformer is held in
bf16 or FP8 and where the text encoder goes; tests feed it numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MODES = ("w8a8", "weight_only", "original")
GRANULARITIES = ("row", "tensor")
_SCALE_FLOOR = 1e-12


# ---- quantisation -----------------------------------------------------------------------------------
def quantize_tensor(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (2-D, rows = output features or tokens) to e4m3.

    Returns ``(q, scale)`` with ``x ~= q.float() * scale``; ``scale`` is float32, shape ``(rows, 1)`` for
    ``"row"`` and ``()`` for ``"tensor"``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    xf = x.float()
    if granularity == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=_SCALE_FLOOR)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
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
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.granularity = granularity
        self.compute_dtype = linear.weight.dtype
        with torch.no_grad():
            q, scale = quantize_tensor(linear.weight.detach(), granularity)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        # _scaled_mm wants mat_b column-major: (in, out) with stride (1, in), which is weight.t() as stored.
        self.register_buffer("weight_scale_row", scale.reshape(1, -1) if granularity == "row" else scale)
        self.bias = linear.bias
        self.original = linear.weight if keep_original else None
        # _scaled_mm needs both matrix dimensions divisible by 16.
        self.mm_shapes_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.mode = "weight_only"
        self.set_mode(mode)

    def slice_rows(self, start: int, stop: int) -> FP8Linear:
        """A layer computing output features ``start:stop`` that shares this layer's FP8 storage (used for
        the per-projection views of a fused QKV projection)."""
        part = FP8Linear.__new__(FP8Linear)
        nn.Module.__init__(part)
        part.in_features = self.in_features
        part.out_features = stop - start
        part.granularity = self.granularity
        part.compute_dtype = self.compute_dtype
        part.register_buffer("weight_fp8", self.weight_fp8[start:stop])
        row = self.granularity == "row"
        part.register_buffer(
            "weight_scale", self.weight_scale[start:stop].clone() if row else self.weight_scale
        )
        part.register_buffer(
            "weight_scale_row", self.weight_scale_row[:, start:stop].clone() if row else self.weight_scale_row
        )
        part.bias = (
            None if self.bias is None else nn.Parameter(self.bias.data[start:stop], requires_grad=False)
        )
        part.original = (
            None
            if self.original is None
            else nn.Parameter(self.original.data[start:stop], requires_grad=False)
        )
        part.mm_shapes_ok = part.in_features % 16 == 0 and part.out_features % 16 == 0
        part.mode = "weight_only"
        part.set_mode(self.mode)
        return part

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
        x2 = x.reshape(-1, shape[-1])
        xq, x_scale = quantize_tensor(x2, self.granularity)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        if self.granularity == "row" and out_dtype != torch.bfloat16:
            out_dtype_mm = torch.bfloat16  # row-wise scaling requires bf16 output on CUDA
        else:
            out_dtype_mm = out_dtype
        y = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale_row, out_dtype=out_dtype_mm
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(out_dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"granularity={self.granularity}, mode={self.mode}, kept_original={self.original is not None}"
        )


def _default_filter(name: str, module: nn.Linear) -> bool:
    return True


def quantize_linears(
    root: nn.Module,
    *,
    include: Callable[[str, nn.Linear], bool] | None = None,
    granularity: str = "row",
    mode: str = "weight_only",
    keep_original: bool = False,
) -> int:
    """Replace every ``nn.Linear`` under ``root`` that ``include(name, module)`` accepts with an
    ``FP8Linear``; return how many were replaced. Already-quantised layers are left alone."""
    include = include or _default_filter
    targets: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for parent_name, parent in root.named_modules():
        if isinstance(parent, FP8Linear):
            continue
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if include(full, child):
                    targets.append((parent, child_name, full, child))
    for parent, child_name, _full, child in targets:
        setattr(
            parent,
            child_name,
            FP8Linear(child, granularity=granularity, mode=mode, keep_original=keep_original),
        )
    if targets and root_device_is_cuda(root):
        torch.cuda.empty_cache()
    return len(targets)


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
) -> int:
    return quantize_linears(
        transformer,
        include=transformer_block_filter,
        granularity=granularity,
        mode=mode,
        keep_original=keep_original,
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


def has_fp8(root: nn.Module) -> bool:
    return any(True for _ in fp8_layers(root))


def has_original_weights(root: nn.Module) -> bool:
    layers = list(fp8_layers(root))
    return bool(layers) and all(layer.original is not None for layer in layers)


# ---- memory plan ------------------------------------------------------------------------------------
GiB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    transformer: str  # "bf16" | "fp8"
    text_encoder: str  # "resident" | "fp8" | "offload"
    needed_bytes: int
    free_bytes: int

    def as_dict(self) -> dict:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "needed_gib": round(self.needed_bytes / GiB, 2),
            "free_gib": round(self.free_bytes / GiB, 2),
        }


# Tried in order: everything resident in bf16 is the reference; the text encoder goes to FP8 before the
# transformer does (it runs once per prompt and the prompt cache hides it); the transformer goes to FP8 before
# anything is offloaded (offloading the transformer costs a weight transfer per step).
TEXT_ENCODER_CHOICES = ("auto", "resident", "fp8", "offload")
PLAN_ORDER: tuple[tuple[str, str], ...] = (
    ("bf16", "resident"),
    ("bf16", "fp8"),
    ("fp8", "fp8"),
    ("fp8", "offload"),
)


def plan_memory(
    *,
    free_bytes: int,
    transformer_bytes: int,
    text_encoder_bytes: int,
    vae_bytes: int = 0,
    reserve_bytes: int = 6 * GiB,
    text_encoder_choice: str = "auto",
    transformer_fp8_bytes: int | None = None,
    text_encoder_fp8_bytes: int | None = None,
) -> MemoryPlan:
    """Choose the transformer precision and the text-encoder placement for one model on one GPU.

    ``transformer_bytes`` and ``text_encoder_bytes`` are the bf16 sizes; FP8 halves them. ``reserve_bytes``
    is kept free for activations, attention workspaces and the VAE decode (which is always resident).
    ``text_encoder_choice`` forces the text encoder ("resident" | "fp8" | "offload"); "auto" picks.
    Nothing fits -> the last candidate (FP8 transformer, offloaded text encoder), the smallest footprint.
    ``transformer_fp8_bytes`` / ``text_encoder_fp8_bytes``: the exact FP8 footprints when the caller counted
    them (only the Linear weights become FP8; embeddings, norms and the output head stay bf16); half the bf16
    bytes otherwise.
    """
    if text_encoder_choice not in TEXT_ENCODER_CHOICES:
        raise ValueError(
            f"text encoder placement {text_encoder_choice!r}: choose one of {', '.join(TEXT_ENCODER_CHOICES)}"
        )
    transformer_fp8 = transformer_bytes // 2 if transformer_fp8_bytes is None else transformer_fp8_bytes
    text_encoder_fp8 = text_encoder_bytes // 2 if text_encoder_fp8_bytes is None else text_encoder_fp8_bytes
    sizes = {"bf16": transformer_bytes, "fp8": transformer_fp8}
    te_sizes = {"resident": text_encoder_bytes, "fp8": text_encoder_fp8, "offload": 0}
    if text_encoder_choice == "auto":
        candidates = list(PLAN_ORDER)
    else:
        candidates = [("bf16", text_encoder_choice), ("fp8", text_encoder_choice)]
    for transformer, text_encoder in candidates:
        needed = sizes[transformer] + te_sizes[text_encoder] + vae_bytes + reserve_bytes
        if needed <= free_bytes:
            return MemoryPlan(transformer, text_encoder, needed, free_bytes)
    transformer, text_encoder = candidates[-1]
    needed = sizes[transformer] + te_sizes[text_encoder] + vae_bytes + reserve_bytes
    return MemoryPlan(transformer, text_encoder, needed, free_bytes)



def fp8_footprint(bf16_bytes: int, linear_shapes: Iterable[tuple[int, int]], element_size: int = 2) -> int:
    """Bytes of a module after its Linears of ``linear_shapes`` ((out, in) each) are held in FP8 with row
    scales: one byte per weight plus two float32 scales per output row, instead of ``element_size`` bytes."""
    total = bf16_bytes
    for out_features, in_features in linear_shapes:
        total -= out_features * in_features * (element_size - 1)
        total += 8 * out_features
    return total
