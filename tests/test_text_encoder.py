"""Text encoding that stops after the last hidden layer read (``fluxserve.engine.text_encoder``).

The demo text encoders end exactly at the last layer read (30 for dev, 27 for klein), so the truncation itself is
proven on copies with as many layers as the real models (40 Mistral layers, 36 Qwen3 layers): same prompt
embeddings bit for bit, fewer layers run, and the model exactly as before afterwards.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from fluxserve.engine import fp8
from fluxserve.engine.demo import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS, demo_path
from fluxserve.engine.placement import stream_module, text_encoder_filter
from fluxserve.engine.text_encoder import encoding_only, layers_read
from fluxserve.engine.weights import load_pipeline
from fluxserve.request import GenerationRequest

MODELS = {"dev": "dev", "klein": "klein-4b-base"}  # arch -> catalogue key (klein base: two encodings with CFG)
REAL_LAYERS = {"dev": 40, "klein": 36}
LAST_READ = {"dev": 30, "klein": 27}
PROMPTS = ["a red fox in the snow", ""]


def load(catalog, demo_settings, arch: str, layers: int | None = None):
    """The demo pipeline for ``arch``; with ``layers``, its text encoder replaced by a seeded one that deep."""
    spec = catalog.models[MODELS[arch]]
    pipe = load_pipeline(spec, demo_path(demo_settings.demo_dir, spec.demo), torch.float32, demo=True)
    if layers is not None:
        pipe.text_encoder = deeper(pipe.text_encoder, layers)
    return pipe


def deeper(text_encoder, layers: int):
    config = copy.deepcopy(text_encoder.config)
    text_config = getattr(config, "text_config", config)
    text_config.num_hidden_layers = layers
    if getattr(text_config, "layer_types", None) is not None:
        text_config.layer_types = ["full_attention"] * layers
    torch.manual_seed(5)
    return type(text_encoder)(config).eval()


class Counter:
    """Counts decoder-layer calls and records the head's input lengths."""

    def __init__(self, text_encoder) -> None:
        self.layers = 0
        self.head_tokens: list[int] = []
        self.handles = [layer.register_forward_hook(self._layer) for layer in text_encoder.get_decoder().layers]
        self.handles.append(text_encoder.lm_head.register_forward_hook(self._head))

    def _layer(self, module, args, output) -> None:
        self.layers += 1

    def _head(self, module, args, output) -> None:
        self.head_tokens.append(args[0].shape[1])

    def reset(self) -> None:
        self.layers, self.head_tokens = 0, []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def encode(pipe, prompt, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"), **kwargs)[0]


@pytest.fixture(scope="module")
def deep(catalog, demo_settings) -> dict:
    return {arch: load(catalog, demo_settings, arch, REAL_LAYERS[arch]) for arch in MODELS}


def test_layers_read_are_the_pipeline_defaults(deep):
    assert layers_read(deep["dev"]) == (10, 20, 30)
    assert layers_read(deep["klein"]) == (9, 18, 27)
    assert layers_read(SimpleNamespace()) is None


@pytest.mark.parametrize("arch", ["dev", "klein"])
def test_demo_encoders_give_identical_embeddings(catalog, demo_settings, arch):
    """The demo encoders have no layer beyond the last read: every layer runs, only the unread logits shrink."""
    pipe = load(catalog, demo_settings, arch)
    counter = Counter(pipe.text_encoder)
    layers = len(pipe.text_encoder.get_decoder().layers)
    assert layers == {"dev": DEV_TEXT_LAYERS, "klein": KLEIN_TEXT_LAYERS}[arch] == LAST_READ[arch]
    for prompt in PROMPTS:
        expected = encode(pipe, prompt)
        assert counter.layers == layers and counter.head_tokens == [512]
        counter.reset()
        with encoding_only(pipe):
            got = encode(pipe, prompt)
        assert counter.layers == layers and counter.head_tokens == [1]
        counter.reset()
        assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["dev", "klein"])
def test_stops_after_the_last_layer_read_with_identical_embeddings(deep, arch):
    pipe = deep[arch]
    counter = Counter(pipe.text_encoder)
    try:
        for prompt in [*PROMPTS, PROMPTS]:  # one prompt, the empty one, a batch of two
            expected = encode(pipe, prompt)
            assert counter.layers == REAL_LAYERS[arch]
            counter.reset()
            with encoding_only(pipe):
                got = encode(pipe, prompt)
            assert counter.layers == LAST_READ[arch] and counter.head_tokens == [1]
            counter.reset()
            assert torch.equal(got, expected)

        # other layers than the default: the stop follows the last one asked for
        expected = encode(pipe, PROMPTS[0], text_encoder_out_layers=(4, 12))
        counter.reset()
        with encoding_only(pipe, (4, 12)):
            got = encode(pipe, PROMPTS[0], text_encoder_out_layers=(4, 12))
        assert counter.layers == 12 and torch.equal(got, expected)
    finally:
        counter.remove()


