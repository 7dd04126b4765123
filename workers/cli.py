"""The ``gangway`` command: up, check, fleet, jobs, demo, worker, coordinator."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import click

from common.errors import GangwayError
from common.settings import Settings


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


@click.group()
@click.option("--broker-url", envvar=None, default=None, help="Redis URL (env GANGWAY_BROKER_URL).")
@click.option("--s3-endpoint", default=None, help="S3 endpoint (env GANGWAY_S3_ENDPOINT).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def main(ctx: click.Context, broker_url: str | None, s3_endpoint: str | None, verbose: bool) -> None:
    """gangway: distributed XGBoost/LightGBM/PyTorch training from a Celery job queue."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(broker_url=broker_url, s3_endpoint=s3_endpoint)
    except GangwayError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.obj = {"settings": settings}


@main.command()
@click.option("--workers", "n_workers", default=2, show_default=True, help="Trainer workers to start.")
@click.option("--gpus", is_flag=True, help="GPU workers, CUDA_VISIBLE_DEVICES pinned to each one's GPUs.")
@click.option("--gpus-per-worker", default=1, show_default=True,
              help="With --gpus: GPUs each worker owns (a rank asking num_gpus=K needs a worker with K).")
@click.option("--bind", default=None, metavar="ADDRESS",
              help="Serve the Redis and S3 it starts on this address, for worker hosts (env GANGWAY_BIND; "
                   "not loopback: GANGWAY_BROKER_URL must carry a password).")
@click.pass_context
def up(ctx: click.Context, n_workers: int, gpus: bool, gpus_per_worker: int, bind: str | None) -> None:
    """Start the embedded fleet (only what does not already answer) and keep it running until SIGINT/SIGTERM:
    a process it started that dies is restarted with backoff (1 s, 2 s, 4 s … 30 s); one that dies 5 times
    within a minute is left stopped and `gangway check` names it."""
    from workers.local.fleet import Fleet
    fleet = Fleet(_settings(ctx).replace(bind=bind) if bind else _settings(ctx), workers=n_workers, gpus=gpus,
                  gpus_per_worker=gpus_per_worker)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        fleet.start()
    except GangwayError as exc:
        raise click.ClickException(str(exc)) from exc
    fleet.write_status()
    s = fleet.settings
    click.echo(f"gangway fleet ready: {n_workers} workers; broker {s.redacted_broker_url}; "
               f"S3 {s.s3_url}; {fleet.describe()}", err=False)
    sys.stdout.flush()
    try:
        # A supervisor: what it started and dies is restarted with backoff; only a signal stops the fleet.
        while not stop.wait(0.5):
            for event in fleet.supervise_once():
                click.echo(f"gangway: {time.strftime('%H:%M:%S')} {event}", err=True)
    finally:
        click.echo("gangway: stopping what this command started ...")
        fleet.stop()
        click.echo("gangway: stopped")


@main.command()
@click.option("--self", "self_only", is_flag=True,
              help="Also require a live coordinator or worker registered from this host (container health).")
