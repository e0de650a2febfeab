"""Which exceptions are the compiler's: a compiled module that raises one falls back to eager for good, any other
error (bad input, out of memory in the model itself) propagates as it would without compiling."""

from __future__ import annotations

import traceback

COMPILER_CODE = ("/torch/_inductor/", "/torch/_dynamo/", "/torch/_functorch/", "/triton/")


def is_compile_failure(exc: BaseException) -> bool:
    """A compiler or CUDA-graph error: a dynamo exception, one whose name or message names the compiler, or any
    error raised from inside the compiler's own code (an assertion in CUDA graph trees, say)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover
        TorchDynamoException = ()
    if isinstance(exc, TorchDynamoException):
        return True
    text = f"{type(exc).__module__}.{type(exc).__name__} {exc}".lower()
    if any(word in text for word in ("inductor", "cudagraph", "triton", "dynamo")):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    innermost = frames[-1].filename.replace("\\", "/") if frames else ""
    return any(part in innermost for part in COMPILER_CODE)