@pytest.mark.parametrize("held", ["fp8", "stream"])
def test_fp8_and_streamed_text_encoders(catalog, demo_settings, held):
    pipe = load(catalog, demo_settings, "dev", REAL_LAYERS["dev"])
    if held == "fp8":
        count = fp8.quantize_linears(pipe.text_encoder, include=text_encoder_filter, mode="weight_only")
        assert count > 0 and fp8.has_fp8(pipe.text_encoder)
    else:
        stream_module(pipe.text_encoder, "text_encoder", torch.device("cpu"))
    counter = Counter(pipe.text_encoder)
    expected = encode(pipe, PROMPTS[0])
    counter.reset()
    with encoding_only(pipe):
        got = encode(pipe, PROMPTS[0])
    assert counter.layers == LAST_READ["dev"] and torch.equal(got, expected)


@pytest.mark.parametrize("layers", [(10, 20, 40), (10, -1), ()], ids=["no-layer-beyond", "negative", "none"])
def test_runs_every_layer_when_there_is_nothing_to_skip(deep, layers):
    pipe = deep["dev"]
    counter = Counter(pipe.text_encoder)
    try:
        with encoding_only(pipe, layers):
            encode(pipe, PROMPTS[0])
        assert counter.layers == REAL_LAYERS["dev"]
    finally:
        counter.remove()
    with encoding_only(SimpleNamespace(text_encoder=None)), encoding_only(SimpleNamespace()):
        pass


def state(text_encoder) -> dict:
    decoder = text_encoder.get_decoder()
    return {
        "config_layers": decoder.config.num_hidden_layers, "layers": list(decoder.layers), "norm": decoder.norm,
        "norm_hooks": dict(decoder.norm._forward_hooks), "pre_hooks": dict(text_encoder._forward_pre_hooks),
        "hooks": dict(text_encoder._forward_hooks),
    }


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The full forward's logits and a greedy continuation (what prompt expansion uses)."""
    tokenizer = pipe.tokenizer
    encoded = tokenizer(PROMPTS[0], return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        logits = pipe.text_encoder(**inputs).logits
        tokens = pipe.text_encoder.generate(**inputs, max_new_tokens=4, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
    return logits, tokens


@pytest.mark.parametrize("arch", ["dev", "klein"])
@pytest.mark.parametrize("raises", [False, True], ids=["normal", "exception"])
def test_the_whole_model_is_restored(deep, arch, raises):
    pipe = deep[arch]
    before, (logits, tokens) = state(pipe.text_encoder), outputs(pipe)
    assert logits.shape[1] == len(PROMPTS[0].encode())  # byte-level demo tokenizer: logits for every token
    with pytest.raises(RuntimeError) if raises else nullcontext(), encoding_only(pipe):
        assert pipe.text_encoder.get_decoder().config.num_hidden_layers == LAST_READ[arch]
        encode(pipe, PROMPTS[0])
        if raises:
            raise RuntimeError("failed while encoding")
    assert state(pipe.text_encoder) == before
    assert pipe.text_encoder.get_decoder().config.num_hidden_layers == REAL_LAYERS[arch]
    after_logits, after_tokens = outputs(pipe)
    assert torch.equal(after_logits, logits) and torch.equal(after_tokens, tokens)


def test_engine_encodes_with_it(engine, deep):
    """``Engine._encode`` runs both encodings of a true-CFG request through ``encoding_only``."""
    pipe = deep["klein"]
    assert not pipe.config.is_distilled
    counter = Counter(pipe.text_encoder)
    try:
        expected = encode(pipe, PROMPTS[0]), encode(pipe, "")
        counter.reset()
        request = GenerationRequest(model=MODELS["klein"], prompt=PROMPTS[0], guidance=4.0)
        prompt_embeds, negative = engine._encode(pipe, PROMPTS[0], request)
        assert counter.layers == 2 * LAST_READ["klein"]
        assert torch.equal(prompt_embeds, expected[0]) and torch.equal(negative, expected[1])
    finally:
        counter.remove()
