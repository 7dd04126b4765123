"""Real hosts on one machine: a bridge, and per host a network namespace with its own address, its own
hostname (UTS namespace), ``GANGWAY_HOME`` and temp dir. Processes start with ``ip netns exec``; the
harness removes every namespace, link and process it made, by name and by PID.

The control host is the root namespace, on the bridge's address; worker hosts are namespaces behind
veth pairs on that bridge. ``Host.partition()`` takes a host's link down; ``Host.delay(ms)`` adds netem latency.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def namespaces_unavailable() -> str:
    """'' when this process may create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "iproute2's `ip` and util-linux's `unshare` are needed"
    probe = f"gwprobe{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` is not permitted here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def netem_unavailable() -> str:
    """'' when ``tc qdisc … netem`` works here, else why not (a kernel without ``sch_netem``)."""
    probe = f"gwnetem{os.getpid()}"
    if subprocess.run(["ip", "link", "add", probe, "type", "veth", "peer", "name", probe + "p"],
                      capture_output=True).returncode != 0:
        return "cannot create a veth pair to probe netem"
    try:
        out = subprocess.run(["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"],
                             capture_output=True, text=True)
        return "" if out.returncode == 0 else f"tc netem is not available in this kernel: {out.stderr.strip()}"
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)


@dataclass
class Host:
    name: str          # hostname inside its UTS namespace
    ns: str            # network namespace
    address: str
    veth: str          # the root-side end of its link
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """``cmd`` inside this host: its namespace, its hostname, its home and temp dir."""
        tmp = self.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**env, "GANGWAY_HOME": str(self.home), "TMPDIR": str(tmp)}
        wrapped = ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', self.name, *cmd]
        out = open(log, "ab")
        proc = subprocess.Popen(wrapped, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def partition(self) -> None:
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")

    def cut_from(self, address: str) -> None:
        """Drop this host's packets to ``address`` silently (a partition from that host alone)."""
        _ip("route", "add", "blackhole", f"{address}/32", ns=self.ns)

    def rejoin(self, address: str) -> None:
        _ip("route", "del", "blackhole", f"{address}/32", ns=self.ns, check=False)

    def delay(self, ms: int) -> None:
        subprocess.run(["tc", "qdisc", "replace", "dev", self.veth, "root", "netem", "delay", f"{ms}ms"], check=True)

    def undelay(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self.veth, "root"], capture_output=True)

    def stop(self, grace: float = 60.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)   # `gangway up` stops what it started
        for proc in self.procs:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class Network:
    """A bridge with the control host's address and ``n`` worker hosts; use as a context manager."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        self.tag, self.n = tag, n
        self.bridge = f"gwbr{tag}"
        subnet = random.randrange(16, 250)
        self.prefix = f"10.213.{subnet}"
        self.control = f"{self.prefix}.1"
        self.root = Path(tempfile.mkdtemp(prefix=f"gangway-hosts-{tag}-"))
        self.hosts: list[Host] = []

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.control}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(1, self.n + 1):
                self.hosts.append(self._add_host(i))
            self._write_name_service()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _add_host(self, i: int) -> Host:
        ns, veth, peer = f"gw{self.tag}h{i}", f"gwv{self.tag}h{i}", f"gwp{self.tag}h{i}"
        address = f"{self.prefix}.{10 + i}"
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("addr", "add", f"{address}/24", "dev", peer, ns=ns)
        _ip("link", "set", peer, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("route", "add", "default", "via", self.control, ns=ns)
        home = self.root / f"host{i}"
        home.mkdir()
        return Host(f"host{i}", ns, address, veth, home)

    def _write_name_service(self) -> None:
        """``ip netns exec`` bind-mounts /etc/netns/<ns>/{hosts,resolv.conf}: every host resolves the others'
        names as on a LAN with DNS, and a lookup the LAN cannot answer fails at once instead of waiting on
        a nameserver the namespace cannot reach (c10d looks up every peer's name)."""
        hosts = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts) + \
            f"{self.control} control\n"
        for h in self.hosts:
            folder = Path("/etc/netns") / h.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts)
            (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            host.stop()
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host.ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
