"""LoRA helpers on the tiny in-process model."""

import json

import pytest
import torch

from mlpo_agents import zoo
from mlpo_agents.trainers.lora import (
    ADAPTER_META_FILE,
    AdapterMismatchError,
    LoraSettings,
    attach_lora,
    load_adapter,
    save_adapter,
)

IDS = torch.tensor([[3, 17, 42, 99, 5]])


def _perturb(model, seed=0):
    # lora_B starts at zero (the adapter is a no-op); give it values so save/load is observable.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_attach_trains_only_lora_and_leaves_the_shared_model_alone():
    shared, _ = zoo.resolve("tiny-test")
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    model = attach_lora("tiny-test", LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The base weights are shared with the zoo model, not copied (a 7B base is not duplicated per trainee).
    lora_q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_q.base_layer.weight is shared.model.layers[0].self_attn.q_proj.weight
    _perturb(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS).logits.sum().backward()
    optimizer.step()  # a training step moves the LoRA weights only
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items())
    assert not any("lora" in n for n, _ in shared.named_parameters())
    assert all(p.grad is None for p in shared.parameters())


def test_save_load_round_trip_and_atomic_overwrite(tmp_path):
    model = attach_lora("tiny-test", LoraSettings(r=4, alpha=8))
    _perturb(model, seed=1)
    folder = save_adapter(model, tmp_path / "leader", meta={"step": 1})
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / ADAPTER_META_FILE).read_text())["base_model"] == "tiny-test"

    loaded = load_adapter("tiny-test", folder)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, loaded(IDS).logits, atol=1e-6)
        base_logits = zoo.resolve("tiny-test")[0](IDS).logits
        assert not torch.allclose(base_logits, loaded(IDS).logits, atol=1e-3)

    _perturb(model, seed=2)
    save_adapter(model, folder, meta={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leader"]  # no tmp or old folders left behind
    reloaded = load_adapter("tiny-test", folder, is_trainable=True)
    assert any(p.requires_grad for p in reloaded.parameters())
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, reloaded(IDS).logits, atol=1e-6)


def test_adapter_is_refused_on_another_base_model(tmp_path):
    model = attach_lora("tiny-test", LoraSettings(r=2, alpha=4))
    folder = save_adapter(model, tmp_path / "a")
    meta = json.loads((folder / ADAPTER_META_FILE).read_text())
    meta["base_model"] = "smollm2-135m"
    (folder / ADAPTER_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="trained on base model 'smollm2-135m'"):
        load_adapter("tiny-test", folder)


def test_bad_settings_and_unknown_base_raise():
    with pytest.raises(ValueError, match="r >= 1"):
        LoraSettings(r=0)
    model, _ = zoo.build_tiny_test()
    with pytest.raises(ValueError, match="needs base_model"):
        save_adapter(attach_lora(model, LoraSettings(r=2, alpha=4)), "/tmp/unused-never-written")
