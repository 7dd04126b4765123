"""`gangway jobs show ID --plot FILE.png` and `TrainingJob.plot(path)` on jobs the real fleet ran."""
from __future__ import annotations

import time

import pytest

from producer import plot
from producer.xgboost import XGBEstimator, XGBScalingConfig
from tests.integration.helpers import FEATURES, gangway, regression_frame, wait_until
from tests.conftest import IN_CI
from tests.unit.test_plot import (
    HAVE_MATPLOTLIB,
    PNG_MAGIC,
    area,
    distinct_colours,
    inked_fraction,
    pixels_of,
    png_rgb,
)

pytestmark = pytest.mark.integration
if not HAVE_MATPLOTLIB and not IN_CI:
    pytest.skip("matplotlib is not installed (pip install 'gangway[plot]')", allow_module_level=True)
PARAMS = {"objective": "reg:squarederror", "max_depth": 4, "learning_rate": 0.2}
ROUNDS = 30


@pytest.fixture(scope="module")
def finished_job(fleet):
    df = regression_frame(6000, seed=21)
    est = XGBEstimator(n_estimators=ROUNDS, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))
    est.fit(df.iloc[:5000], FEATURES, "risk", eval_set=df.iloc[5000:], verbose_eval=5, timeout=120)
    return est.last_job


def assert_png_has_curves_and_a_timeline(path) -> None:
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and 20_000 < len(data) < 2_000_000, len(data)
    rgb = png_rgb(path)
    assert rgb.shape[0] >= 700 and rgb.shape[1] == 1200
    curves, timeline = area(rgb, plot.CURVES_BOX), area(rgb, plot.TIMELINE_BOX)
    assert distinct_colours(curves) > 50 and inked_fraction(curves) > 0.03
    assert pixels_of(curves, plot.CURVE_COLOURS[0]) > 300 and pixels_of(curves, plot.CURVE_COLOURS[1]) > 300
    assert distinct_colours(timeline) > 30 and inked_fraction(timeline) > 0.2
    assert pixels_of(timeline, plot.COLOURS["training"]) > 2000   # two ranks' training bars, at least
    assert pixels_of(timeline, plot.COLOURS[plot.HELD]) > 1000


def test_jobs_show_plot_writes_a_png_of_the_eval_curves_and_each_ranks_timeline(finished_job, tmp_path):
    out = tmp_path / "job.png"
    res = gangway(None, "jobs", "show", finished_job.job_id, "--plot", str(out), ok=False, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"plot of job {finished_job.job_id} written to {out}" in res.stderr
    assert f"job {finished_job.job_id}: SUCCEEDED" in res.stdout   # the summary of `jobs show` on stdout
    assert_png_has_curves_and_a_timeline(out)


def test_jobs_show_plot_into_a_folder_that_does_not_exist_is_an_error_naming_the_file(finished_job, tmp_path):
    out = tmp_path / "missing" / "job.png"
    res = gangway(None, "jobs", "show", finished_job.job_id, "--plot", str(out), ok=False, timeout=120)
    assert res.returncode != 0 and f"could not draw {out}" in res.stderr and not out.exists()


def test_training_job_plot_draws_the_artifacts_eval_results_and_every_recorded_phase(finished_job, tmp_path):
    out = tmp_path / "job.png"
    fig = finished_job.plot(out)
    assert_png_has_curves_and_a_timeline(out)
    assert fig.axes[0].get_title() == "rmse  (eval_results.json)"
    (train_line, eval_line) = fig.axes[0].get_lines()
    assert (train_line.get_label(), eval_line.get_label()) == ("train", "eval")
    assert len(train_line.get_xdata()) == ROUNDS and len(eval_line.get_xdata()) == ROUNDS

    record = finished_job.record()
    tl = plot.timeline(record, finished_job.client.state.ranks(finished_job.job_id), now=time.time())
    job_lane, *rank_lanes = tl.lanes
    assert [lane.label.split("\n")[0] for lane in rank_lanes] == ["rank 0", "rank 1"]
    assert [s.phase for s in job_lane.spans] == ["queued", plot.HELD] and tl.note == ""
    assert [s.phase for s in rank_lanes[0].spans] == ["reserved", "fetching", "rendezvous", "training", "upload"]
    assert [s.phase for s in rank_lanes[1].spans] == ["reserved", "fetching", "rendezvous", "training"]
    for lane in tl.lanes:   # phases follow one another without gaps or overlaps, in time order
        assert all(s.seconds >= 0 for s in lane.spans), lane
        assert all(a.end == b.start for a, b in zip(lane.spans, lane.spans[1:])), lane
    ended = float(record["finished_at"]) - float(record["submitted_at"])
    assert 0 < rank_lanes[0].phase("upload").seconds and rank_lanes[0].spans[-1].end <= ended + 0.5
    assert rank_lanes[0].phase("training").seconds > 0 and rank_lanes[1].phase("training").seconds > 0


def test_a_running_job_is_drawn_from_its_log_eval_lines_with_its_ranks_still_training(fleet, tmp_path):
    df = regression_frame(6000, seed=22)
    est = XGBEstimator(n_estimators=20_000, params=PARAMS, scaling_config=XGBScalingConfig(num_workers=2))
    job = est.submit(df.iloc[:5000], FEATURES, "risk", eval_set=df.iloc[5000:], verbose_eval=1, timeout=240)
    try:
        wait_until(lambda: len([ln for ln in job.logs() if ln.startswith("[") and not ln.startswith("[rank ")]) >= 5,
                   120, "5 eval lines")   # "[rank N] ..." lines are the ranks' own output
        out = tmp_path / "running.png"
        fig = job.plot(out)
        tl = plot.timeline(job.record(), job.client.state.ranks(job.job_id), now=time.time())
        assert job.status().state.value == "RUNNING"   # still running after the plot: it showed a live job
    finally:
        job.cancel(wait=30)
    assert fig.axes[0].get_title() == "rmse  (eval lines of the job log)"
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "eval"]
    assert len(fig.axes[0].get_lines()[0].get_xdata()) >= 5
    assert_png_has_curves_and_a_timeline(out)
    job_lane, *rank_lanes = tl.lanes
    assert job_lane.spans[-1].phase == plot.HELD and job_lane.marks == ()
    assert [lane.spans[-1].phase for lane in rank_lanes] == ["training", "training"]
