"""Device placement: which model sits where, in which precision.

On CUDA every model stays resident when it fits in free memory. When it does not (``fp8.plan_memory`` decides
from ``torch.cuda.mem_get_info``), the text encoder (used once per request, for a few hundred tokens) gives way
first: stored in FP8 (weights only, per-output-channel scales, upcast in forward: half the bf16 bytes); then the
transformer's blocks are held in FP8 too; only then is the text encoder kept on the CPU and moved in for each
encoding (offload). The text-encoder choice can be forced with ``settings.text_encoder_placement``.
On the CPU everything is resident in float32.
"""

from __future__ import annotations

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
        }


def place_pipeline(pipe, device: torch.device, dtype: torch.dtype, requested: str = "auto") -> Placement:
    """Move ``pipe``'s models to ``device``, deciding where the text encoder goes."""
    sizes = {
        "transformer": module_bytes(pipe.transformer, dtype),
        "text_encoder": module_bytes(pipe.text_encoder, dtype),
        "vae": module_bytes(pipe.vae, dtype),
    }
    if device.type != "cuda":
        pipe.to(device)
        # oneDNN convolutions are several times faster in channels-last layout on the CPU (the VAE is all convs)
        pipe.vae.to(memory_format=torch.channels_last)
        name = str(dtype).removeprefix("torch.")
        return Placement(str(device), name, "resident", requested=requested, transformer=name, bytes=sizes)
    free, total = torch.cuda.mem_get_info(device)
    plan = fp8.plan_memory(
        free_bytes=free, transformer_bytes=sizes["transformer"], text_encoder_bytes=sizes["text_encoder"],
        vae_bytes=sizes["vae"], reserve_bytes=headroom_bytes(total), text_encoder_choice=requested,
    )
    choice = plan.text_encoder
    transformer_precision = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
    if plan.transformer == "fp8":
        from fluxserve.engine import accel

        transformer_precision = accel.prepare_transformer(pipe, "fp8", device)
    pipe.transformer.to(device)
    pipe.vae.to(device)
    hook = None
    if choice == "resident":
        pipe.text_encoder.to(device)
    elif choice == "fp8":
        quantize_text_encoder(pipe.text_encoder)
        pipe.text_encoder.to(device)
    else:
        from accelerate import cpu_offload_with_hook

        pipe.text_encoder.to("cpu")
        _, hook = cpu_offload_with_hook(pipe.text_encoder, execution_device=device)
    return Placement(str(device), str(dtype).removeprefix("torch."), choice, requested=requested,
                     transformer=transformer_precision, bytes=sizes, _hook=hook)
