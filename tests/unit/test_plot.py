"""The job plot from plain data: timeline phases from the recorded timestamps, curves, and the PNG itself."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from producer import plot
from tests.conftest import IN_CI

T = 1_700_000_000.0   # submitted_at
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
# The timeline and curve data need nothing; pictures need matplotlib (the `plot` extra, in `all`: CI has it).
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB and not IN_CI,
                                      reason="matplotlib is not installed (pip install 'gangway[plot]')")


def redis_record(**fields) -> dict[str, str]:
    """A job hash as Redis returns it: every value a string, JSON fields as text."""
    base = {"state": "SUCCEEDED", "framework": "xgboost", "attempt": 1, "submitted_at": T,
            "started_at": T + 2.0, "finished_at": T + 20.0, "gang": {"workers": ["w-a", "w-b"]}}
    base.update(fields)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in base.items()}


def rank_statuses(offset: float = 0.0) -> dict[int, dict]:
    return {0: {"worker": "w-a", "state": "SUCCEEDED", "t_fetching": T + 2.5 + offset, "t_waiting": T + 4.0 + offset,
                "t_training": T + 5.0 + offset, "t_uploading": T + 15.0 + offset,
                "t_succeeded": T + 19.0 + offset, "updated": T + 19.0 + offset},
            1: {"worker": "w-b", "state": "SUCCEEDED", "t_fetching": T + 3.0 + offset, "t_waiting": T + 4.5 + offset,
                "t_training": T + 5.0 + offset, "t_succeeded": T + 15.0 + offset, "updated": T + 15.0 + offset}}


def phases(lane: plot.Lane) -> list[tuple[str, float, float]]:
    return [(s.phase, round(s.start, 6), round(s.end, 6)) for s in lane.spans]


EVAL_RESULTS = {"train": {"rmse": [1.0 / (i + 1) for i in range(30)], "mae": [0.8 / (i + 1) for i in range(30)]},
                "eval": {"rmse": [1.2 / (i + 1) + 0.1 for i in range(30)], "mae": [1.0 / (i + 1) + 0.1 for i in range(30)]}}


# pixels -------------------------------------------------------------------------------------------
def png_rgb(path) -> np.ndarray:
    """The PNG decoded by matplotlib, as uint8 RGB."""
    from matplotlib.image import imread
    img = imread(str(path))
    return (img[..., :3] * 255).round().astype(np.uint8)


def area(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels of a figure-fraction box (left, bottom, right, top)."""
    h, w = rgb.shape[:2]
    left, bottom, right, top = box
    return rgb[int((1 - top) * h):int((1 - bottom) * h), int(left * w):int(right * w)]


def distinct_colours(region: np.ndarray) -> int:
    return len(np.unique(region.reshape(-1, 3), axis=0))


def inked_fraction(region: np.ndarray) -> float:
    return float((region.reshape(-1, 3) < 245).any(axis=1).mean())


def pixels_of(region: np.ndarray, hex_colour: str) -> int:
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return int((region == want).all(axis=-1).sum())


# timeline -----------------------------------------------------------------------------------------
def test_queued_runs_from_submission_to_the_gang_reservation_then_the_gang_is_held_until_the_end():
    job = plot.timeline(redis_record(), rank_statuses(), now=T + 100).lanes[0]
    assert job.label == "job"
    assert phases(job) == [("queued", 0.0, 2.0), (plot.HELD, 2.0, 20.0)]
    assert [(m.at, m.label, m.bad) for m in job.marks] == [(20.0, "succeeded", False)]


