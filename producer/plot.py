"""Pictures of a job: its eval curves and its timeline, drawn on matplotlib's Agg canvas from plain data.

The inputs are what the fleet already records: the job hash (``submitted_at``, ``started_at`` of the
current attempt, ``finished_at``, ``attempt``, ``history`` of failed attempts, ``gang``), each rank's
status (``t_fetching``, ``t_waiting``, ``t_training``, ``t_uploading`` on rank 0, then ``t_succeeded``,
``t_failed`` or ``t_aborted``, and ``updated``), and the eval history (``eval_results.json`` of a
finished job, else the eval lines of the job log). Job times come from the coordinator's clock and rank
times from each worker's: skew between hosts is drawn as it is.

Rank statuses are kept for the current attempt only, so earlier attempts appear as one coarse span each
(from their queueing to their failure) and the figure's title says so.

Nothing here touches pyplot or the global backend: a notebook's own matplotlib setup is left alone.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PHASES = ("queued", "reserved", "fetching", "rendezvous", "training", "upload")
EARLIER = "earlier attempt"
HELD = "gang held"
COLOURS = {HELD: "#fff59d", "queued": "#b39ddb", "reserved": "#80deea", "fetching": "#ffcc80", "rendezvous": "#ef5350",
           "training": "#66bb6a", "upload": "#1565c0", EARLIER: "#bdbdbd"}
CURVE_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
FAILED_COLOUR = "#b71c1c"
# Figure-fraction boxes (left, bottom, right, top): tests and users can find each area in the PNG.
CURVES_BOX = (0.16, 0.60, 0.97, 0.88)
TIMELINE_BOX = (0.16, 0.09, 0.97, 0.44)
MAX_METRICS = 3

# (phase, the status field that starts it); "reserved" starts when the coordinator reserved the gang.
_RANK_PHASES = (("fetching", "t_fetching"), ("rendezvous", "t_waiting"), ("training", "t_training"),
                ("upload", "t_uploading"))
_RANK_ENDS = {"t_succeeded": "succeeded", "t_failed": "failed", "t_aborted": "aborted"}
_EVAL_LINE = re.compile(r"^\[(\d+)\]\t(.+)$")

Curves = dict[str, dict[str, list[tuple[int, float]]]]   # metric -> dataset -> [(round, value)]


@dataclass(frozen=True)
class Span:
    """One phase of one lane, in seconds since the job was submitted."""

    phase: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Mark:
    """A moment on a lane: an attempt that failed, a rank's outcome, the job's end."""

    at: float
    label: str
    bad: bool = False


@dataclass(frozen=True)
class Lane:
    label: str
    spans: tuple[Span, ...]
    marks: tuple[Mark, ...] = ()

    def phase(self, name: str) -> Span | None:
        return next((s for s in self.spans if s.phase == name), None)


@dataclass(frozen=True)
class Timeline:
    """The job lane first, then one lane per rank of the attempt shown."""

    lanes: tuple[Lane, ...]
    end: float              # where the picture ends: the job's end, or now for a live job
    attempt: int            # the attempt whose ranks are drawn (0: none reserved yet)
    attempts: int           # attempts so far
    note: str = ""          # what the picture cannot show (earlier attempts' ranks, stale statuses)


# data --------------------------------------------------------------------------------------------
def timeline(job: Mapping[str, Any], ranks: Mapping[Any, Mapping[str, Any]], now: float) -> Timeline:
    """The job's phases from its record and its ranks' statuses (Redis strings or decoded values)."""
    statuses = {int(k): dict(v) for k, v in ranks.items()}
    origin = _num(job.get("submitted_at")) or _num(job.get("persisted_at")) or now
    attempt = int(_num(job.get("attempt")) or 0)
    state = str(job.get("state") or "")
    started, finished = _num(job.get("started_at")), _num(job.get("finished_at"))
    failed_at = {int(h["attempt"]): float(h["at"]) for h in _decoded(job.get("history"), [])
                 if "attempt" in h and "at" in h}
    end = finished or now

    def rel(t: float) -> float:
        return t - origin

    spans, marks, queued_from = [], [], origin
    for k in range(1, attempt):   # earlier attempts: only their queueing and their failure are kept
        if k in failed_at:
            spans.append(Span(EARLIER, rel(queued_from), rel(failed_at[k])))
            marks.append(Mark(rel(failed_at[k]), f"attempt {k} failed", bad=True))
            queued_from = failed_at[k]
    attempt_end = failed_at.get(attempt) or finished
    if attempt and started is not None:
        spans.append(Span("queued", rel(queued_from), rel(max(started, queued_from))))
        spans.append(Span(HELD, rel(started), rel(max(started, attempt_end or now))))
        if state == "PENDING" and attempt in failed_at:   # failed, re-queued, waiting for its next gang
            marks.append(Mark(rel(failed_at[attempt]), f"attempt {attempt} failed", bad=True))
            spans.append(Span("queued", rel(failed_at[attempt]), rel(now)))
    else:
        spans.append(Span("queued", rel(queued_from), rel(end)))
    if finished is not None:
        marks.append(Mark(rel(finished), state.lower() or "ended", bad=state != "SUCCEEDED"))
    lanes = [Lane("job", tuple(spans), tuple(marks))]

    world = len(_decoded(job.get("gang"), {}).get("workers", [])) or len(statuses)
    stale = 0
    for rank in sorted(statuses):
        st = statuses[rank]
        fetched = _num(st.get("t_fetching"))
        if rank >= world or (attempt > 1 and fetched is not None and fetched < queued_from):
            stale += 1   # written by an earlier attempt's rank (statuses are kept per rank, not per attempt)
            continue
        lanes.append(_rank_lane(rank, st, started, attempt_end, now, rel))
    note = []
    if attempt > 1:
        earlier = "attempt 1 keeps" if attempt == 2 else f"attempts 1-{attempt - 1} keep"
        note.append(f"ranks of attempt {attempt} only; {earlier} just queueing and failure times")
    if stale:
        note.append(f"{stale} status(es) of earlier attempts left out")
    return Timeline(tuple(lanes), rel(end), attempt if started is not None else 0, attempt, "; ".join(note))


def _rank_lane(rank: int, st: Mapping[str, Any], started: float | None, attempt_end: float | None,
               now: float, rel) -> Lane:
    starts = [("reserved", started)] + [(phase, _num(st.get(key))) for phase, key in _RANK_PHASES]
    starts = [(p, t) for p, t in starts if t is not None]
    outcome = next(((k, label) for k, label in _RANK_ENDS.items() if _num(st.get(k)) is not None), None)
    if outcome:
        end = _num(st[outcome[0]])
    elif attempt_end is not None:   # the attempt ended without this rank's final word: its last write
        end = _num(st.get("updated")) or attempt_end
    else:
        end = now
    nexts = [t for _, t in starts[1:]] + [end]
    spans = tuple(Span(p, rel(t), rel(max(t, n))) for (p, t), n in zip(starts, nexts))
    marks = ()
    if outcome and outcome[1] != "succeeded":
        marks = (Mark(rel(end), outcome[1], bad=True),)
    elif not outcome and attempt_end is not None:
        marks = (Mark(rel(end), "last heard", bad=True),)
    worker = str(st.get("worker") or "")
    return Lane(f"rank {rank}\n{worker[:22]}" if worker else f"rank {rank}", spans, marks)


def curves_from_results(results: Mapping[str, Mapping[str, Sequence[float]]]) -> Curves:
    """``{"train": {"rmse": [...]}, "eval": {...}}`` (``eval_results.json``) as curves by metric."""
    out: Curves = {}
    for dataset, metrics in results.items():
        for metric, values in metrics.items():
            out.setdefault(metric, {})[dataset] = [(i, float(v)) for i, v in enumerate(values)]
    return out


def curves_from_log(lines: Iterable[str]) -> Curves:
    """Curves from the log's eval lines (``[round]<TAB>dataset-metric:value ...``); other lines are skipped.

    A round reported twice (a retry resumed from a checkpoint) keeps its latest value."""
    points: dict[tuple[str, str], dict[int, float]] = {}
    for line in lines:
        m = _EVAL_LINE.match(line)
        if not m:
            continue
        for field in m.group(2).split("\t"):
            name, _, value = field.rpartition(":")
            dataset, _, metric = name.partition("-")
            try:
                points.setdefault((metric or dataset, dataset if metric else ""), {})[int(m.group(1))] = float(value)
            except ValueError:
                continue
    out: Curves = {}
    for (metric, dataset), by_round in points.items():
        out.setdefault(metric, {})[dataset] = sorted(by_round.items())
    return out


# drawing -----------------------------------------------------------------------------------------
def render(job_id: str, job: Mapping[str, Any], ranks: Mapping[Any, Mapping[str, Any]], *,
           eval_results: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
           log_lines: Iterable[str] = (), now: float, path: str | os.PathLike | None = None):
    """The job's figure (eval curves above, timeline below); written as PNG to ``path`` when given.

    ``eval_results`` (``eval_results.json``) wins; without it the log's eval lines are plotted."""
    if eval_results:
        curves, source = curves_from_results(eval_results), "eval_results.json"
    else:
        curves, source = curves_from_log(log_lines), "eval lines of the job log"
    tl = timeline(job, ranks, now)
    state = str(job.get("state") or "?")
    title = f"job {job_id} | {job.get('framework') or '?'} | {state}"
    if tl.attempts:
        title += f" | attempt {tl.attempts}"
    latest = next((dict(st.get("metrics") or {}) for k, st in ranks.items() if int(k) == 0), {})
    fig = figure(tl, curves, title=title, curves_source=source, latest=latest)
    if path is not None:
        save(fig, path)
    return fig


