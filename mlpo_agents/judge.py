"""Judge model-written code by its tests: a pass means the judge saw every test pass.

``run_tests`` runs a ``TestedProgram`` (the untrusted solution plus trusted tests) in the sandbox of
``sandbox._execute``; the judge, not the solution, decides.

- The sandbox starts this file as the *judge* (it runs there alone, as a script: stdlib only).
  Before any solution code exists in memory, the judge reads the task, makes itself non-dumpable
  (``PR_SET_DUMPABLE`` 0) and forks the *solution process*, which closes every descriptor but two
  pipes, then runs the solution.
- Only then does the judge read a random token (``secrets.token_hex``) from an unlinked file the
  sandbox passed by descriptor. It is in no argv, environment, file name or the solution's memory.
- The judge runs the task's trusted test code in its own namespace, with pristine builtins and
  modules; each function of the solution the tests call is a stand-in that sends the arguments to
  the solution process and decodes the reply as plain data only (None, bool, int, float, complex,
  str, bytes, list, tuple, set, frozenset, dict, Counter, OrderedDict, deque, or an iterator of
  these), so a returned object cannot bring its own ``__eq__``.
- After the last test returns normally, the judge writes ``pass <token>`` to a second unlinked file;
  only that exact line counts as a pass. Exit status and output never do.

Threat model. Defended: anything the solution does to its own process (``sys.exit``/``os._exit``/
``SystemExit`` anywhere, ``atexit``, ``sys.excepthook``, signal handlers and alarms, ``settrace``/
``setprofile``, patching builtins, modules or ``AssertionError``, redefining ``check``, the task's
helpers or the tested function, printing fake success, redirecting stdout) and objects that claim
to equal anything. The solution cannot read the judge's memory, descriptors or ``/proc`` entries:
it runs after the fork under the same uid without capabilities, and the judge is non-dumpable.
It can kill or stop the judge, which only fails the run. Not defended: a solution that knows the
tests (MBPP prompts show them) and hard-codes their answers; tests that pass arguments other than
plain data, or check that the solution mutated its arguments (copies cross the pipe), fail;
when the ``uid`` layer is unavailable and the sandbox runs as root, the solution keeps
``CAP_SYS_PTRACE`` and could read the judge's memory; a kernel exploit beats every layer here.
"""

from __future__ import annotations

import builtins
import collections
import ctypes
import functools
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

if __name__ != "__main__":  # the sandbox runs this file alone, as a script; its judge needs none of these
    from .sandbox import OUTPUT_LIMIT_CHARS, SandboxResult, _execute, _read_output

_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class TestedProgram:
    """A solution and the trusted tests that judge it; ``run_tests`` runs them in separate processes."""

    solution: str
    """Untrusted code, run in the solution process (as ``__main__``)."""
    tests: str
    """Trusted test code, run top to bottom in the judge; every statement must finish normally."""
    calls: tuple[str, ...]
    """Names the tests call that the solution defines; in the judge each is a stand-in for it."""
    setup: str = ""
    """Trusted code run in the judge before the stand-ins are bound (imports, the task's helpers)."""

    def __post_init__(self) -> None:
        if not self.calls:
            raise ValueError("TestedProgram.calls is empty: name the solution's functions the tests call.")


def run_tests(
    program: TestedProgram, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None
) -> SandboxResult:
    """Run ``program``'s tests against its solution; ``passed`` only when the judge saw them all pass.

    ``reason`` is ``"passed"``, the first failure as ``"AssertionError: ..."`` or ``"ValueError: ..."``
    (an exception of the solution), ``"the solution process exited ..."``, ``"timeout after 5s"``,
    ``"killed by ..."``, or ``"sandbox error: ..."``. Never raises for anything the program does.
    """
    token = secrets.token_hex(16)
    spec = {
        "solution": program.solution,
        "setup": program.setup,
        "tests": program.tests,
        "calls": program.calls,
    }
    try:
        token_file, verdict_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    except OSError as e:
        return SandboxResult(False, None, False, "", "", f"sandbox error: no verdict files: {e}")
    with token_file, verdict_file:
        token_file.write(token.encode())
        token_file.flush()
        token_file.seek(0)
        fds = (token_file.fileno(), verdict_file.fileno())
        result = _execute(
            {"judge.py": _judge_source(), "program.json": json.dumps(spec)},
            ["judge.py", "program.json", *map(str, fds)],
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            cpu_s=cpu_s,
            pass_fds=fds,
        )
        verdict = _read_output(verdict_file)
    if result.reason.startswith("sandbox error"):
        return result
    kind, _, detail = verdict.partition(" ")
    passed = (
        kind == "pass" and secrets.compare_digest(detail.encode(), token.encode()) and not result.timed_out
    )
    if passed:
        reason = "passed"
    elif result.timed_out:
        reason = result.reason
    elif kind == "fail" and detail:
        reason = detail[:OUTPUT_LIMIT_CHARS]
    elif kind == "error":
        reason = f"sandbox error: judge: {detail}"
    elif result.returncode != 0:  # the judge died before it could say why (memory, CPU, killed)
        reason = result.reason
    else:
        reason = f"sandbox error: the judge exited without a verdict ({verdict[:200]!r})"
    return SandboxResult(
        passed=passed,
        returncode=result.returncode,
        timed_out=result.timed_out,
        stdout=result.stdout,
        stderr=result.stderr,
        reason=reason,
        isolation=result.isolation,
        unavailable=result.unavailable,
    )


