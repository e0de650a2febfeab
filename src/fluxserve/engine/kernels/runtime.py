"""Where the fused kernels run: Triton on CUDA, Triton's interpreter on the CPU (tests), else torch.

Triton decides when a kernel is *defined* (``@triton.jit`` at import time) whether it is compiled for the GPU
or interpreted on the CPU (``TRITON_INTERPRET=1``), so the choice is fixed for the process once the kernel
modules are imported: ``INTERPRETED`` records it. A process that wants the interpreter sets the variable before
importing ``fluxserve.engine.kernels``.
"""

from __future__ import annotations

import logging
import os

import torch

from fluxserve.engine.fp8 import FP8_DTYPE, FP8_MAX, SCALE_FLOOR

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # a CPU-only install without Triton: the torch references run instead
    triton = None
    tl = None
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None

log = logging.getLogger(__name__)

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0").strip() in ("1", "true", "on")


def jit(fn):
    """``triton.jit`` where Triton imports; the plain function otherwise (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


_failure: str | None = None  # why a kernel failed to compile or launch here; the torch references run since


def record_failure(exc: BaseException) -> None:
    """A kernel failed (a Triton release that cannot compile it, say): log it once and run the torch references
    from now on, so a request is served (slower) instead of failing; ``unavailable_reason`` reports it."""
    global _failure
    if _failure is None:
        _failure = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("a fused Triton kernel failed (%s); using the torch references from now on", _failure)


def failure() -> str | None:
    """Why a kernel failed here (None when none has)."""
    return _failure


def triton_runs_on(device: torch.device) -> bool:
    """True where the Triton kernels run for tensors on ``device``: compiled on CUDA, interpreted on the CPU
    when this process defined them under ``TRITON_INTERPRET=1`` (and none has failed here)."""
    if triton is None or _failure is not None:
        return False
    if INTERPRETED:
        return device.type == "cpu"
    return device.type == "cuda"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if triton is None:
        return f"Triton not importable ({IMPORT_ERROR})"
    if _failure is not None:
        return f"a Triton kernel failed here ({_failure})"
    if triton_runs_on(device):
        return None
    if device.type != "cuda":
        return f"not CUDA ({device.type})"
    return "Triton runs interpreted in this process (TRITON_INTERPRET=1)"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())




class Numerics:
    """How a reference computes what a kernel computes: ``cast(x, dtype)`` rounds a float32 tensor to ``dtype``
    and ``exp`` is float32's exponential. The default is torch's (round to nearest even, torch.exp); a test of a
    kernel under Triton's interpreter passes the interpreter's own rounding, so the comparison can be exact."""

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


TORCH = Numerics()


def rounded(x: torch.Tensor, dtype: torch.dtype, numerics: Numerics) -> torch.Tensor:
    """``x`` (float32) rounded to ``dtype`` and read back as float32: what a kernel does when it mirrors a
    stock operation that writes a ``dtype`` tensor."""
    return x if dtype == torch.float32 else numerics.cast(x, dtype).float()


def quantize_rows(x: torch.Tensor, numerics: Numerics = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_tensor(x, "row")`` on a 2-D float32 tensor, with ``numerics``' cast to float8."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)
    q = numerics.cast((x / scale).clamp(-FP8_MAX, FP8_MAX), FP8_DTYPE)
    return q, scale
