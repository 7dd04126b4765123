"""Picking a bindable port from a worker's block (a port of the last job may sit in TIME_WAIT)."""
from __future__ import annotations

import logging
import socket
from contextlib import closing
from collections.abc import Iterable

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> int | None:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((host, port))
            return s.getsockname()[1]
        except OSError:
            return None


def first_free_port(host: str, candidates: Iterable[int], what: str, setting: str) -> int:
    """The first candidate that binds (without SO_REUSEADDR, as the frameworks bind); past the end of
    the block an OS-chosen port, with a warning naming the setting to widen. Ports are published at
    the barrier, so peers learn whichever port was taken."""
    tried = []
    for port in candidates:
        if _bind(host, port) is not None:
            return port
        tried.append(port)
    port = _bind(host, 0)
    if port is None:
        raise RuntimeError(f"cannot bind a {what} port on {host}")
    log.warning("every %s port of the block is busy or in TIME_WAIT (%s); using port %s (widen %s "
                "where firewalls allow only the block)", what, tried, port, setting)
    return port