@functools.cache
def _judge_source() -> str:
    """This very file: the sandbox child runs it as the judge (stdlib only, any Python >= 3.9)."""
    return Path(__file__).read_text(encoding="utf-8")


# ---------------------------------------------------------------- the judge (runs inside the sandbox)

_MAX_MESSAGE_BYTES = 64 * 2**20
_MAX_DEPTH = 100


class _SolutionFailed(BaseException):
    """The solution process is gone or misbehaved; a BaseException so ``except Exception`` in tests misses it."""


def _describe(error: BaseException) -> str:
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _encode(value: Any, depth: int = 0) -> Any:
    """A plain-data value as JSON-ready data (runs next to the solution, so only a courtesy)."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply to send")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    deeper = depth + 1
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, complex):
        return {"$": "complex", "v": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"$": "bytearray" if isinstance(value, bytearray) else "bytes", "v": bytes(value).hex()}
    if isinstance(value, list):
        return [_encode(item, deeper) for item in value]
    if isinstance(value, dict):
        tag = next(
            (t.__name__ for t in (collections.Counter, collections.OrderedDict) if isinstance(value, t)),
            "dict",
        )
        return {"$": tag, "v": [[_encode(k, deeper), _encode(v, deeper)] for k, v in value.items()]}
    for container in (tuple, set, frozenset, collections.deque):
        if isinstance(value, container):
            return {"$": container.__name__, "v": [_encode(item, deeper) for item in value]}
    if isinstance(value, range):
        return {"$": "range", "v": [value.start, value.stop, value.step]}
    if isinstance(value, Iterator):
        return {"$": "iter", "v": [_encode(item, deeper) for item in value]}
    raise TypeError(f"the judge receives plain data only, not {kind.__name__}")


_CONTAINERS: dict[str, Any] = {
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "deque": collections.deque,
    "iter": lambda items: iter(list(items)),
}
_MAPPINGS: dict[str, Any] = {  # each takes (key, value) pairs
    "dict": dict,
    "Counter": lambda pairs: collections.Counter(dict(pairs)),
    "OrderedDict": collections.OrderedDict,
}


def _decode(data: Any, depth: int = 0) -> Any:
    """The inverse of ``_encode`` in the judge: builds only the plain types it lists, or raises."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    deeper = depth + 1
    if type(data) is list:
        return [_decode(item, deeper) for item in data]
    if type(data) is not dict or set(data) != {"$", "v"}:
        raise ValueError(f"not an encoded value: {str(data)[:100]}")
    tag, payload = data["$"], data["v"]
    if tag in _CONTAINERS and type(payload) is list:
        return _CONTAINERS[tag](_decode(item, deeper) for item in payload)
    if tag in _MAPPINGS and type(payload) is list and all(type(p) is list and len(p) == 2 for p in payload):
        return _MAPPINGS[tag]((_decode(k, deeper), _decode(v, deeper)) for k, v in payload)
    if tag in ("bytes", "bytearray") and type(payload) is str:
        return (bytes if tag == "bytes" else bytearray).fromhex(payload)
    if tag == "complex" and type(payload) is list and len(payload) == 2:
        return complex(float(payload[0]), float(payload[1]))
    if (
        tag == "range"
        and type(payload) is list
        and len(payload) == 3
        and all(type(x) is int for x in payload)
    ):
        return range(*payload)
    raise ValueError(f"unknown encoded value {tag!r}")


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


def _receive(stream: BinaryIO) -> dict[str, Any] | None:
    """The next message, or None at end of stream; ValueError for anything that is not one."""
    line = stream.readline(_MAX_MESSAGE_BYTES + 1)
    if not line.endswith(b"\n"):
        if len(line) > _MAX_MESSAGE_BYTES:
            raise ValueError("message too large")
        return None
    message = json.loads(line)
    if type(message) is not dict:
        raise ValueError("message is not an object")
    return message


