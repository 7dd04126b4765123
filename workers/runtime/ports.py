"""Picking a bindable port from a worker's block (a port of the last job may sit in TIME_WAIT)."""
from __future__ import annotations

import socket
from contextlib import closing
from typing import Iterable


def first_free_port(host: str, candidates: Iterable[int], what: str, setting: str) -> int:
    """The first candidate that binds (without SO_REUSEADDR, as the frameworks bind), or an error
    naming the setting to widen."""
    tried = []
    for port in candidates:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                tried.append(port)
    raise RuntimeError(f"no free {what} port on {host}: tried {tried} (widen {setting})")