def test_each_rank_goes_reserved_fetching_rendezvous_training_and_rank_0_uploads():
    tl = plot.timeline(redis_record(), rank_statuses(), now=T + 100)
    assert [lane.label for lane in tl.lanes] == ["job", "rank 0\nw-a", "rank 1\nw-b"]
    assert phases(tl.lanes[1]) == [("reserved", 2.0, 2.5), ("fetching", 2.5, 4.0), ("rendezvous", 4.0, 5.0),
                                   ("training", 5.0, 15.0), ("upload", 15.0, 19.0)]
    assert phases(tl.lanes[2]) == [("reserved", 2.0, 3.0), ("fetching", 3.0, 4.5), ("rendezvous", 4.5, 5.0),
                                   ("training", 5.0, 15.0)]
    assert tl.end == 20.0 and tl.attempt == 1 and tl.note == ""


def test_a_running_job_ends_at_now_with_its_ranks_still_training():
    statuses = rank_statuses()
    for st in statuses.values():
        for k in ("t_uploading", "t_succeeded"):
            st.pop(k, None)
    tl = plot.timeline(redis_record(state="RUNNING", finished_at=""), statuses, now=T + 9.0)
    assert tl.end == 9.0
    assert phases(tl.lanes[0])[-1] == (plot.HELD, 2.0, 9.0) and tl.lanes[0].marks == ()
    assert [phases(lane)[-1] for lane in tl.lanes[1:]] == [("training", 5.0, 9.0), ("training", 5.0, 9.0)]


def test_a_pending_job_is_queued_until_now_and_has_no_rank_lanes():
    tl = plot.timeline(redis_record(state="PENDING", attempt=0, started_at="", finished_at="", gang=""), {},
                       now=T + 7.0)
    assert [phases(lane) for lane in tl.lanes] == [[("queued", 0.0, 7.0)]]
    assert tl.attempt == 0


def test_a_job_that_was_never_placed_is_queued_until_it_failed():
    tl = plot.timeline(redis_record(state="FAILED", attempt=0, started_at="", finished_at=T + 30, gang=""), {},
                       now=T + 99)
    assert phases(tl.lanes[0]) == [("queued", 0.0, 30.0)]
    assert [(m.label, m.bad) for m in tl.lanes[0].marks] == [("failed", True)]


def test_a_rank_that_failed_is_marked_and_one_never_heard_from_again_ends_at_its_last_write():
    statuses = rank_statuses()
    statuses[0] = {"worker": "w-a", "t_fetching": T + 2.5, "t_waiting": T + 4.0, "t_training": T + 5.0,
                   "t_failed": T + 8.0, "updated": T + 8.0}
    statuses[1] = {"worker": "w-b", "t_fetching": T + 3.0, "t_waiting": T + 4.5, "t_training": T + 5.0,
                   "updated": T + 7.0}   # its final write was refused: the attempt had already ended
    tl = plot.timeline(redis_record(state="FAILED", finished_at=T + 9.0), statuses, now=T + 99)
    assert phases(tl.lanes[1])[-1] == ("training", 5.0, 8.0)
    assert [(m.at, m.label, m.bad) for m in tl.lanes[1].marks] == [(8.0, "failed", True)]
    assert phases(tl.lanes[2])[-1] == ("training", 5.0, 7.0)
    assert [(m.at, m.label) for m in tl.lanes[2].marks] == [(7.0, "last heard")]


def test_earlier_attempts_are_one_coarse_span_each_and_the_note_says_their_ranks_are_not_kept():
    history = [{"attempt": 1, "at": T + 6.0, "message": "rank 1 failed: WorkerLostError"}]
    record = redis_record(attempt=2, started_at=T + 7.0, finished_at=T + 30.0, history=history)
    statuses = rank_statuses(offset=5.0)
    tl = plot.timeline(record, statuses, now=T + 99)
    assert phases(tl.lanes[0]) == [(plot.EARLIER, 0.0, 6.0), ("queued", 6.0, 7.0), (plot.HELD, 7.0, 30.0)]
    assert [(m.at, m.label, m.bad) for m in tl.lanes[0].marks] == [(6.0, "attempt 1 failed", True),
                                                                    (30.0, "succeeded", False)]
    assert tl.attempt == 2 and "ranks of attempt 2 only" in tl.note and "attempt 1 keeps" in tl.note
    assert phases(tl.lanes[1])[0] == ("reserved", 7.0, 7.5)


