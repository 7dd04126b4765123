from common.models import JobSpec, Resources, WorkerInfo, WorkerView
from workers.coordinator.scheduler import (
    Action,
    compute_rendezvous,
    infeasibility,
    pending_score,
    plan_pass,
    select_gang,
)


def w(wid, host="h1", gpus=(), cpus=4, alive=True, job="", port=29500):
    return WorkerView(WorkerInfo(wid, host, f"10.0.0.{hash(host) % 200}", f"q.{wid}", port, port + 9, cpus,
                                 tuple(gpus)), alive, job)


def spec(job_id, n=2, gpu=None, prio=0):
    return JobSpec(job_id, "xgboost", Resources(n, gpu), {"train": {"uri": "s3://b/x/"}}, priority=prio)


def test_gang_is_not_reserved_if_one_worker_is_short():
    assert select_gang("j", Resources(3), [w("a"), w("b"), w("c", job="other")]) is None


def test_gang_takes_exactly_the_requested_number_of_free_workers():
    p = select_gang("j", Resources(2), [w("a"), w("b", job="x"), w("c"), w("d")])
    assert len(p.worker_ids) == 2 and "b" not in p.worker_ids and p.use_gpu is False


def test_minus_one_takes_every_free_worker_and_at_least_one():
    assert select_gang("j", Resources(-1), [w("a"), w("b"), w("c", alive=False)]).worker_ids == ("a", "b")
    assert select_gang("j", Resources(-1), [w("a", job="x")]) is None


def test_use_gpu_none_picks_a_gpu_gang_only_when_the_whole_gang_can_be_gpu():
    fleet = [w("a", gpus=("0",)), w("b", gpus=("1",)), w("c")]
    assert select_gang("j", Resources(2), fleet).use_gpu is True
    p = select_gang("j", Resources(3), fleet)
    assert p.use_gpu is False and len(p.worker_ids) == 3


def test_cpu_gangs_leave_gpu_workers_free_when_they_can():
    p = select_gang("j", Resources(1, use_gpu=False), [w("g", gpus=("0",)), w("c")])
    assert p.worker_ids == ("c",)


def test_ranks_of_one_host_are_consecutive():
    p = select_gang("j", Resources(4), [w("a", "h2"), w("b", "h1"), w("c", "h2"), w("d", "h1")])
    assert p.worker_ids == ("b", "d", "a", "c")


def test_a_gang_larger_than_the_fleet_is_infeasible_with_requested_and_available():
    msg = infeasibility(Resources(5), [w("a"), w("b")])
    assert "num_workers=5" in msg and "2 eligible workers" in msg


def test_gpus_asked_of_a_cpu_fleet_are_infeasible():
    assert "no GPU worker" in infeasibility(Resources(1, use_gpu=True), [w("a")])


def test_busy_workers_still_count_toward_feasibility():
    assert infeasibility(Resources(2), [w("a", job="x"), w("b", job="y")]) == ""


def test_no_live_worker_is_infeasible():
    assert "no live trainer worker" in infeasibility(Resources(1), [w("a", alive=False)])


def test_pending_order_is_priority_then_fifo():
    scores = {"low-early": pending_score(0, 1), "high-late": pending_score(5, 9), "low-late": pending_score(0, 2)}
    assert sorted(scores, key=scores.get) == ["high-late", "low-early", "low-late"]


def test_a_pass_places_in_order_and_the_first_job_that_does_not_fit_blocks_the_rest():
    fleet = [w("a"), w("b"), w("c")]
    ds = plan_pass([spec("j1", 2), spec("j2", 2), spec("j3", 1)], fleet)
    assert [(d.job_id, d.action) for d in ds] == [("j1", Action.PLACE), ("j2", Action.WAIT)]
    assert "1 of 3 live workers are free" in ds[1].reason


def test_a_pass_fails_jobs_that_can_never_fit_and_goes_on():
    ds = plan_pass([spec("big", 9), spec("ok", 1)], [w("a")])
    assert [(d.job_id, d.action) for d in ds] == [("big", Action.FAIL), ("ok", Action.PLACE)]


