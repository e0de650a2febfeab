"""Text encoding that stops at the last hidden layer the pipeline reads.

The FLUX.2 pipelines condition on a few intermediate hidden states of their text encoder: [dev] stacks layers
10, 20 and 30 of Mistral Small's 40, [klein] layers 9, 18 and 27 of Qwen3's 36 (``encode_prompt``'s
``text_encoder_out_layers``). A plain forward still runs every later layer, the final norm and the language-model
head over every token, and all of that is thrown away. ``encoding_only`` skips it, with bit-identical prompt
embeddings:

* the decoder runs ``max(layers)`` layers (its loop runs ``config.num_hidden_layers`` of them, and nothing else in
  its forward depends on that number: the attention masks and, for Qwen3, each layer's attention type are taken
  per layer from the config);
* the final norm passes its input through. The decoder reports ``hidden_states[-1]`` as the normed output; with
  the stack cut at layer ``k``, that entry is ``hidden_states[k]``, which the pipeline reads un-normed. Passing
  the input through makes it the very tensor the ``k``-th layer returned (and were the cut ever ignored, it would
  only change the last entry, which lies beyond the ones read);
* the head computes logits for the last token only (``logits_to_keep=1``); the pipeline never reads them.

The unused layers stay loaded: prompt expansion generates with the whole model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def layers_read(pipe) -> tuple[int, ...] | None:
    """The hidden-state indices ``pipe.encode_prompt`` reads by default (``text_encoder_out_layers``), or None
    when the pipeline has no such parameter."""
    encode_prompt = getattr(type(pipe), "encode_prompt", None)
    if encode_prompt is None:
        return None
    parameter = inspect.signature(encode_prompt).parameters.get("text_encoder_out_layers")
    if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
        return None
    return tuple(parameter.default)


@contextmanager
def encoding_only(pipe, layers: Sequence[int] | None = None) -> Iterator[None]:
    """While active, ``pipe.text_encoder``'s forward stops after the last of ``layers`` (the hidden-state
    indices the encoding reads; by default the pipeline's own, ``layers_read(pipe)``) and skips the head's
    logits for all but the last token. The prompt embeddings are identical. Everything is restored on exit,
    also when the body raises.

    Use it around ``encode_prompt`` only: prompt expansion (``text_encoder.generate``) needs the whole model.
    It changes the shared text encoder while active (its config's layer count and a hook on its final norm and on
    its forward), so the text encoder must not run elsewhere meanwhile; the engine runs one request at a time per
    pipeline. A text encoder with no layer beyond the last read, negative indices, or a structure this does not
    recognise runs its layers unchanged. Device (CPU or CUDA, offloaded or not) and weight format (FP8 Linears
    included) do not matter: only the layer count, a norm's output and a keyword argument change.
    """
    text_encoder = getattr(pipe, "text_encoder", None)
    layers = layers_read(pipe) if layers is None else tuple(layers)
    undo: list[Callable[[], None]] = []
    try:
        if text_encoder is not None:
            decoder = _truncatable_decoder(text_encoder, layers)
            if decoder is not None:
                config, total = decoder.config, decoder.config.num_hidden_layers
                undo.append(decoder.norm.register_forward_hook(_pass_input).remove)
                config.num_hidden_layers = max(layers)
                undo.append(lambda: setattr(config, "num_hidden_layers", total))
            if _accepts(text_encoder, "logits_to_keep"):
                undo.append(text_encoder.register_forward_pre_hook(_last_logits_only, with_kwargs=True).remove)
        yield
    finally:
        for action in reversed(undo):
            action()


def _truncatable_decoder(text_encoder: nn.Module, layers: tuple[int, ...] | None) -> nn.Module | None:
    """The text encoder's decoder (``layers`` list, final ``norm``, ``config.num_hidden_layers`` matching) when
    it has layers beyond the last one read, else None."""
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        return None
    get_decoder = getattr(text_encoder, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        return None
    stack = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    config = getattr(decoder, "config", None)
    if not isinstance(stack, nn.ModuleList) or not isinstance(norm, nn.Module) or config is None:
        return None
    total = getattr(config, "num_hidden_layers", None)
    if total != len(stack) or not 1 <= max(layers) < total:
        return None
    return decoder


def _pass_input(module: nn.Module, args: tuple, output: object) -> object:
    return args[0]


def _last_logits_only(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs.setdefault("logits_to_keep", 1)
    return args, kwargs


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