@click.pass_context
def check(ctx: click.Context, self_only: bool) -> None:
    """Exit 0 only when broker, store, coordinator and at least one worker answer."""
    import socket

    from common import keys
    from common.state import State, connect
    from common.store import S3Store
    from workers.local.fleet import given_up
    s = _settings(ctx)
    problems = []
    mine = []
    try:
        state = State(connect(s))
        state.r.ping()
        if not state.coordinator_alive():
            problems.append("coordinator: not answering")
        alive = [w for w in state.workers() if w.alive]
        if not alive:
            problems.append("workers: none alive")
        host = socket.gethostname()
        mine = [f"worker {w.info.worker_id}" for w in alive if w.info.host == host]
        if state.coordinator_alive() and state.r.hget(keys.COORDINATOR_INFO, "host") == host:
            mine.append("coordinator")
        if self_only and not mine:
            problems.append(f"self: no live coordinator or worker registered from host {host!r}")
    except Exception as exc:
        problems.append(f"broker {s.redacted_broker_url}: {type(exc).__name__}: {exc}")
        alive = []
    try:
        S3Store(s).ping()
    except GangwayError as exc:
        problems.append(f"store: {exc}")
    problems += [f"supervisor: {line}" for line in given_up(s.home)]
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: broker, store, coordinator and {len(alive)} workers answer"
               + (f"; this host runs {', '.join(mine)}" if self_only else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Coordinator and workers, with their metrics URLs.")
@click.pass_context
def fleet(ctx: click.Context, as_json: bool) -> None:
    """List trainer workers: id, host, CPUs/GPUs, state, current job."""
    from common.state import State, connect
    from workers.local.prometheus import fleet_description
    desc = fleet_description(State(connect(_settings(ctx))))
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    click.echo(f"{'ID':<16} {'HOST':<20} {'CPUS':>4} {'GPUS':<6} {'STATE':<9} JOB")
    for r in desc["workers"]:
        click.echo(f"{r['id']:<16} {r['host']:<20} {r['cpus']:>4} {','.join(r['gpus']) or '-':<6} "
                   f"{r['state']:<9} {r['job'] or '-'}")


@main.command("prometheus-config")
@click.option("--scrape-interval", default="5s", show_default=True)
@click.option("--rules", "rule_files", multiple=True, help="Rule files to load (repeatable).")
@click.pass_context
def prometheus_config_cmd(ctx: click.Context, scrape_interval: str, rule_files: tuple[str, ...]) -> None:
    """Print a prometheus.yml that scrapes this fleet's coordinator and workers."""
    from common.state import State, connect
    from workers.local.prometheus import prometheus_config
    click.echo(prometheus_config(State(connect(_settings(ctx))), scrape_interval=scrape_interval,
                                 rule_files=rule_files), nl=False)


@main.group(invoke_without_command=True)
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List jobs and their states (newest first)."""
    if ctx.invoked_subcommand:
        return
    from common.state import State, connect
    rows = State(connect(_settings(ctx))).list_jobs(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'JOB':<26} {'FRAMEWORK':<9} {'STATE':<10} {'ATTEMPT':>7}  SUBMITTED")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r["submitted_at"] or 0)))
        click.echo(f"{r['job_id']:<26} {r['framework']:<9} {r['state']:<10} {r['attempt']:>7}  {when}")


@jobs.command("show")
@click.argument("job_id")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Also draw its eval curves and timeline (per rank) to this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="The raw job record, ranks and log tail as JSON.")
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, plot_path: str | None, as_json: bool) -> None:
    """One job: state, attempts, ranks, error headline and log tail (--json: the whole record)."""
    from common.state import State, connect
    state = State(connect(_settings(ctx)))
    job = state.job(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id!r}")
    out = {k: _maybe_json(v) for k, v in job.items()}
    out["ranks"] = state.ranks(job_id)
    out["log"] = state.log(job_id)[-20:]
    click.echo(json.dumps(out, indent=2, default=str) if as_json else job_summary(job_id, out))
    if plot_path:
        from producer.jobs import TrainingJob
        try:
            TrainingJob(job_id, settings=_settings(ctx)).plot(plot_path)
        except (GangwayError, ImportError, OSError) as exc:
            raise click.ClickException(f"could not draw {plot_path}: {exc}") from exc
        click.echo(f"plot of job {job_id} written to {plot_path}", err=True)


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a pending or running job."""
    from producer.jobs import TrainingJob
    try:
        st = TrainingJob(job_id, settings=_settings(ctx)).cancel(wait=10)
    except GangwayError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{job_id}: {st.state.value}")


def job_summary(job_id: str, job: dict) -> str:
    """What a person wants from `jobs show`: a dozen lines, not the record."""
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    lines = [f"job {job_id}: {job.get('state', '?')} ({job.get('framework', '?')}, attempt {job.get('attempt', 0)}"
             f" of {int(spec.get('max_failures') or 0) + 1})",
             f"  submitted {_clock(job, 'submitted_at')}  started {_clock(job, 'started_at')}  finished {_clock(job, 'finished_at')}"]
    if job.get("waiting") and job.get("state") == "PENDING":
        lines.append(f"  waiting: {job['waiting']}")
    gang = (job.get("gang") or {}).get("workers", []) if isinstance(job.get("gang"), dict) else []
    for rank, r in sorted(job.get("ranks", {}).items(), key=lambda kv: int(kv[0])):
        worker = r.get("worker") or (gang[int(rank)] if int(rank) < len(gang) else "?")
        it = f" round {r['iteration']}/{r.get('total', '?')}" if r.get("iteration") is not None else ""
        lines.append(f"  rank {rank}: {r.get('state', '?'):<10} on {worker}{it}")
    err = job.get("error") if isinstance(job.get("error"), dict) else None
    if err:
        head = (err.get("message") or "").strip().splitlines()[:1]
        lines.append(f"  error: {err.get('type', 'Error')}: {head[0][:300] if head else ''}")
        for rank, e in sorted((err.get("rank_errors") or {}).items()):
            msg = (e.get("message") or "").strip().splitlines()[:1]
            lines.append(f"    rank {rank}: {e.get('type', 'Error')}: {msg[0][:200] if msg else ''}")
    if job.get("log"):
        lines.append("  log (last lines):")
        lines += [f"    {line}" for line in job["log"][-8:]]
    lines.append(f"  (`gangway jobs show {job_id} --json` for the whole record)")
    return "\n".join(lines)


def _clock(job: dict, key: str) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(job[key]))) if job.get(key) else "-"


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