def figure(tl: Timeline, curves: Curves, *, title: str, curves_source: str,
           latest: Mapping[str, Any] | None = None):
    """A matplotlib Figure with one curve panel per metric (at most MAX_METRICS) and the timeline;
    without curves, rank 0's ``latest`` reported metrics are written instead."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(12, 7 + 0.35 * max(0, len(tl.lanes) - 4)), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(title + (f"\n{tl.note}" if tl.note else ""), fontsize=11, y=0.985)
    _draw_curves(fig, curves, curves_source, latest or {})
    _draw_timeline(fig, tl)
    return fig


def save(fig, path: str | os.PathLike) -> str:
    fig.savefig(os.fspath(path), format="png", dpi=fig.dpi, facecolor="white")
    return os.fspath(path)


def _draw_curves(fig, curves: Curves, source: str, latest: Mapping[str, Any]) -> None:
    left, bottom, right, top = CURVES_BOX
    metrics = sorted(curves)[:MAX_METRICS]
    grid = fig.add_gridspec(1, max(1, len(metrics)), left=left, bottom=bottom, right=right, top=top, wspace=0.25)
    if not metrics:
        ax = fig.add_subplot(grid[0, 0])
        ax.set_axis_off()
        text = "no eval history for this job\n(XGBoost and LightGBM jobs with an eval_set have one)"
        if latest:
            text += "\n\nlatest metrics of rank 0: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(latest.items()))
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="#616161", transform=ax.transAxes)
        return
    datasets = sorted({d for m in metrics for d in curves[m]}, key=lambda d: (d != "train", d))
    colour = {d: CURVE_COLOURS[i % len(CURVE_COLOURS)] for i, d in enumerate(datasets)}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(grid[0, i])
        for dataset, points in sorted(curves[metric].items(), key=lambda kv: (kv[0] != "train", kv[0])):
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, color=colour[dataset], linewidth=2, marker="o" if len(xs) < 15 else None,
                    label=dataset or metric)
        ax.set_title(metric + (f"  ({source})" if i == 0 else ""), fontsize=10)
        ax.set_xlabel("round", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hidden = len(curves) - len(metrics)
    if hidden > 0:
        fig.text(right, top + 0.035, f"(+{hidden} more metrics not drawn)", ha="right", fontsize=8)


def _draw_timeline(fig, tl: Timeline) -> None:
    from matplotlib.patches import Patch

    left, bottom, right, top = TIMELINE_BOX
    ax = fig.add_axes((left, bottom, right - left, top - bottom))
    n = len(tl.lanes)
    span_end = max([tl.end] + [s.end for lane in tl.lanes for s in lane.spans]) or 1.0
    for i, lane in enumerate(tl.lanes):
        y = n - 1 - i   # the job on top, ranks below in order
        for s in lane.spans:
            ax.broken_barh([(s.start, max(s.seconds, 0.0))], (y - 0.35, 0.7), facecolors=COLOURS[s.phase],
                           edgecolor="white", linewidth=0.5, hatch="//" if s.phase == EARLIER else None)
            if s.seconds >= 0.07 * span_end:
                ax.text(s.start + s.seconds / 2, y, _duration(s.seconds), ha="center", va="center", fontsize=8,
                        color="white" if s.phase in ("upload", "rendezvous") else "black")
        for m in lane.marks:
            ax.plot([m.at], [y], marker="x" if m.bad else "|", markersize=10, markeredgewidth=2,
                    color=FAILED_COLOUR if m.bad else "black")
            ax.annotate(m.label, (m.at, y + 0.38), fontsize=7, ha="center", va="bottom",
                        color=FAILED_COLOUR if m.bad else "black")
    ax.set_yticks(range(n), [lane.label for lane in reversed(tl.lanes)], fontsize=8)
    ax.set_ylim(-0.6, n - 0.2)
    ax.set_xlim(min(0.0, *(s.start for lane in tl.lanes for s in lane.spans)), span_end * 1.05)
    ax.set_xlabel("seconds since submission", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    used = [p for p in (*PHASES, HELD, EARLIER) if any(s.phase == p for lane in tl.lanes for s in lane.spans)]
    ax.legend(handles=[Patch(facecolor=COLOURS[p], label=p) for p in used], loc="lower left",
              bbox_to_anchor=(0.0, 1.01), ncol=len(used) or 1, fontsize=8, frameon=False)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)[:40]


def _duration(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.0f}s"


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("gangway draws job plots with matplotlib, which is not installed here: "
                          "pip install 'gangway[plot]' (or matplotlib>=3.6)") from exc
    return Figure, FigureCanvasAgg


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _decoded(v: Any, default: Any) -> Any:
    """A hash field that may still be JSON text (straight from Redis) or already decoded (from the CLI)."""
    if isinstance(v, str):
        try:
            return json.loads(v) if v else default
        except ValueError:
            return default
    return default if v is None else v