def _serve_solution(source: str, requests_fd: int, replies_fd: int) -> None:
    """The solution process: run the solution, then answer calls until the judge closes the pipe."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except SystemExit as e:
        _send(
            replies_fd,
            {"failed": f"the solution process exited (SystemExit: {e.code}) before the tests finished"},
        )
        return
    except BaseException as e:
        traceback.print_exc()
        _send(replies_fd, {"failed": _describe(e)})
        return
    _send(replies_fd, {"ready": True})
    requests = os.fdopen(requests_fd, "rb")
    while (request := _receive(requests)) is not None:
        try:
            function = namespace[request["call"]]
            value = function(*_decode(request["args"]), **_decode(request["kwargs"]))
            reply = {"ok": _encode(value)}
        except BaseException as e:
            traceback.print_exc()
            reply = {"raised": [type(e).__name__, str(e)]}
        _send(replies_fd, reply)


class _Channel:
    """The judge's end of the pipes to the solution process."""

    def __init__(self, pid: int, requests_fd: int, replies_fd: int) -> None:
        self.pid, self.requests_fd = pid, requests_fd
        self.replies = os.fdopen(replies_fd, "rb")
        self.calls = 0
        self.failure: _SolutionFailed | None = None
        self.ended: str | None = None
        """How the solution process ended, once it has been reaped."""
        """Set once: tests that swallow the error (``except BaseException``) cannot hide it."""

    def _fail(self, message: str) -> _SolutionFailed:
        self.failure = self.failure or _SolutionFailed(message)
        return self.failure

    def _next(self) -> dict[str, Any]:
        try:
            message = _receive(self.replies)
        except (ValueError, RecursionError) as e:
            raise self._fail(f"the solution process sent a malformed message ({e})") from None
        if message is None:
            raise self._fail(f"the solution process {self._ending()} before the tests finished")
        return message

    def _ending(self) -> str:
        """How the solution process ended; its pipe closes a moment before its exit status is ready."""
        for _ in range(100):
            if self.ended is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    self.ended = (
                        f"exited (status {code})"
                        if code >= 0
                        else f"was killed by {signal.Signals(-code).name}"
                    )
            if self.ended is not None:
                return self.ended
            time.sleep(0.01)
        return "closed its channel"

    def close(self) -> None:
        """Let the solution process finish (so its output is flushed), then make sure it is gone."""
        os.close(self.requests_fd)
        if self._ending() == "closed its channel":
            os.kill(self.pid, signal.SIGKILL)

    def wait_until_loaded(self) -> None:
        message = self._next()
        if "failed" in message:
            raise self._fail(str(message["failed"]))
        if message != {"ready": True}:
            raise self._fail("the solution process sent a malformed message (expected ready)")

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.failure:
            raise self.failure
        self.calls += 1
        try:
            _send(self.requests_fd, {"call": name, "args": _encode(args), "kwargs": _encode(kwargs)})
        except BrokenPipeError:
            raise self._fail(f"the solution process {self._ending()} before the tests finished") from None
        reply = self._next()
        if "ok" in reply:
            try:
                return _decode(reply["ok"])
            except (ValueError, TypeError, RecursionError) as e:
                raise self._fail(f"the solution returned something that is not plain data ({e})") from None
        raised = reply.get("raised")
        if not (type(raised) is list and len(raised) == 2 and all(type(x) is str for x in raised)):
            raise self._fail("the solution process sent a malformed message (expected a reply)")
        kind = getattr(builtins, raised[0], None)
        if isinstance(kind, type) and issubclass(kind, Exception):  # so tests that expect ValueError see one
            raise kind(raised[1])
        raise self._fail(f"the solution raised {raised[0]}: {raised[1]} in a test")


class _SolutionFunction:
    """What the tests see in place of one of the solution's functions."""

    def __init__(self, name: str, channel: _Channel) -> None:
        self.__name__, self._channel = name, channel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.call(self.__name__, args, kwargs)


def _judge_tests(spec: dict[str, Any], channel: _Channel) -> str:
    """Run the trusted tests against the solution; the verdict line without the token."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(spec["setup"], "setup.py", "exec"), namespace)
    except BaseException as e:
        return f"error the task's setup code failed: {_describe(e)}"
    try:
        channel.wait_until_loaded()
        for name in spec["calls"]:
            namespace[name] = _SolutionFunction(name, channel)
        exec(compile(spec["tests"], "tests.py", "exec"), namespace)
    except _SolutionFailed as e:
        return f"fail {e}"
    except BaseException as e:
        traceback.print_exc()
        return f"fail {_describe(e)}"
    if channel.failure:
        return f"fail {channel.failure}"
    if channel.calls == 0:
        return "error the tests never called the solution"
    return "pass"


def _judge_main(spec_path: str, token_fd: int, verdict_fd: int) -> None:
    """Entry point of the judge process; see the module docstring for why each step is where it is."""
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))  # before the solution can rewrite it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        message = f"error could not make the judge non-dumpable: errno {err} ({os.strerror(err)})"
        os.write(verdict_fd, message.encode())
        return
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the solution process
        code = 0
        try:
            for fd in (token_fd, verdict_fd, requests_w, replies_r):
                os.close(fd)
            _serve_solution(spec["solution"], requests_r, replies_w)
        except BaseException:
            code = 1
        finally:
            for stream in (
                sys.stdout,
                sys.stderr,
            ):  # os._exit skips the solution's atexit hooks, and flushing
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(code)
    os.close(requests_r)
    os.close(replies_w)
    token = os.read(token_fd, 256)
    os.close(token_fd)
    channel = _Channel(pid, requests_w, replies_r)
    verdict = _judge_tests(spec, channel)
    channel.close()
    os.write(verdict_fd, b"pass " + token if verdict == "pass" else verdict.encode())


if __name__ == "__main__":
    _judge_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
