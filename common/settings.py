"""Settings: one frozen object built from ``GANGWAY_*`` env, passed down explicitly."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from common.errors import ConfigurationError

ENV_PREFIX = "GANGWAY_"


def _default_home() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gangway")


@dataclass(frozen=True)
class Settings:
    """Every knob of gangway; field ``x_y`` reads env ``GANGWAY_X_Y``."""

    # Defaults avoid 6379/9000 so the embedded fleet never lands on a system service.
    broker_url: str = field(default="redis://127.0.0.1:6399/0", repr=False)
    s3_endpoint: str = "http://127.0.0.1:8399"
    s3_access_key: str = field(default="gangway", repr=False)
    s3_secret_key: str = field(default="gangway-secret", repr=False)
    s3_secure: bool = False
    secret: str = field(default="", repr=False)   # HMAC key for job specs; empty = no signing
    s3_region: str = "us-east-1"
    data_bucket: str = "gangway-data"
    artifact_bucket: str = "gangway-artifacts"
    # Port block of one worker "first-last"; the local fleet gives worker i the i-th block.
    worker_ports: str = "29500-29509"
    worker_id: str = ""
    worker_host: str = ""          # the address peers dial; "" = this host's address on the route to the broker
    bind: str = "127.0.0.1"        # where `gangway up` binds the Redis and S3 it starts (not loopback: a password)
    worker_gpus: str = ""          # "" = detect; "none" = no GPU; "0" = CUDA device 0
    worker_cpus: int = 0           # 0 = all cores of the host / number of workers
    metrics_port: int = 0          # 0 = no metrics endpoint
    home: str = field(default_factory=_default_home)
    cache_bytes: int = 2 * 1024**3
    chunk_rows: int = 65536
    chunk_bytes: int = 32 * 1024**2   # a wide table's chunks get fewer rows than chunk_rows, to stay under this
    fetch_threads: int = 8
    # What a producer's upload holds in memory at most (chunks being serialised, hashed and sent, each
    # with its serialised copy): fewer chunks in flight than fetch_threads when chunks are big (wide rows)
    upload_memory: str = "128MiB"
    heartbeat_interval: float = 2.0
    heartbeat_ttl: float = 10.0
    schedule_interval: float = 2.0
    rendezvous_timeout: float = 60.0
    placement_timeout: float = 300.0
    lease_seconds: float = 30.0
    job_ttl_days: float = 7.0
    kill_grace: float = 3.0
    publish_timeout: float = 60.0  # wait()/result() wait this long for a succeeded job's artifacts to be published
    max_failures: int = 1          # default retries of a job after infrastructure failures
    visibility_timeout: float = 300.0  # Redis redelivers an unacknowledged (coordinator) task after this
    checkpoint_rounds: int = 10    # GBDT jobs checkpoint the booster every this many rounds; 0 = never
    checkpoint_keep: int = 2       # a GBDT job keeps its newest this many checkpoints (0 = all) until it ends
    # ... and no sooner than this many seconds of training after the start or the last checkpoint: a job
    # that trains for less writes none (a retry redoes less than this); 0 = every checkpoint_rounds rounds
    checkpoint_seconds: float = 10.0
    drain_grace: float = 60.0      # a SIGTERMed worker's running rank may finish this long, then is retried
    dead_worker_ttl: float = 600.0  # a worker dead (no heartbeat) this long is dropped from the registry
    progress_timeout: float = 600.0  # a rank silent this long (no round, no event) is hung; 0 = never
    echo_ranks: str = "0"          # whose printed output fit()/run() echo at the caller: "0", "all", "0,3"
    redis_outage_seconds: float = 30.0  # the fleet's processes ride out a Redis that does not answer this long
    redis_socket_timeout: float = 30.0  # a Redis command or broker publish unanswered this long fails (no hang on
                                        # a half-open connection: a partition, a failover, a NAT timeout)
    store_outage_seconds: float = 30.0  # S3 calls ride out a store that does not answer this long
    zygote: bool = True            # each worker forks training children from one warm zygote; 0 = spawn each
    zygote_timeout: float = 60.0   # a fork request unanswered this long (the zygote hung): spawn, restart it
    redis_appendfsync: str = "everysec"  # the embedded Redis' AOF fsync policy (always|everysec|no); off = no AOF
    # Memory of one worker's whole process tree, e.g. "1GiB"; "" = its cgroup's limit, else the host's
    # memory / the workers on it. A shard that does not fit in core trains out of core.
    worker_memory: str = ""
    out_of_core: str = "auto"      # auto: when the shard does not fit worker_memory; always; never

    def __post_init__(self) -> None:
        s3_url(self.s3_endpoint, self.s3_secure)   # a malformed endpoint fails here, in one line
        if not self.lease_seconds > 0:
            raise ConfigurationError(f"GANGWAY_LEASE_SECONDS must be more than 0 seconds, got {self.lease_seconds!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build from ``env`` (default ``os.environ``); ``overrides`` (CLI flags) win."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The env that reproduces these settings in a child process."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return out

    @property
    def port_block(self) -> tuple[int, int]:
        return parse_port_block(self.worker_ports)

    @property
    def redacted_broker_url(self) -> str:
        return redact_url(self.broker_url)

    @property
    def s3_url(self) -> str:
        """The S3 endpoint as a URL, whichever of the two accepted forms was configured."""
        return s3_url(self.s3_endpoint, self.s3_secure)

    @property
    def upload_memory_bytes(self) -> int:
        return parse_size(self.upload_memory, "GANGWAY_UPLOAD_MEMORY")

    @property
    def worker_memory_bytes(self) -> int | None:
        """``worker_memory`` in bytes, None when unset (the runtime then uses its default)."""
        return parse_size(self.worker_memory, "GANGWAY_WORKER_MEMORY") if self.worker_memory.strip() else None


def renew_period(lease_seconds: float) -> float:
    """How often a quiet rank renews a lease of ``lease_seconds``: every 3 s, or three times a lease when
    leases are shorter (a renewal every 3 s would land after a 3 s lease had lapsed)."""
    return min(3.0, lease_seconds / 3)


def s3_url(endpoint: str, secure: bool) -> str:
    """``host:port`` (MinIO's convention; https when ``secure``) or ``http(s)://host[:port]`` -> a URL."""
    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(f"GANGWAY_S3_ENDPOINT={endpoint!r} {why}: use 'host:port' (with "
                                  "GANGWAY_S3_SECURE=1 for TLS) or 'http://host:port' / 'https://host:port'")
    text = endpoint.strip()
    if "://" not in text:
        text = f"{'https' if secure else 'http'}://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise bad(f"has scheme {parts.scheme!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise bad("has more than a host and a port")
    try:
        port = parts.port
    except ValueError as exc:
        raise bad("has an invalid port") from exc
    if not parts.hostname:
        raise bad("names no host")
    scheme = "https" if secure else parts.scheme
    return f"{scheme}://{parts.hostname if ':' not in parts.hostname else f'[{parts.hostname}]'}" + \
        (f":{port}" if port else "")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str, name: str = "size") -> int:
    """``"1GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"1000000"`` -> bytes."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ConfigurationError(f"{name} must be a size like '1GiB', '512MiB' or '2000000000', got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_port_block(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition("-")
        lo, hi = int(first), int(last or first)
    except ValueError as exc:
        raise ConfigurationError(f"GANGWAY_WORKER_PORTS must look like '29500-29509', got {text!r}") from exc
    if not (0 < lo <= hi < 65536) or hi - lo + 1 < 4:
        raise ConfigurationError(f"GANGWAY_WORKER_PORTS needs at least 4 ports in 1..65535, got {text!r}")
    return lo, hi


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _coerce(name: str, typ, raw: str):
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {typ}") from exc
    return raw


def advertised_host(settings: Settings) -> Settings:
    """``settings`` with ``worker_host`` filled in: the local address of the route to the broker, which is
    the address the broker's other clients (peers, the coordinator) can reach this host at."""
    if settings.worker_host:
        return settings
    import socket
    u = urlsplit(settings.broker_url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))   # UDP: picks the route and source address, sends nothing
            address = s.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    return settings.replace(worker_host=address)
