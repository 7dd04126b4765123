"""Job and worker state models. Transitions of JobState are documented here, once.

    PENDING ──reserve gang──▶ RUNNING ──all ranks ok──▶ SUCCEEDED
       ▲                        │ ──a rank failed, retryable, attempts left──▶ PENDING (next attempt)
       │                        │ ──a rank failed otherwise──▶ FAILED
       │                        └──cancel──▶ CANCELLED
       ├──cancel──▶ CANCELLED
       └──invalid / can never be placed / placement deadline──▶ FAILED
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any


class JobState(str, enum.Enum):
    SUBMITTED = "SUBMITTED"   # sent to the coordinator, not yet persisted by it
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SUBMITTED: frozenset({JobState.PENDING, JobState.FAILED, JobState.CANCELLED}),
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class RankState(str, enum.Enum):
    ASSIGNED = "ASSIGNED"
    FETCHING = "FETCHING"
    WAITING = "WAITING"       # at the barrier
    TRAINING = "TRAINING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


class WorkerState(str, enum.Enum):
    IDLE = "idle"
    RESERVED = "reserved"
    DRAINING = "draining"   # shutting down: takes no new gang
    DEAD = "dead"


@dataclass(frozen=True)
class WorkerInfo:
    """What a trainer worker advertises when it registers."""

    worker_id: str
    host: str
    address: str
    queue: str
    port_lo: int
    port_hi: int
    cpus: int
    gpus: tuple[str, ...] = ()
    pid: int = 0
    started_at: float = 0.0
    metrics_url: str = ""

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerInfo:
        data = json.loads(text)
        data["gpus"] = tuple(data.get("gpus", ()))
        return cls(**data)


@dataclass(frozen=True)
class WorkerView:
    """A worker as the scheduler sees it in one snapshot."""

    info: WorkerInfo
    alive: bool
    job_id: str = ""
    draining: bool = False

    @property
    def free(self) -> bool:
        return self.alive and not self.job_id and not self.draining

    @property
    def state(self) -> WorkerState:
        if not self.alive:
            return WorkerState.DEAD
        if self.draining:
            return WorkerState.DRAINING
        return WorkerState.RESERVED if self.job_id else WorkerState.IDLE


@dataclass(frozen=True)
class Resources:
    """What a job asks of the fleet."""

    num_workers: int = -1          # -1: every free worker, at least one
    use_gpu: bool | None = None    # None: GPU when the whole gang can be GPU
    num_cpu_per_worker: int = -1   # -1: all the worker's CPUs
    num_nodes: int = 0             # >0: the gang spans exactly this many hosts ...
    workers_per_node: int = 0      # ... with this many workers on each
    gpus_per_worker: int = 0       # >0: each rank needs a worker owning at least this many GPUs (a GPU gang)


@dataclass
class JobSpec:
    """Everything the fleet needs to run one job; JSON on the wire and in Redis."""

    job_id: str
    framework: str
    resources: Resources
    datasets: dict[str, dict]                   # name -> {"uri":..., "sharded": bool, "equal": bool}
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)   # framework options: rounds, cols, ...
    priority: int = 0
    submitted_at: float = 0.0
    max_failures: int = 1          # retries after infrastructure failures (see coordinator.policy)
    timeout: float = 0.0           # whole-job deadline in seconds from submission; 0 = none
    signature: str = ""            # HMAC of the rest, when GANGWAY_SECRET is set (common.signing)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data)

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = dict(data)
        data["resources"] = Resources(**data["resources"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Placement:
    """A gang chosen for a job: worker ids in rank order, and whether it is a GPU gang."""

    job_id: str
    worker_ids: tuple[str, ...]
    use_gpu: bool


@dataclass(frozen=True)
class Rendezvous:
    """Computed up front from the reserved workers' port blocks."""

    world_size: int
    master_addr: str
    master_port: int
    tracker_host: str
    tracker_port: int
    machines: tuple[str, ...]      # LightGBM "ip:port" per rank
    listen_ports: tuple[int, ...]
    tracker_ports: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Rendezvous:
        d = dict(d)
        d["machines"] = tuple(d["machines"])
        d["listen_ports"] = tuple(d["listen_ports"])
        d["tracker_ports"] = tuple(d.get("tracker_ports", ()))
        return cls(**d)
