"""How Triton's interpreter (``TRITON_INTERPRET=1``, triton 3.9) rounds, in torch: the numerics a reference
needs to match an interpreted kernel bit for bit.

* float32 -> bf16/fp16 truncates (drops the low mantissa bits) instead of rounding to nearest even.
* float32 -> float8_e4m3fn rounds half away from zero on the magnitude, and a rounding carry out of the
  mantissa is OR-ed (not added) into the exponent field: where the exponent's lowest bit is already set the
  value drops to the binade's start (31.7 -> 16, where the GPU gives 32). Results below e4m3's normal range
  are shifted into subnormals without rounding. ``test_interpreter_numerics_mirror_the_interpreter`` checks
  this against the interpreter itself over every binade.
* ``exp`` is numpy's float32 exponential.
"""

from __future__ import annotations

import numpy as np
import torch

from fluxserve.engine.kernels.runtime import Numerics


def _truncate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    if dtype == torch.bfloat16:
        return (bits >> 16).to(torch.int16).view(torch.bfloat16)
    raise NotImplementedError(f"interpreter cast to {dtype}")


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn as the interpreter's ``_convert_float`` does it (RTNE mode)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = (bits >> 31) & 1
    significand = bits & 0x7FFFFF
    exponent = (bits >> 23) & 0xFF
    zero = (exponent == 0) & (significand == 0)
    if bool(((exponent == 0) & (significand != 0)).any()):
        raise NotImplementedError("float32 subnormal inputs")
    exponent = torch.where(zero, torch.full_like(exponent, 127 - 7), exponent)
    out_exponent = (exponent - 127 + 7).clamp(0, 15)
    out_significand = ((significand >> 20) & 7) + ((significand & (1 << 19)) > 0).to(torch.int64)
    underflow = (out_exponent == 0) & ~zero
    shift = (1 - 7) - (exponent - 127)
    shifted = (out_significand >> shift.clamp(0, 62)) | torch.where(
        (3 - shift) >= 0, 1 << (3 - shift).clamp(0, 62), torch.zeros_like(shift))
    out_significand = torch.where(underflow, shifted & 0xFF, out_significand)
    out = (sign << 7) | (out_exponent << 3) | out_significand
    return (out & 0xFF).to(torch.uint8).view(torch.float8_e4m3fn)


class InterpreterNumerics(Numerics):
    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.float()
        if dtype == torch.float8_e4m3fn:
            return _e4m3(x)
        if dtype == torch.float32:
            return x
        return _truncate(x, dtype)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.exp(x.float().contiguous().numpy()))


INTERPRETER = InterpreterNumerics()
