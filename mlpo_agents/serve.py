"""`mlpo serve`: the vLLM servers a team needs, and the team config routed to them.

`serve_team` starts one `VLLMServer` (see `vllm_server.py`) per distinct set of local weights in a team
and returns a `ServedTeam`: the servers plus the team with those deployments rewritten to
`hosted_vllm/<served name>` at each server's `api_base`; calls through litellm then return the same
token ids and logprobs as the local engine. `ServedTeam.server_for(role)` finds the server to load a
role's LoRA adapter into. `add_subcommand` / `serve_main` are the CLI.

`mlpo serve --team T --app` serves the team itself instead, as an OpenAI-compatible chat model
(`app.py`, `app_main`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
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
from mlpo_agents.vllm_server import VLLMNotInstalledError, VLLMServer, VLLMServerError, vllm_python

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    return zoo.model_folder(canon)


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
    app = parser.add_argument_group("the team as an OpenAI-compatible chat model (--app)")
    app.add_argument("--app", action="store_true",
                     help="serve the team itself at /v1/chat/completions (model = team name) instead of vLLM "
                          "servers for its weights; --team may list several teams, comma-separated")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --api-key)")
    app.add_argument("--port", type=int, default=8080)
    app.add_argument("--api-key", default=os.environ.get("MLPO_API_KEY"),
                     help="bearer token every request must send (default: $MLPO_API_KEY)")
    app.add_argument("--traces", default="runs/traces.sqlite", help="trace store every episode is recorded in")
    app.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger requests get HTTP 413")
    return parser


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mlpo serve` on the CLI's subparsers (see `PLUGGED_COMMANDS` in cli.py)."""
    parser = subparsers.add_parser(
        "serve", help="start vLLM servers for a team and print the team routed to them "
        "(--app: serve the team itself as an OpenAI-compatible chat model)"
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
    if getattr(args, "app", False):
        return app_main(args)
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


def app_main(args: argparse.Namespace) -> int:
    """`mlpo serve --team T --app`: the teams as an OpenAI-compatible chat model until Ctrl-C."""
    from mlpo_agents.app import AppSettings, check_bind, run_app
    from mlpo_agents.team import Team
    from mlpo_agents.trace import open_store

    check_bind(args.host, args.api_key)  # before any model or store is loaded
    store = open_store(args.traces)
    teams = [Team.load(name.strip(), traces=store) for name in args.team.split(",") if name.strip()]
    names = ", ".join(t.name for t in teams)
    print(f"serving teams {names} at http://{args.host}:{args.port}/v1 (traces -> {args.traces}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        run_app(teams, host=args.host, port=args.port,
                settings=AppSettings(api_key=args.api_key, max_request_bytes=args.max_request_bytes))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