def test_rendezvous_comes_from_the_reserved_workers_port_blocks():
    gang = [w("a", "h1", port=30000), w("b", "h2", port=31000)]
    rdv = compute_rendezvous(gang)
    assert rdv.world_size == 2
    assert (rdv.master_addr, rdv.master_port) == (gang[0].info.address, 30000)
    assert rdv.tracker_port == 30001 and rdv.tracker_ports[0] == 30001 and 30000 not in rdv.tracker_ports
    assert 30002 not in rdv.tracker_ports
    assert rdv.machines == (f"{gang[0].info.address}:30002", f"{gang[1].info.address}:31002")


def test_a_topology_gang_takes_the_requested_hosts_with_workers_per_node_each():
    fleet = [w("a1", "h1"), w("a2", "h1"), w("b1", "h2"), w("b2", "h2"), w("c1", "h3")]
    p = select_gang("j", Resources(4, num_nodes=2, workers_per_node=2), fleet)
    assert p.worker_ids == ("a1", "a2", "b1", "b2")


def test_a_topology_the_hosts_can_never_satisfy_is_infeasible_with_what_each_host_has():
    fleet = [w("a1", "h1"), w("a2", "h1"), w("b1", "h2")]
    msg = infeasibility(Resources(3, num_nodes=3, workers_per_node=1), fleet)
    assert "num_nodes=3 x num_workers_per_node=1" in msg and "{'h1': 2, 'h2': 1}" in msg
    assert select_gang("j", Resources(2, num_nodes=2, workers_per_node=1), fleet).worker_ids == ("a1", "b1")


def test_infrastructure_failures_are_retried_while_attempts_remain():
    from workers.coordinator.policy import FailureAction, decide
    assert decide(1, 1, "ChildProcessError").action is FailureAction.RETRY
    assert decide(2, 1, "WorkerLostError").action is FailureAction.FAIL
    assert "max_failures=1" in decide(2, 1, "WorkerLostError").reason


def test_errors_of_the_training_code_are_never_retried():
    from workers.coordinator.policy import FailureAction, decide
    d = decide(1, 5, "ValueError")
    assert d.action is FailureAction.FAIL and "not retried" in d.reason


def test_a_4_worker_gang_is_placed_within_one_job_length_under_a_stream_of_1_worker_jobs():
    """Simulated time: 5 workers busy with 1-worker jobs of 3 ticks, a new 1-worker job every tick,
    and a 4-worker gang queued at tick 0. Strict head-of-line order: no small job queued after the
    gang starts before it, and the gang waits at most the longest running job (3 ticks)."""
    workers = {f"w{i}": "" for i in range(5)}
    ends: dict[str, int] = {}
    queue = [spec("gang", 4)]
    started: dict[str, int] = {}
    seq = 0
    for wid in workers:   # the fleet is full of small jobs when the gang arrives
        workers[wid], ends[f"s{seq}"] = f"s{seq}", 3 - seq % 3
        started[f"s{seq}"] = -1
        seq += 1
    for tick in range(12):
        for wid, job in workers.items():
            if job and ends[job] <= tick:
                workers[wid] = ""
        queue.append(spec(f"s{seq}", 1))
        seq += 1
        fleet = [w(wid, job=job) for wid, job in workers.items()]
        for d in plan_pass(queue, fleet):
            if d.action is Action.PLACE:
                for wid in d.placement.worker_ids:
                    workers[wid] = d.job_id
                ends[d.job_id] = tick + 3
                started[d.job_id] = tick
                queue = [s for s in queue if s.job_id != d.job_id]
    assert started["gang"] <= 3
    later = [j for j in started if j.startswith("s") and int(j[1:]) >= 5]
    assert later and all(started[j] >= started["gang"] for j in later)


def test_a_waiting_reason_names_the_jobs_that_hold_the_workers():
    from workers.coordinator.scheduler import shortage
    reason = shortage(Resources(2), [w("a", job="job-1"), w("b", job="job-2"), w("c")])
    assert reason == "waiting for 2 workers: 1 of 3 live workers are free (held by job job-1, job-2)"