def test_statuses_left_by_an_earlier_attempt_are_not_drawn_as_ranks_of_this_one():
    history = [{"attempt": 1, "at": T + 6.0}]
    statuses = {**rank_statuses(offset=5.0),
                2: {"worker": "w-c", "t_fetching": T + 2.5, "t_waiting": T + 3.0, "updated": T + 5.0}}
    statuses[1] = {"worker": "w-b", "t_fetching": T + 2.6, "t_failed": T + 5.5}   # attempt 1's, not rewritten
    record = redis_record(attempt=2, started_at=T + 7.0, finished_at=T + 30.0, history=history,
                          gang={"workers": ["w-a", "w-b", "w-c"]})
    tl = plot.timeline(record, statuses, now=T + 99)
    assert [lane.label.split("\n")[0] for lane in tl.lanes] == ["job", "rank 0"]
    assert "2 status(es) of earlier attempts left out" in tl.note


def test_a_job_re_queued_after_a_failure_is_waiting_again_after_its_failed_attempts_ranks():
    history = [{"attempt": 1, "at": T + 10.0}]
    statuses = rank_statuses()
    for st in statuses.values():
        st.pop("t_succeeded"), st.pop("t_uploading", None)
        st["updated"] = T + 9.5
    record = redis_record(state="PENDING", finished_at="", history=history)
    tl = plot.timeline(record, statuses, now=T + 12.0)
    assert phases(tl.lanes[0]) == [("queued", 0.0, 2.0), (plot.HELD, 2.0, 10.0), ("queued", 10.0, 12.0)]
    assert [m.label for m in tl.lanes[0].marks] == ["attempt 1 failed"]
    assert [phases(lane)[-1] for lane in tl.lanes[1:]] == [("training", 5.0, 9.5)] * 2


def test_a_record_from_redis_and_the_same_record_decoded_by_the_cli_give_the_same_timeline():
    raw = redis_record(attempt=2, started_at=T + 7.0, history=[{"attempt": 1, "at": T + 6.0}])
    decoded = {k: json.loads(v) for k, v in raw.items() if k not in ("state", "framework")} | {
        "state": raw["state"], "framework": raw["framework"]}
    statuses = rank_statuses(offset=5.0)
    as_json = {str(k): v for k, v in statuses.items()}
    assert plot.timeline(raw, statuses, now=T + 99) == plot.timeline(decoded, as_json, now=T + 99)


# curves -------------------------------------------------------------------------------------------
def test_eval_results_become_one_curve_per_dataset_for_each_metric():
    curves = plot.curves_from_results(EVAL_RESULTS)
    assert sorted(curves) == ["mae", "rmse"] and sorted(curves["rmse"]) == ["eval", "train"]
    assert curves["rmse"]["train"][:2] == [(0, 1.0), (1, 0.5)] and len(curves["rmse"]["eval"]) == 30


def test_log_eval_lines_become_curves_and_other_log_lines_are_skipped():
    lines = ["[0]\ttrain-rmse:1.00000\teval-rmse:1.20000\teval-ndcg@5-:0.50000",
             "[gangway] checkpoint s3://b/ckpt/3/",
             "[5]\ttrain-rmse:0.40000\teval-rmse:0.60000\teval-ndcg@5-:0.70000",
             "[gangway] resuming from the checkpoint after round 5",
             "[5]\ttrain-rmse:0.39000\teval-rmse:0.59000",   # a retry re-reports round 5: the later value wins
             "[9]\ttrain-rmse:0.20000\teval-rmse:nonsense",
             "not an eval line"]
    curves = plot.curves_from_log(lines)
    assert curves["rmse"]["train"] == [(0, 1.0), (5, 0.39), (9, 0.2)]
    assert curves["rmse"]["eval"] == [(0, 1.2), (5, 0.59)]
    assert curves["ndcg@5-"]["eval"] == [(0, 0.5), (5, 0.7)]


