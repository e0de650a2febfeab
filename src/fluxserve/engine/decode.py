"""Latents -> images, exactly as the diffusers FLUX.2 pipelines do it after their denoising loop.

``Flux2Pipeline(output_type="latent")`` returns packed tokens (B, H/16 * W/16, 128);
``Flux2KleinPipeline(output_type="latent")`` returns them already unpacked, de-normalised and unpatchified
(B, 32, H/8, W/8). Both end in ``vae.decode`` and the pipeline's image processor.
"""

from __future__ import annotations

import torch
from PIL import Image

from fluxserve.engine import lossless


def vae_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's latent output (packed or not) -> the VAE's input (B, 32, H/8, W/8)."""
    if latents.ndim == 4:  # the klein pipeline did the post-processing already
        return latents
    return denormalize_and_unpatchify(pipe, unpack(pipe, latents, height, width))


def unpack(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C) tokens in row-major order (the pipelines' position ids) -> (B, C, h, w)."""
    scale = pipe.vae_scale_factor * 2
    h, w = int(height) // scale, int(width) // scale
    batch, _, channels = latents.shape
    return latents.reshape(batch, h, w, channels).permute(0, 3, 1, 2).contiguous()


def denormalize_and_unpatchify(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, 128, H/16, W/16) normalised patches -> (B, 32, H/8, W/8) VAE latents (BatchNorm statistics undone)."""
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return pipe._unpatchify_latents(latents * std + mean)


@torch.no_grad()
def decode(pipe, vae_input: torch.Tensor, output_type: str = "pil") -> list[Image.Image]:
    """VAE decode and the pipeline's post-processing. At ``regular`` and ``high`` (``lossless``): cuDNN's benchmark
    mode while decoding on CUDA, and the post-processing to PIL images on the VAE's device (bit-identical)."""
    vae_device = next(pipe.vae.parameters()).device
    with lossless.vae_decoding(pipe, vae_device):
        image = pipe.vae.decode(vae_input.to(vae_device), return_dict=False)[0]
    if output_type == "pil":
        return lossless.postprocess(pipe, image)
    return pipe.image_processor.postprocess(image, output_type=output_type)


@torch.no_grad()
def preview_from_step(pipe, latents_before: torch.Tensor, latents_after: torch.Tensor, sigma: float,
                      sigma_next: float, height: int, width: int, max_side: int = 512) -> Image.Image:
    """A preview of the final image from one Euler step: velocity v = (x_next - x) / (s_next - s), the clean
    estimate x0 = x - s * v, decoded by the VAE (first image of the batch), downscaled to ``max_side``."""
    velocity = (latents_after[:1] - latents_before[:1]) / (sigma_next - sigma)
    x0 = latents_before[:1] - sigma * velocity
    vae_input = vae_latents(pipe, x0, height, width)  # inside the loop both pipelines hold packed tokens
    image = decode(pipe, vae_input.to(pipe.vae.dtype))[0]
    image.thumbnail((max_side, max_side))
    return image