def test_a_job_that_fits_the_registered_fleet_waits_while_a_worker_is_momentarily_dead_or_draining():
    fleet = [w("a"), w("b", alive=False), WorkerView(w("c").info, True, "", draining=True)]
    decisions = plan_pass([spec("j", 3)], fleet)
    assert [d.action for d in decisions] == [Action.WAIT]
    assert "live workers are free" in decisions[0].reason


def test_a_job_larger_than_the_registered_fleet_is_judged_never_to_fit():
    decisions = plan_pass([spec("j", 4)], [w("a"), w("b", alive=False), w("c")])
    assert decisions[0].action is Action.FAIL and "(2 live, 3 registered)" in decisions[0].reason


def test_a_rank_asking_for_4_gpus_gets_a_worker_owning_4_and_never_a_1_gpu_worker():
    need4 = Resources(1, True, gpus_per_worker=4)
    fleet = [w("small", gpus=("0",)), w("big", gpus=("1", "2", "3", "4"))]
    assert select_gang("j", need4, fleet).worker_ids == ("big",)
    assert select_gang("j", need4, [w("small", gpus=("0",)), w("big", gpus=("1", "2", "3", "4"), job="x")]) is None
    assert infeasibility(need4, fleet) == ""


def test_gpus_per_worker_beyond_every_worker_is_refused_with_requested_and_available():
    reason = infeasibility(Resources(1, True, gpus_per_worker=4), [w("a", gpus=("0",)), w("b", gpus=("1", "2"))])
    assert reason.startswith("num_gpus=4 per worker requested but the fleet's workers own at most 2 GPUs each")
    cpu_only = infeasibility(Resources(1, True, gpus_per_worker=4), [w("a"), w("b")])
    assert "num_gpus=4 per worker requested" in cpu_only and "at most 0 GPUs" in cpu_only


def test_gangway_up_splits_the_hosts_gpus_into_disjoint_sets_per_worker():
    import pytest

    from common.errors import ConfigurationError
    from workers.local.fleet import gpu_split
    assert gpu_split(["0", "1", "2", "3", "4", "5", "6", "7"], 2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_split(["0", "1"], 2, 1) == ["0", "1"]
    with pytest.raises(ConfigurationError, match=r"needs 8 GPUs but this host has 4"):
        gpu_split(["0", "1", "2", "3"], 2, 4)


def test_a_multi_gpu_rank_sees_exactly_its_gpus_and_a_one_gpu_rank_its_hosts_gang_gpus():
    from workers.runtime.torch_runner import visible_gpus
    assert visible_gpus({"gpus": ["4", "5", "6", "7"], "host_gpus": ["0", "4"]}, local_rank=1) == (["4", "5", "6", "7"], 0)
    assert visible_gpus({"gpus": ["3"], "host_gpus": ["1", "3"]}, local_rank=1) == (["1", "3"], 1)


def test_a_pass_over_the_free_index_places_from_the_free_workers_and_counts_registered_ones_when_waiting():
    from workers.coordinator.scheduler import Fleet, plan_fleet
    registered = [w(f"r{i}") for i in range(6)]
    fleet = Fleet(registered=registered, free=[registered[4], registered[5]], holders=("job-1",))
    ds = plan_fleet([spec("j1", 2), spec("j2", 1)], fleet)
    assert ds[0].action is Action.PLACE and set(ds[0].placement.worker_ids) == {"r4", "r5"}
    assert ds[1].action is Action.WAIT
    assert ds[1].reason == "waiting for 1 workers: 0 of 6 registered workers are free (held by job job-1)"


def test_a_pass_asks_whether_a_job_can_ever_fit_through_the_callers_verdict():
    from workers.coordinator.scheduler import Fleet, plan_fleet
    asked = []
    fleet = Fleet(registered=[w("a")], free=[w("a")])
    ds = plan_fleet([spec("j", 1)], fleet, never_fits=lambda res: asked.append(res) or "never, says the cache")
    assert asked == [Resources(1)] and ds[0].action is Action.FAIL and ds[0].reason == "never, says the cache"
