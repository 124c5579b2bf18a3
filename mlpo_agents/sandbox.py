"""Run an untrusted Python program in a separate, fenced-in process.

Layers, each recorded in ``SandboxResult.isolation`` when it took effect (a layer the OS refuses is
skipped and listed in ``SandboxResult.unavailable`` instead of failing the run):

- ``python -I`` in a fresh temporary folder (removed afterwards), HOME/TMPDIR pointing inside it;
- wall-clock timeout; the child leads its own session and the whole process group is killed;
- ``setrlimit``: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE, no core files;
- ``netns``: a new, empty network namespace (only loopback, down): no network;
- ``mountns``: a private mount namespace where ``/`` is read-only and ``/tmp``, ``/var/tmp``,
  ``/dev/shm`` are the temporary folder, so writes land only there;
- ``uid``: when started as root, the child runs as a throwaway uid unique to this run (so
  RLIMIT_NPROC counts only its own processes) with no-new-privileges; after the run every process
  of that uid is killed at once, which also catches children that escaped the process group.

``run_program`` judges by exit status, which the program controls: fine for trusted programs, not
for rewards. For rewards use ``judge.run_tests``, which runs its judge through ``_execute`` here.

Threat model. A layer the OS refuses is missing for that run (see ``unavailable``); a kernel
exploit beats every layer here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_LIMIT_CHARS = 4000
FILE_SIZE_LIMIT_BYTES = 16 * 2**20
MAX_PROCESSES = 32
_MARK = "[mlpo-sandbox] "  # prefix of the lines the child writes to stderr about its own setup

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable on most systems

_libc = ctypes.CDLL(None, use_errno=True)
_IS_ROOT = os.geteuid() == 0

# A uid range per parent process, one uid per concurrent run.
_UID_BASE = 200_000 + (os.getpid() % 100_000) * 64
_free_uids: queue.Queue[int] = queue.Queue()
for _slot in range(64):
    _free_uids.put(_UID_BASE + _slot)


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program."""

    passed: bool
    """``run_program``: exited with status 0 in time. ``run_tests``: the judge saw every test pass."""
    returncode: int | None
    """Exit status; negative for a signal (as in subprocess); None when it was killed on timeout."""
    timed_out: bool
    """The wall-clock timeout fired and the process group was killed."""
    stdout: str
    """Standard output, truncated to OUTPUT_LIMIT_CHARS."""
    stderr: str
    """Standard error (the end of it, where the traceback is), truncated to OUTPUT_LIMIT_CHARS."""
    reason: str
    """``"passed"``, ``"timeout after 5s"``, ``"AssertionError: ..."``, ``"killed by SIGKILL"``, ...;
    ``"sandbox error: ..."`` when the sandbox itself failed, not the program."""
    isolation: tuple[str, ...] = field(default=())
    """Layers that took effect beyond process limits: ``netns``, ``mountns``, ``uid``."""
    unavailable: tuple[str, ...] = field(default=())
    """Layers the OS refused, with the error, e.g. ``"netns: errno 1"``."""


def _errno_name() -> str:
    err = ctypes.get_errno()
    return f"errno {err} ({os.strerror(err)})"


