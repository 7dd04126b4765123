"""Which network interface holds an address (Linux): torch's gloo binds by interface name, and by default
resolves the hostname, which on a host whose name is not in DNS (a container, a namespace) finds nothing
or a loopback address peers cannot dial."""
from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915


def interface_of(address: str) -> str | None:
    """The name of the interface whose IPv4 address is ``address``, or None."""
    for _, name in socket.if_nameindex():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:   # no IPv4 address on it
            continue
        if socket.inet_ntoa(raw[20:24]) == address:
            return name
    return None
