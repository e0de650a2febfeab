"""Prompt expansion: the already-loaded text encoder (Mistral3 for [dev], Qwen3 for [klein]) rewrites a short
prompt into a detailed one with ``generate``, as the reference CLI does (temperature 0.15, up to 512 tokens).

Sampling is seeded from the request's seed, so the same request with the same seed expands the same way.
"""

from __future__ import annotations

import torch
from PIL import Image

TEMPERATURE = 0.15
MAX_NEW_TOKENS = 512
MAX_IMAGE_PIXELS = 768 * 768  # references shown to a vision-language encoder are capped like the reference code

SYSTEM_TEXT_TO_IMAGE = (
    "You turn short image requests into one precise, vivid description for an image generator. Keep every "
    "subject, object, count, colour, style and any text to be rendered exactly as the user asked (quote text "
    "verbatim). Add what the request leaves open: composition and framing, the setting and background, lighting "
    "and time of day, materials and textures, the mood, and the medium or camera. Do not add new main subjects "
    "or change the meaning. Answer with the description only, in a single paragraph, without preamble."
)

SYSTEM_EDIT = (
    "You turn short image-editing instructions into one precise instruction for an image editor that sees the "
    "reference images. State exactly what to change and on which subject, and say explicitly that everything "
    "else - identity, pose, composition, lighting, colours and style - stays as in the references unless the "
    "user asked otherwise. When several references are given, name which image each element comes from (first "
    "image, second image, ...). Quote any text to render verbatim. Answer with the instruction only, in a "
    "single paragraph, without preamble."
)


def expand_prompt(
    pipe,
    prompt: str,
    images: list[Image.Image] | None = None,
    *,
    seed: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
) -> str:
    """The expanded prompt (the original one when the model answers nothing usable)."""
    images = images or []
    system = SYSTEM_EDIT if images else SYSTEM_TEXT_TO_IMAGE
    tokenizer = pipe.tokenizer
    text_encoder = pipe.text_encoder
    device = _execution_device(text_encoder)
    inputs = _chat_inputs(tokenizer, system, prompt, images)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(text_encoder.dtype)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            output = text_encoder.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                use_cache=True,
                pad_token_id=_text_tokenizer(tokenizer).pad_token_id,
            )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    text = _text_tokenizer(tokenizer).batch_decode(new_tokens, skip_special_tokens=True)[0]
    text = " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
    return text or prompt


def _chat_inputs(tokenizer, system: str, prompt: str, images: list[Image.Image]) -> dict:
    is_processor = hasattr(tokenizer, "image_processor")
    if _is_qwen(tokenizer):
        # Qwen3 (klein): text only, no thinking block.
        messages = [{"role": "system", "content": system}, {"role": "user", "content": _with_image_note(prompt, images)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        return dict(tokenizer(text, return_tensors="pt"))
    user: list[dict] = []
    if images and is_processor:
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        shown = [Flux2ImageProcessor._resize_if_exceeds_area(image, MAX_IMAGE_PIXELS) for image in images]
        user.extend({"type": "image", "image": image} for image in shown)
        user.append({"type": "text", "text": prompt})
    else:
        user.append({"type": "text", "text": _with_image_note(prompt, images)})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": user},
    ]
    return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt"))


def _with_image_note(prompt: str, images: list[Image.Image]) -> str:
    if not images:
        return prompt
    sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
    return f"{prompt}\n\n({len(images)} reference image(s): {sizes})"


def _is_qwen(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "<|im_start|>" in template


def _text_tokenizer(tokenizer):
    return getattr(tokenizer, "tokenizer", tokenizer)


def _execution_device(module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device
