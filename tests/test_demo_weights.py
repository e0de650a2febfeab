"""``fluxserve demo-weights``: deterministic tiny pipelines with locally built tokenizers."""

from __future__ import annotations

import hashlib
import json

from fluxserve.cli import main
from fluxserve.engine.demo import DEMO_ARCHS, is_built


def digests(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


def test_demo_weights_command_builds_identical_pipelines(demo_settings, tmp_path, capsys):
    assert main(["demo-weights", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    built = tmp_path / "cache" / "demo-weights"
    for arch in DEMO_ARCHS:
        assert is_built(built, arch)
        assert f"{arch}: {built / arch}" in out
        fresh, session = digests(built / arch), digests(demo_settings.demo_dir / arch)
        assert fresh and fresh == session  # seeded: every build gives the same weights
    assert "demo weights ready" in out


def test_demo_tokenizers_and_chat_templates(demo_settings):
    from transformers import AutoTokenizer

    klein = AutoTokenizer.from_pretrained(demo_settings.demo_dir / "klein" / "tokenizer")
    text = klein.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert klein.decode(klein("héllo 🦊")["input_ids"]) == "héllo 🦊"  # byte-level: any text round-trips
    dev = AutoTokenizer.from_pretrained(demo_settings.demo_dir / "dev" / "tokenizer")
    messages = [{"role": "system", "content": [{"type": "text", "text": "SYS"}]},
                {"role": "user", "content": [{"type": "text", "text": "a fox"}]}]
    assert dev.apply_chat_template(messages, tokenize=False) == "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]a fox[/INST]"
    index = json.loads((demo_settings.demo_dir / "klein" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    config = json.loads((demo_settings.demo_dir / "dev" / "text_encoder" / "config.json").read_text())
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert config["text_config"]["num_hidden_layers"] >= 30  # hidden states 10, 20, 30 are stacked
