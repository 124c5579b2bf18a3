"""The suite's network guard (tests/conftest.py) refuses non-loopback sockets and allows loopback."""

import socket
import threading

import pytest

from tests.conftest import ATTEMPTS, NetworkBlocked, is_local


def test_non_loopback_connections_are_refused_and_recorded():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("203.0.113.7", 443), timeout=1)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlocked):
        s.connect(("2001:db8::1", 80, 0, 0))
    with socket.socket() as s, pytest.raises(NetworkBlocked):
        s.connect_ex(("example.com", 80))
    assert len(ATTEMPTS) == 3
    ATTEMPTS.clear()  # recorded on purpose here; the autouse fixture would fail the test otherwise


def test_loopback_and_unix_sockets_work(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        socket.create_connection(("localhost", port), timeout=5).close()
        accepted.join(5)
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    assert all(is_local(socket.AF_INET, (h, 1)) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "::ffff:127.0.0.1"))
    assert not any(is_local(socket.AF_INET, (h, 1)) for h in ("10.0.0.1", "huggingface.co", "mermaid.ink"))


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")])
def test_the_package_keeps_hugging_face_offline_unless_told(given, seen):
    """TRL's trainers call the hub on their own when HF_HUB_OFFLINE is unset (the guard caught it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if given is not None:
        env["HF_HUB_OFFLINE"] = given
    out = subprocess.run(
        [sys.executable, "-c", "import os, mlpo_agents; print(os.environ['HF_HUB_OFFLINE'])"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == seen
