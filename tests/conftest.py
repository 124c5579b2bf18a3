"""Suite-wide guard: no test may open a socket to anything but this machine (loopback or AF_UNIX).

`socket.socket.connect`, `connect_ex` and `socket.create_connection` refuse other addresses with
`NetworkBlocked` (an OSError, so code under test takes its offline path) and record the attempt; the
test then fails even if the code swallowed the error. The vllm and postgres tiers talk to servers on
127.0.0.1, which stays allowed. Child processes are not covered (they are separate interpreters).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

ATTEMPTS: list[str] = []
"""Non-loopback connections tried during the current test."""


class NetworkBlocked(ConnectionRefusedError):
    """A test tried to reach a non-loopback address."""


def is_local(family: int, address: Any) -> bool:
    """Whether a connect() target stays on this machine."""
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return True
    host = str(address[0]).split("%")[0]
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a hostname: resolving it could already leave the machine
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or bool(mapped and mapped.is_loopback)


def _check(family: int, address: Any) -> None:
    if not is_local(family, address):
        ATTEMPTS.append(repr(address))
        raise NetworkBlocked(f"test network guard: connection to {address!r} refused (tests stay on loopback)")


_connect, _connect_ex, _create_connection = socket.socket.connect, socket.socket.connect_ex, socket.create_connection


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(self.family, address)
    return _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(self.family, address)
    return _connect_ex(self, address)


def _guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    _check(socket.AF_INET, address)
    return _create_connection(address, *args, **kwargs)


# Installed at import, before any fixture (module-scoped servers included) opens a socket.
socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
socket.create_connection = _guarded_create_connection  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def no_network():
    """Fail the test when it tried to reach the network, even if the code under test caught the error."""
    ATTEMPTS.clear()
    yield
    tried, ATTEMPTS[:] = list(ATTEMPTS), []
    if tried:
        pytest.fail(f"test tried to open non-loopback connections: {', '.join(tried)}", pytrace=False)