@main.command()
@click.option("--workers", "n_workers", default=2, show_default=True)
@click.option("--rows", default=200_000, show_default=True, help="Rows of the synthetic dataset.")
@click.option("--rounds", default=50, show_default=True)
@click.pass_context
def demo(ctx: click.Context, n_workers: int, rows: int, rounds: int) -> None:
    """Train distributed XGBoost on a synthetic dataset through the fleet (started if needed)."""
    from workers.local.demo import run_demo
    try:
        run_demo(_settings(ctx), n_workers=n_workers, rows=rows, rounds=rounds, echo=click.echo)
    except GangwayError as exc:
        raise click.ClickException(str(exc)) from exc


def _exec_celery(module: str, queue: str, name: str, pool: str, concurrency: int) -> None:
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue, "-n", name,
                               "-P", pool, "-c", str(concurrency), "--without-gossip", "--without-mingle",
                               "-l", "INFO"])


@main.command()
@click.option("--id", "worker_id", default=None, help="Worker id (env GANGWAY_WORKER_ID; default host-random).")
@click.option("--ports", default=None, help="Port block, e.g. 29500-29509 (env GANGWAY_WORKER_PORTS).")
@click.pass_context
def worker(ctx: click.Context, worker_id: str | None, ports: str | None) -> None:
    """Run one trainer worker (Celery, concurrency 1, its own direct queue)."""
    import socket
    import uuid

    from common import keys
    s = _settings(ctx)
    wid = worker_id or s.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    os.environ.update(s.as_env())
    os.environ["GANGWAY_WORKER_ID"] = wid
    if ports:
        os.environ["GANGWAY_WORKER_PORTS"] = ports
    if s.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prefork: the main process serves what it and its training child recorded
        from common.metrics import prepare_multiprocess_dir
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prepare_multiprocess_dir(os.path.join(s.home, "metrics", wid))
    _exec_celery("workers.runtime.main", keys.worker_queue(wid), f"{wid}@%h", "prefork", 1)


@main.command()
@click.pass_context
def coordinator(ctx: click.Context) -> None:
    """Run the coordinator (a Celery worker on queue gangway.coordinator)."""
    from common import keys
    os.environ.update(_settings(ctx).as_env())
    _exec_celery("workers.coordinator.main", keys.COORDINATOR_QUEUE, "coordinator@%h", "solo", 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to bind; other than loopback only with --basic-auth.")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:PASSWORD",
              help="Require HTTP basic auth (repeatable); Flower's full API, control included.")
@click.option("--read-only", is_flag=True, help="No revoke/shutdown/send-task even with --basic-auth.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def flower(ctx: click.Context, port: int, address: str, basic_auth: tuple[str, ...], read_only: bool,
           flower_args: tuple[str, ...]) -> None:
    """Run Celery Flower on the fleet's broker. Without --basic-auth its API is open but read-only.

    Further arguments go to Flower as they are, e.g. `gangway flower -- --url_prefix=flower`.
    """
    from workers.flower import flower_command
    s = _settings(ctx)
    try:
        cmd = flower_command(s, port=port, address=address, basic_auth=basic_auth, read_only=read_only,
                             extra=flower_args, environ=os.environ)
    except GangwayError as exc:
        raise click.ClickException(str(exc)) from exc
    access = "basic auth" if cmd.authenticated else "API open without auth"
    click.echo(f"gangway flower: http://{address}:{port} on broker {s.redacted_broker_url}; {access}"
               f"{', read-only' if cmd.read_only else ''}")
    sys.stdout.flush()
    for key in [k for k in os.environ if k.startswith("GANGWAY_")]:   # no job secret or S3 keys in Flower
        del os.environ[key]
    os.environ.update(cmd.env)
    os.execvp(cmd.argv[0], cmd.argv)


if __name__ == "__main__":
    main()
