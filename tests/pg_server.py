"""A throwaway PostgreSQL server on loopback for tests (initdb into a temp dir, trust auth)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    """Whether PostgreSQL server binaries and psycopg are installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; run the server as the `postgres` system user when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server on a free loopback port; yields an admin URL; stops and deletes it afterwards."""
    folder = tempfile.mkdtemp(prefix="mlpo-pg-")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = os.path.join(folder, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(_as_postgres([_bin("initdb") or "initdb", "-D", data, "--auth=trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    log = os.path.join(folder, "server.log")
    subprocess.run(
        _as_postgres([_bin("pg_ctl") or "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
                      f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]),
        check=True, capture_output=True,
    )
    try:
        deadline = time.time() + 30
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        import psycopg

        while True:
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run(_as_postgres([_bin("pg_ctl") or "pg_ctl", "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
