"""GPU memory as the memory plan sees it, and the cap that makes a large GPU behave like a smaller one.

Every decision that depends on how much GPU memory there is (the placement plan, the FP8 copy of ``high``, the
training plan, the benchmarks' fit checks, the engine's memory report) reads it from ``free_gpu_bytes``, and
nowhere else: the driver's free memory plus what PyTorch's caching allocator holds but does not use, seen
through the process's cap when one is set.

The cap (``--gpu-memory-cap``, ``FLUXSERVE_GPU_MEMORY_CAP``) is applied once per device at engine start
(``apply_memory_cap``) with ``torch.cuda.set_per_process_memory_fraction(cap / total)``, so PyTorch's allocator
never reserves more than ``cap`` bytes, and recorded here, so the planner sees the smaller GPU (``capped_memory``):
``total = min(T, cap)`` and ``free`` as it would be on a GPU of ``cap`` bytes running the same process. A 141 GB
H200 capped at 80 GiB therefore plans, places and runs as an 80 GB H100 would (less the little more memory the
CUDA context and other processes take on the smaller card, which the driver's free memory already counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

GIB = 1024**3

_caps: dict[int, int] = {}  # CUDA device index -> the cap applied to it in this process (bytes)


def capped_memory(free: int, total: int, *, reserved: int = 0, allocated: int = 0, cap: int = 0) -> tuple[int, int]:
    """(free, total) bytes the planner sees on a GPU of ``total`` bytes whose driver reports ``free``, where
    PyTorch's allocator has ``reserved`` bytes of which ``allocated`` are in use, under a cap of ``cap`` bytes
    (0: none).

    Without a cap (or one at or above ``total``): the driver's free memory plus the allocator's unused reserve.
    Under a cap: total is ``cap``; free is what a GPU of ``cap`` bytes would have, ``free - (total - cap)``
    (everything the driver counts as used stays used), and never more than the allocator may still reserve
    under the fraction, ``cap - reserved``; both at least 0, plus the unused reserve."""
    cached = max(0, reserved - allocated)
    if cap and cap < total:
        free = max(0, min(free - (total - cap), cap - reserved))
        total = cap
    return free + cached, total


def _index(device: torch.device | str) -> int:
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def memory_cap(device: torch.device | str) -> int:
    """The cap applied to CUDA ``device`` in this process (bytes), 0 when none."""
    device = torch.device(device)
    if device.type != "cuda" or not _caps:
        return 0
    return _caps.get(_index(device), 0)


def free_gpu_bytes(device: torch.device | str) -> tuple[int, int]:
    """(free, total) bytes of CUDA ``device`` as every planning decision must see them (``capped_memory`` of
    the driver's figures, the allocator's and the device's cap)."""
    free, total = torch.cuda.mem_get_info(device)
    return capped_memory(free, total, reserved=torch.cuda.memory_reserved(device),
                         allocated=torch.cuda.memory_allocated(device), cap=memory_cap(device))


def memory_report(device: torch.device | str) -> dict:
    """The device's memory for reports (GiB): free and total as planned from (``free_gpu_bytes``), allocated,
    reserved, and the cap when one is applied. Empty off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    free, total = free_gpu_bytes(device)
    report = {"free_gib": _gib(free), "total_gib": _gib(total),
              "allocated_gib": _gib(torch.cuda.memory_allocated(device)),
              "reserved_gib": _gib(torch.cuda.memory_reserved(device))}
    cap = memory_cap(device)
    if cap:
        report["cap_gib"] = _gib(cap)
    return report


@dataclass(frozen=True)
class MemoryCap:
    """A requested GPU memory cap and what became of it on one device."""

    device: str
    requested_bytes: int  # 0: no cap asked for
    applied: bool
    fraction: float | None = None  # of the device's total memory, as given to PyTorch
    device_total_bytes: int | None = None
    how: str = ""  # the call that applied it
    note: str = ""  # why it was not applied, or what it means

    def as_dict(self) -> dict:
        return {"device": self.device, "requested_gib": _gib(self.requested_bytes), "applied": self.applied,
                "fraction": self.fraction,
                "device_total_gib": _gib(self.device_total_bytes) if self.device_total_bytes else None,
                "how": self.how, "note": self.note}


def apply_memory_cap(device: torch.device | str, cap: int) -> MemoryCap:
    """Cap this process's use of CUDA ``device`` at ``cap`` bytes (0 lifts a cap applied before).

    ``torch.cuda.set_per_process_memory_fraction(cap / total, device)`` bounds what PyTorch's allocator may
    reserve (an allocation beyond it fails as an out-of-memory error would on the smaller GPU), and the cap is
    recorded for ``free_gpu_bytes``. A cap at or above the device's memory changes nothing. Off CUDA there is no
    GPU memory to cap: nothing is applied and the record says so."""
    device = torch.device(device)
    name = str(device)
    if device.type != "cuda":
        note = (f"the GPU memory cap ({_gib(cap)} GiB, --gpu-memory-cap) is ignored: {name} is not a GPU"
                if cap else "")
        if note:
            log.warning(note)
        return MemoryCap(name, cap, False, note=note)
    if not cap and not _caps:  # nothing asked for, nothing to lift: no CUDA call at all
        return MemoryCap(name, 0, False)
    index = _index(device)
    if not cap:
        if _caps.pop(index, None) is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
            return MemoryCap(name, 0, False, fraction=1.0, how=f"set_per_process_memory_fraction(1.0, {index})",
                             note="the cap applied before is lifted")
        return MemoryCap(name, 0, False)
    _free, total = torch.cuda.mem_get_info(index)
    if cap >= total:
        _caps.pop(index, None)
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        return MemoryCap(name, cap, False, device_total_bytes=total,
                         note=f"the cap ({_gib(cap)} GiB) is not below the GPU's {_gib(total)} GiB: nothing to cap")
    fraction = cap / total
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    _caps[index] = cap
    how = f"torch.cuda.set_per_process_memory_fraction({fraction:.6f}, {index})"
    log.info("GPU memory capped at %.1f GiB of %.1f GiB on %s (%s)", cap / GIB, total / GIB, name, how)
    return MemoryCap(name, cap, True, fraction=fraction, device_total_bytes=total, how=how,
                     note=f"the allocator reserves at most {_gib(cap)} GiB of {_gib(total)}; the memory plan sees "
                     f"a {_gib(cap)} GiB GPU")


def _gib(value: int | None) -> float:
    return round((value or 0) / GIB, 2)


__all__ = ["MemoryCap", "apply_memory_cap", "capped_memory", "free_gpu_bytes", "memory_cap", "memory_report"]
