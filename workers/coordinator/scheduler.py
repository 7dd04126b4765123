"""Scheduling decisions as pure functions over plain data (no Redis, no Celery).

Policy: pending jobs are taken in priority order, then FIFO. A pass places jobs
until the first one that cannot be placed now; that job blocks the jobs behind
it, so a large gang is never starved by a stream of small ones (no backfill).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence

from common.models import JobSpec, Placement, Rendezvous, Resources, WorkerView

_PRIORITY_SPAN = 2 ** 40


def pending_score(priority: int, seq: int) -> float:
    """Redis zset score: higher priority first, then submission order."""
    return float(-priority * _PRIORITY_SPAN + seq)


class Action(str, enum.Enum):
    PLACE = "place"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    job_id: str
    action: Action
    placement: Placement | None = None
    reason: str = ""


def _eligible(resources: Resources, workers: Iterable[WorkerView]) -> list[WorkerView]:
    """Workers that own what one rank asks for: CPUs, and GPUs when a rank needs several."""
    need_cpus, need_gpus = resources.num_cpu_per_worker, resources.gpus_per_worker
    return [w for w in workers if (need_cpus <= 0 or w.info.cpus >= need_cpus)
            and (need_gpus <= 1 or w.info.num_gpus >= need_gpus)]


def _rank_order(workers: Iterable[WorkerView]) -> list[WorkerView]:
    # Workers of one host get consecutive ranks (local ranks follow), stable by id.
    return sorted(workers, key=lambda w: (w.info.host, w.info.worker_id))


def infeasibility(resources: Resources, workers: Sequence[WorkerView], *, registered: bool = False) -> str:
    """Why the fleet can *never* run this gang (counting busy workers), or ''.

    By default the fleet is the live, non-draining workers of this snapshot (the caller's quick
    check). With ``registered=True`` it is every registered worker, live or not: a heartbeat gap, a
    restart or a rolling drain takes capacity away only for a moment, so the coordinator judges
    "never" against what is registered (dead registrations leave after GANGWAY_DEAD_WORKER_TTL)."""
    if registered:
        pool = list(workers)
        counted = "registered"
    else:
        pool = [w for w in workers if w.alive and not w.draining]   # draining workers are leaving
        counted = "live"
    n = resources.num_workers
    if n == 0 or n < -1:
        return f"num_workers must be -1 (all free workers) or >= 1, got {n}"
    if not pool:
        return (f"the fleet has no {counted} trainer worker (start one with `gangway up` or "
                "`gangway worker`)")
    eligible = _eligible(resources, pool)
    if not eligible:
        if resources.gpus_per_worker > 1 and resources.num_cpu_per_worker <= 0:
            return (f"num_gpus={resources.gpus_per_worker} per worker requested but the fleet's workers own at "
                    f"most {max(w.info.num_gpus for w in pool)} GPUs each (`gangway up --gpus-per-worker K` "
                    f"gives a worker K GPUs)")
        return (f"num_cpu_per_worker={resources.num_cpu_per_worker}"
                + (f" and num_gpus={resources.gpus_per_worker}" if resources.gpus_per_worker > 1 else "")
                + f" but the largest worker has {max(w.info.cpus for w in pool)} CPUs and "
                  f"{max(w.info.num_gpus for w in pool)} GPUs")
    gpu_workers = [w for w in eligible if w.info.num_gpus > 0]
    if resources.use_gpu is True:
        if not gpu_workers:
            return (f"use_gpu=True but the fleet has no GPU worker "
                    f"({len(pool)} {counted} workers, all CPU-only)")
        if n > len(gpu_workers):
            return (f"num_workers={n} GPU workers requested but the fleet has "
                    f"{len(gpu_workers)} GPU workers ({len(pool)} workers in all)")
    if n > len(eligible):
        return (f"num_workers={n} requested but the fleet has {len(eligible)} eligible workers "
                f"({sum(w.alive and not w.draining for w in workers)} live, {len(workers)} registered)")
    if resources.num_nodes > 0:
        per_host = _per_host(gpu_workers if resources.use_gpu else eligible)
        big_enough = [h for h, ws in per_host.items() if len(ws) >= resources.workers_per_node]
        if len(big_enough) < resources.num_nodes:
            return (f"num_nodes={resources.num_nodes} x num_workers_per_node={resources.workers_per_node} "
                    f"requested but the fleet's eligible workers per host are "
                    f"{ {h: len(ws) for h, ws in sorted(per_host.items())} }")
    return ""


def _per_host(workers: Iterable[WorkerView]) -> dict[str, list[WorkerView]]:
    out: dict[str, list[WorkerView]] = {}
    for w in _rank_order(workers):
        out.setdefault(w.info.host, []).append(w)
    return out


def _topology_gang(resources: Resources, pool: Sequence[WorkerView]) -> list[WorkerView] | None:
    """``num_nodes`` hosts with ``workers_per_node`` free workers each (fewest spare first)."""
    per_host = {h: ws for h, ws in _per_host(pool).items() if len(ws) >= resources.workers_per_node}
    if len(per_host) < resources.num_nodes:
        return None
    hosts = sorted(per_host, key=lambda h: (len(per_host[h]), h))[:resources.num_nodes]
    return [w for h in sorted(hosts) for w in per_host[h][:resources.workers_per_node]]


def select_gang(job_id: str, resources: Resources, workers: Sequence[WorkerView]) -> Placement | None:
    """Pick a whole gang from the free workers, or None when it does not fit now."""
    free = _eligible(resources, [w for w in workers if w.free])
    gpu_free = [w for w in free if w.info.num_gpus > 0]
    cpu_first = sorted(free, key=lambda w: w.info.num_gpus > 0)   # keep GPUs for GPU gangs
    n = resources.num_workers
    if resources.use_gpu is True:
        pool, use_gpu = gpu_free, True
    elif resources.use_gpu is False:
        pool, use_gpu = cpu_first, False
    else:
        want = len(free) if n == -1 else n
        if gpu_free and len(gpu_free) >= want:
            pool, use_gpu = gpu_free, True
        else:
            pool, use_gpu = cpu_first, False
    if resources.num_nodes > 0:
        gang = _topology_gang(resources, pool)
        if gang is None:
            return None
        return Placement(job_id=job_id, worker_ids=tuple(w.info.worker_id for w in gang), use_gpu=use_gpu)
    want = len(pool) if n == -1 else n
    if want < 1 or len(pool) < want:
        return None
    gang = _rank_order(pool[:want])
    return Placement(job_id=job_id, worker_ids=tuple(w.info.worker_id for w in gang), use_gpu=use_gpu)


@dataclass(frozen=True)
class Fleet:
    """The fleet as a scheduling pass sees it, without reading every worker.

    ``registered``: every registered worker (what a gang can *never* exceed); ``free``: the workers a gang
    may take now (live, not draining, holding no job); ``live``: how many workers are live, when the
    caller knows (else the waiting reason counts registered ones); ``holders``: jobs holding workers."""

    registered: Sequence[WorkerView]
    free: Sequence[WorkerView]
    live: int | None = None
    holders: tuple[str, ...] = ()


def fleet_of(workers: Sequence[WorkerView]) -> Fleet:
    """A ``Fleet`` from a full snapshot of every worker."""
    return Fleet(registered=workers, free=[w for w in workers if w.free], live=sum(w.alive for w in workers),
                 holders=tuple(sorted({w.job_id for w in workers if w.alive and w.job_id})))


def plan_pass(pending: Sequence[JobSpec], workers: Sequence[WorkerView]) -> list[Decision]:
    """Decisions for one scheduling pass over jobs already in priority/FIFO order, from a full snapshot."""
    return plan_fleet(pending, fleet_of(workers))


def plan_fleet(pending: Sequence[JobSpec], fleet: Fleet,
               never_fits: Callable[[Resources], str] | None = None) -> list[Decision]:
    """Decisions for one scheduling pass over jobs already in priority/FIFO order.

    FAIL means the job can never fit the *registered* fleet; one that fits it but not the free
    workers of this moment waits (the coordinator bounds that wait with the placement deadline).
    ``never_fits`` (default: ``infeasibility`` over ``fleet.registered``) lets a caller that keeps
    the registered fleet between passes remember its verdict per resource request."""
    if never_fits is None:
        def never_fits(resources: Resources) -> str:
            return infeasibility(resources, fleet.registered, registered=True)
    decisions: list[Decision] = []
    free = list(fleet.free)
    for spec in pending:
        reason = never_fits(spec.resources)
        if reason:
            decisions.append(Decision(spec.job_id, Action.FAIL, reason=reason))
            continue
        placement = select_gang(spec.job_id, spec.resources, free)
        if placement is None:
            live = fleet.live
            decisions.append(Decision(spec.job_id, Action.WAIT, reason=shortage_counts(
                spec.resources, len(free), live if live is not None else len(fleet.registered),
                fleet.holders, counted="live" if live is not None else "registered")))
            break
        taken = set(placement.worker_ids)
        free = [w for w in free if w.info.worker_id not in taken]
        decisions.append(Decision(spec.job_id, Action.PLACE, placement=placement))
    return decisions


def shortage(resources: Resources, workers: Sequence[WorkerView]) -> str:
    """Which resource is short right now, in words (for status and deadline errors)."""
    fleet = fleet_of(workers)
    return shortage_counts(resources, len(fleet.free), fleet.live or 0, fleet.holders)


def shortage_counts(resources: Resources, free: int, of: int, holders: Sequence[str],
                    counted: str = "live") -> str:
    """``shortage`` from counts: ``free`` of ``of`` ``counted`` workers are free, ``holders`` hold the rest."""
    want = "all free workers" if resources.num_workers == -1 else f"{resources.num_workers} workers"
    kind = " with a GPU" if resources.use_gpu else ""
    holders = sorted(holders)
    held = f" (held by job {', '.join(holders[:3])}{' …' if len(holders) > 3 else ''})" if holders else ""
    return f"waiting for {want}{kind}: {free} of {of} {counted} workers are free{held}"


def compute_rendezvous(gang: Sequence[WorkerView]) -> Rendezvous:
    """Every address and port of the collective, from the workers' port blocks.

    Port block layout per worker: +0 torch MASTER_PORT, +2 LightGBM listen port,
    +1 and +3.. XGBoost tracker candidates: rank 0 binds the first free one (a port
    the previous job's tracker just closed sits in TIME_WAIT) and publishes it at the barrier.
    """
    if not gang:
        raise ValueError("a rendezvous needs at least one worker")
    head = gang[0].info
    return Rendezvous(
        world_size=len(gang),
        master_addr=head.address,
        master_port=head.port_lo,
        tracker_host=head.address,
        tracker_port=head.port_lo + 1,
        tracker_ports=(head.port_lo + 1, *range(head.port_lo + 3, head.port_hi + 1)),
        machines=tuple(f"{w.info.address}:{w.info.port_lo + 2}" for w in gang),
        listen_ports=tuple(w.info.port_lo + 2 for w in gang),
    )