# the picture --------------------------------------------------------------------------------------
@needs_matplotlib
def test_the_png_has_curves_above_and_every_phase_of_the_timeline_below(tmp_path):
    out = tmp_path / "job.png"
    fig = plot.render("job-1", redis_record(), rank_statuses(), eval_results=EVAL_RESULTS, now=T + 99, path=out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and 20_000 < len(data) < 2_000_000
    rgb = png_rgb(out)
    assert rgb.shape[:2] == (700, 1200)
    curves, timeline = area(rgb, plot.CURVES_BOX), area(rgb, plot.TIMELINE_BOX)
    assert distinct_colours(curves) > 50 and inked_fraction(curves) > 0.03
    assert pixels_of(curves, plot.CURVE_COLOURS[0]) > 300 and pixels_of(curves, plot.CURVE_COLOURS[1]) > 300
    assert distinct_colours(timeline) > 50 and inked_fraction(timeline) > 0.3
    for phase in (*plot.PHASES, plot.HELD):
        assert pixels_of(timeline, plot.COLOURS[phase]) > 200, phase
    assert pixels_of(curves, plot.COLOURS["training"]) == 0   # nothing of the timeline leaks above
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["mae  (eval_results.json)", "rmse"]


@needs_matplotlib
def test_without_eval_history_the_png_says_so_with_rank_0s_latest_metrics_and_still_draws_the_timeline(tmp_path):
    out = tmp_path / "job.png"
    statuses = rank_statuses()
    statuses[0]["metrics"] = {"loss": 0.123456789, "epoch": 3}
    fig = plot.render("job-1", redis_record(framework="pytorch"), statuses,
                      log_lines=["[gangway] checkpoint s3://b/c/1/"], now=T + 99, path=out)
    rgb = png_rgb(out)
    assert pixels_of(area(rgb, plot.CURVES_BOX), plot.CURVE_COLOURS[0]) == 0
    assert pixels_of(area(rgb, plot.TIMELINE_BOX), plot.COLOURS["training"]) > 1000
    (note,) = [t.get_text() for ax in fig.axes for t in ax.texts if "no eval history" in t.get_text()]
    assert "latest metrics of rank 0: epoch=3, loss=0.1235" in note


@needs_matplotlib
def test_at_most_three_metric_panels_are_drawn_and_the_rest_are_counted():
    results = {"train": {m: [1.0, 0.5] for m in ("a", "b", "c", "d", "e")}}
    fig = plot.render("job-1", redis_record(), rank_statuses(), eval_results=results, now=T + 99)
    assert len(fig.axes) == plot.MAX_METRICS + 1
    assert any("+2 more metrics" in t.get_text() for t in fig.texts)


@needs_matplotlib
def test_the_title_says_which_attempt_the_ranks_belong_to(tmp_path):
    record = redis_record(attempt=3, started_at=T + 9.0, history=[{"attempt": 1, "at": T + 4.0},
                                                                   {"attempt": 2, "at": T + 8.0}])
    fig = plot.render("job-7", record, rank_statuses(offset=7.0), eval_results=EVAL_RESULTS, now=T + 99,
                      path=tmp_path / "a.png")
    title = fig._suptitle.get_text()
    assert "job job-7 | xgboost | SUCCEEDED | attempt 3" in title and "attempts 1-2 keep" in title
    assert pixels_of(area(png_rgb(tmp_path / "a.png"), plot.TIMELINE_BOX), plot.COLOURS[plot.EARLIER]) > 200


def test_a_missing_matplotlib_is_a_clear_error_naming_the_extra(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'gangway\[plot\]'"):
        plot.render("job-1", redis_record(), rank_statuses(), now=T + 99)
