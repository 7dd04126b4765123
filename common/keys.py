"""Every Redis key gangway uses, in one place."""
from __future__ import annotations

PREFIX = "gw:"

WORKERS = PREFIX + "workers"                 # set of registered worker ids
PENDING = PREFIX + "pending"                 # zset job_id -> ordering score (priority, then FIFO)
JOBS = PREFIX + "jobs"                       # zset job_id -> submit time, for listing
SEQ = PREFIX + "seq"                         # FIFO counter
FENCE = PREFIX + "fence"                     # fencing-token counter
SCHEDULE_LOCK = PREFIX + "lock:schedule"
ABORT_CHANNEL = PREFIX + "abort"             # pub/sub: "<job_id>:<token>"
JOB_ENDED_CHANNEL = PREFIX + "job-ended"     # pub/sub: "<job_id>" once it ended and once its artifacts are published
COORDINATOR_ALIVE = PREFIX + "coordinator:alive"
COORDINATOR_INFO = PREFIX + "coordinator:info"   # hash: metrics_url, host, pid (of the newest coordinator)
RUNNING = PREFIX + "running"                 # set of job ids holding a gang
STAGED = PREFIX + "staged"                   # hash "<job_id>:<token>" -> JSON staged artifact upload (see common/artifacts.py)
STAGING_SCANNED = PREFIX + "staging:scanned"  # the Redis run_id whose staging area was last scanned for orphans
CHECKPOINTED = PREFIX + "checkpointed"       # set of GBDT job ids with checkpoints in the store (swept once ended)
DEADLINES = PREFIX + "deadlines"             # zset job_id -> whole-job deadline (Redis clock), jobs with a timeout
FREE = PREFIX + "free"                       # set of worker ids registered, not draining, holding no job (kept by
                                             # the scripts; liveness is checked for the workers a pass picks)
REGISTRY_EPOCH = PREFIX + "registry:epoch"   # random value, new whenever a registration (info) is added or removed

COORDINATOR_QUEUE = "gangway.coordinator"


def worker(worker_id: str) -> str:
    """Hash: info (JSON), job, token, lease."""
    return f"{PREFIX}worker:{worker_id}"


def worker_alive(worker_id: str) -> str:
    """Heartbeat key with a TTL; its absence means the worker is dead."""
    return f"{PREFIX}worker:{worker_id}:alive"


def worker_queue(worker_id: str) -> str:
    return f"gangway.worker.{worker_id}"


def job(job_id: str) -> str:
    """Hash: spec, state, attempt, token, gang, error, timings."""
    return f"{PREFIX}job:{job_id}"


def job_submitted(job_id: str) -> str:
    """String, set by the producer when it sends the submit: the job exists even before it is persisted."""
    return f"{PREFIX}submitted:{job_id}"


def job_ranks(job_id: str) -> str:
    """Hash rank -> JSON rank status of the current attempt (emptied when an attempt is reserved)."""
    return f"{PREFIX}job:{job_id}:ranks"


def job_log(job_id: str) -> str:
    """List of log/eval lines, appended by ranks (fenced)."""
    return f"{PREFIX}job:{job_id}:log"


def barrier(job_id: str, token: int | str) -> str:
    return f"{PREFIX}job:{job_id}:barrier:{token}"


def deliveries(job_id: str, token: int | str) -> str:
    """Hash rank -> how many times its train_rank task was delivered (proof of no redelivery)."""
    return f"{PREFIX}job:{job_id}:deliveries:{token}"


def job_done(job_id: str, token: int | str) -> str:
    """Set of the ranks of attempt ``token`` that reported success to the coordinator."""
    return f"{PREFIX}job:{job_id}:done:{token}"


def rank_lease(job_id: str, token: int | str, rank: int | str) -> str:
    """Key with a TTL: present while rank ``rank`` of attempt ``token`` holds its lease (set at reservation,
    renewed by every fenced write of the rank)."""
    return f"{PREFIX}job:{job_id}:lease:{token}:{rank}"


def job_checkpoints(job_id: str) -> str:
    """Hash rounds -> object key of the checkpoints a retry may resume from (recorded fenced, by rank 0)."""
    return f"{PREFIX}job:{job_id}:checkpoints"


def job_keys(job_id: str) -> list[str]:
    return [job(job_id), job_ranks(job_id), job_log(job_id)]