def _world_executable(path: str) -> bool:
    """Whether any uid can run ``path``: every folder on the way and the file itself are o+x."""
    real = Path(os.path.realpath(path))
    if not real.is_file():
        return False
    for part in [real, *real.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH or (part == real and not mode & stat.S_IROTH):
            return False
    return True


@functools.cache
def _mount_namespace_works() -> bool:
    """Whether a child can get a private mount namespace here (decides where HOME/TMPDIR point)."""
    if not _IS_ROOT:
        return False
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = (
            _libc.unshare(_CLONE_NEWNS) == 0
            and _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
        )
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _pick_python(drop_uid: bool) -> str:
    """This interpreter, or, when the child will not be root, the first one any uid may run."""
    if not drop_uid:
        return sys.executable
    base = getattr(sys, "_base_executable", sys.executable)
    for candidate in (sys.executable, base, "/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_executable(candidate):
            return candidate
    return ""


def _child_setup(workdir: str, uid: int | None, memory_mb: int, cpu_s: int) -> None:
    """Runs in the forked child before exec: namespaces, mounts, limits, then the uid switch.

    Only async-signal-safe-ish work: no imports, no locks; messages go straight to fd 2.
    """

    def note(msg: str) -> None:
        os.write(2, (_MARK + msg + "\n").encode())

    if _IS_ROOT:
        if _libc.unshare(_CLONE_NEWNET) == 0:
            note("ok netns")
        else:
            note(f"unavailable netns: {_errno_name()}")
        if _libc.unshare(_CLONE_NEWNS) != 0:
            note(f"unavailable mountns: {_errno_name()}")
        elif _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            # Without private propagation our mounts would leak to the host: do none.
            note(f"unavailable mountns: make-rprivate {_errno_name()}")
        else:
            # /tmp last: once the work folder sits on /tmp its old path (under /tmp) no longer resolves.
            bound = []
            for target in _PRIVATE_DIRS[::-1]:
                if not os.path.isdir(target):
                    continue
                if _libc.mount(workdir.encode(), target.encode(), None, _MS_BIND, None) == 0:
                    bound.append(target)
                else:
                    note(f"unavailable mountns: bind {target} {_errno_name()}")
            if "/tmp" in bound:
                os.chdir("/tmp")  # the cwd subprocess set is the same folder, through the soon read-only /
                flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
                if _libc.mount(b"none", b"/", None, flags, None) == 0:
                    note("ok mountns")
                else:
                    note(f"unavailable mountns: read-only / {_errno_name()}")
    else:
        # Unprivileged: a user namespace lets us drop the network without root.
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
            note("ok netns")
        else:
            note(f"unavailable netns: {_errno_name()}")
    limit_bytes = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        note("ok uid")


def _kill_uid(uid: int) -> None:
    """Kill every process owned by ``uid`` in one atomic ``kill(-1)`` from a child with that uid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_output(f) -> str:
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")  # at most FILE_SIZE_LIMIT_BYTES


def _truncate(text: str, *, keep_end: bool) -> str:
    if len(text) <= OUTPUT_LIMIT_CHARS:
        return text
    if keep_end:
        return "[truncated]...\n" + text[-OUTPUT_LIMIT_CHARS:]
    return text[:OUTPUT_LIMIT_CHARS] + "\n...[truncated]"


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = {
            "SIGXCPU": " (CPU time limit)",
            "SIGXFSZ": " (file size limit)",
            "SIGKILL": " (killed: memory or CPU limit)",
            "SIGSEGV": " (crashed, possibly out of memory)",
        }.get(name, "")
        return f"killed by {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return f"exit code {returncode}: {last}" if last else f"exit code {returncode}"


def _execute(
    files: dict[str, str],
    args: list[str],
    *,
    timeout_s: float,
    memory_mb: int,
    cpu_s: float | None,
    pass_fds: tuple[int, ...] = (),
) -> SandboxResult:
    """Write ``files`` to a fresh folder and run ``python -I *args`` there, fenced in; judge by exit status."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}.")
    cpu_limit = max(1, int(cpu_s if cpu_s is not None else timeout_s + 1))
    uid = _free_uids.get() if _IS_ROOT else None
    python = _pick_python(drop_uid=uid is not None)
    unavailable: list[str] = []
    if uid is not None and not python:
        _free_uids.put(uid)
        uid, python = None, sys.executable
        unavailable.append("uid: no Python interpreter that other users may run")
    workdir = ""
    try:
        workdir = tempfile.mkdtemp(prefix="mlpo-sandbox-")
        for name, text in files.items():
            Path(workdir, name).write_text(text, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
        # In the mount namespace /tmp *is* the work folder; otherwise point at the folder's real path.
        home = "/tmp" if _mount_namespace_works() else workdir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [python, "-I", *args],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=pass_fds,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(workdir, uid, memory_mb, cpu_limit),
            )
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            _kill_group(proc.pid)
            if uid is not None:
                _kill_uid(uid)
            if timed_out:
                proc.wait()
            stdout = _truncate(_read_output(out), keep_end=False)
            raw_err = _read_output(err)
    except (OSError, subprocess.SubprocessError) as e:
        return SandboxResult(
            False, None, False, "", "", f"sandbox error: could not run: {e}", (), tuple(unavailable)
        )
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _free_uids.put(uid)

    isolation: list[str] = []
    err_lines = []
    for line in raw_err.split("\n"):
        if line.startswith(_MARK):
            status, _, rest = line[len(_MARK) :].strip().partition(" ")
            (isolation if status == "ok" else unavailable).append(rest)
        else:
            err_lines.append(line)
    stderr = _truncate("\n".join(err_lines), keep_end=True)
    if timed_out:
        reason = f"timeout after {timeout_s:g}s"
    elif returncode == 0:
        reason = "passed"
    else:
        assert returncode is not None
        reason = _failure_reason(returncode, stderr)
    return SandboxResult(
        passed=returncode == 0 and not timed_out,
        returncode=returncode,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        reason=reason,
        isolation=tuple(isolation),
        unavailable=tuple(unavailable),
    )


def run_program(
    code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None
) -> SandboxResult:
    """Run ``code`` as a Python program in a sandbox; never raises for anything the program does."""
    return _execute({"main.py": code}, ["main.py"], timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s)
