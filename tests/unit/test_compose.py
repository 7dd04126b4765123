"""The production compose stack (compose/) as `docker-compose config` and `promtool` read it, and its
image entrypoint (address advertisement, one GPU per worker replica) run for real with `sh` and `flock`.

No Docker engine is needed: images are not built here. The tools skip locally with a reason when
missing and fail under CI=true.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import posixpath
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from common.settings import ENV_PREFIX, Settings
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE / ".env.example"
PROMETHEUS_YML = COMPOSE / "prometheus" / "prometheus.yml"
ENTRYPOINT = COMPOSE / "entrypoint.sh"
GANGWAY_SERVICES = ("coordinator", "worker-gpu", "worker-cpu")
WORKER_SERVICES = ("worker-gpu", "worker-cpu")
REQUIRED_SECRETS = ("REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY",
                    "JOB_SECRET", "GRAFANA_ADMIN_PASSWORD", "FLOWER_BASIC_AUTH")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        why = f"{binary} is not on PATH (Debian: apt-get install {binary})"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    return path


def _compose_config(env_file: Path) -> subprocess.CompletedProcess:
    # A clean environment: compose lets the caller's variables win over the env file.
    return subprocess.run([_need("docker-compose"), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def stack() -> dict:
    """The stack as compose resolves it with the example env file."""
    done = _compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS_YML.read_text())


def _gangway_env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith(ENV_PREFIX)}


def test_the_stack_resolves_with_the_example_env_file(stack):
    assert {"redis", "minio", "minio-init", "coordinator", "worker-gpu", "worker-cpu", "flower", "prometheus",
            "grafana"} <= set(stack["services"])


def test_a_missing_secret_stops_compose_with_a_message_naming_it(tmp_path):
    env = tmp_path / "partial.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in _env_file(ENV_EXAMPLE).items() if k != "JOB_SECRET"))
    done = _compose_config(env)
    assert done.returncode != 0 and "set JOB_SECRET in compose/.env" in done.stderr, done.stderr


def test_every_secret_of_the_example_env_is_required_by_the_compose_file():
    text, example = COMPOSE_FILE.read_text(), _env_file(ENV_EXAMPLE)
    for name in REQUIRED_SECRETS:
        assert name in example, f"{name} is missing from {ENV_EXAMPLE.name}"
        assert re.search(r"\$\{" + name + r":\?[^}]+\}", text), f"{name} is not required with ${{{name}:?...}}"


def test_every_gangway_variable_the_stack_sets_is_a_setting(stack):
    fields = {f.name for f in dataclasses.fields(Settings)}
    seen = set()
    for name, service in stack["services"].items():
        env = _gangway_env(service)
        unknown = sorted(k for k in env if k[len(ENV_PREFIX):].lower() not in fields)
        assert not unknown, f"service {name} sets {unknown}, which are no fields of common.settings.Settings"
        Settings.from_env(env).port_block   # every value parses (ConfigurationError names the variable)
        seen |= set(env)
    assert {"GANGWAY_BROKER_URL", "GANGWAY_S3_ENDPOINT", "GANGWAY_METRICS_PORT", "GANGWAY_WORKER_PORTS"} <= seen


def test_gangway_processes_reach_redis_with_its_password_and_minio_by_service_name(stack):
    password = _env_file(ENV_EXAMPLE)["REDIS_PASSWORD"]
    redis_cmd = stack["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == password
    for name in (*GANGWAY_SERVICES, "flower"):
        s = Settings.from_env(_gangway_env(stack["services"][name]))
        assert s.broker_url == f"redis://:{password}@redis:6379/0", name
        if name != "flower":
            assert (s.s3_endpoint, s.metrics_port) == ("http://minio:9000", 9464), name


def test_each_gpu_worker_replica_gets_exactly_one_gpu(stack):
    # A reservation of `count: 1` is GPU 0 in every replica (Docker numbers a count from 0), so
    # `--scale worker-gpu=N` would stack N workers on one GPU: every replica sees the host's GPUs and
    # the entrypoint pins it to one that no other replica holds (tested below with flock for real).
    gpu = stack["services"]["worker-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["capabilities"], device["count"]) == ("nvidia", ["gpu"], "all")
    claims = gpu["environment"]["GPU_CLAIM_DIR"]
    assert any(v.split(":")[1] == claims and not v.startswith(("/", ".")) for v in gpu["volumes"]), \
        f"{claims} must be a named volume that every replica shares, got {gpu['volumes']}"
    assert "CUDA_VISIBLE_DEVICES" not in gpu["environment"] and "GANGWAY_WORKER_GPUS" not in gpu["environment"]


def test_worker_services_can_be_scaled(stack):
    for name in WORKER_SERVICES:
        service = stack["services"][name]
        assert "container_name" not in service and not service.get("ports"), \
            f"{name}: a fixed container name or a published port stops `--scale {name}=N`"
        assert service["command"] == ["gangway", "worker"]


def test_every_gangway_service_is_health_checked_with_gangway_check(stack):
    for name in GANGWAY_SERVICES:
        test = stack["services"][name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and "gangway check" in " ".join(test[1:]), f"{name}: {test}"
    assert stack["services"]["flower"]["healthcheck"]["test"]


def test_prometheus_config_passes_promtool():
    promtool = _need("promtool")
    if not (PROMETHEUS_YML.parent / "rules.yml").exists():
        why = "compose/prometheus/rules.yml (the alert rules) does not exist yet; promtool needs it"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_the_coordinator_and_every_worker_service_on_their_metrics_port(stack, prometheus):
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    port = {name: int(stack["services"][name]["environment"]["GANGWAY_METRICS_PORT"]) for name in GANGWAY_SERVICES}
    coordinator = [t for sc in jobs["gangway-coordinator"]["static_configs"] for t in sc["targets"]]
    assert coordinator == [f"coordinator:{port['coordinator']}"]
    [dns] = jobs["gangway-workers"]["dns_sd_configs"]
    assert dns["type"] == "A" and sorted(dns["names"]) == sorted(WORKER_SERVICES)
    assert all(dns["port"] == port[name] for name in WORKER_SERVICES), (dns["port"], port)


def test_prometheus_loads_the_rules_file_that_compose_mounts(stack, prometheus):
    mounts = {}
    for v in stack["services"]["prometheus"]["volumes"]:
        source, target = v.split(":")[:2]
        mounts[target] = source
    config_target = next(t for t, s in mounts.items() if Path(s).resolve() == PROMETHEUS_YML.resolve())
    for rule_file in prometheus["rule_files"]:
        target = posixpath.join(posixpath.dirname(config_target), rule_file)
        assert target in mounts, f"rule file {rule_file} resolves to {target}, which is not mounted: {mounts}"
        assert Path(mounts[target]).resolve() == PROMETHEUS_YML.parent / rule_file
    assert "/etc/prometheus/rules.yml" in mounts


def test_grafana_mounts_the_repositorys_provisioning_and_dashboards(stack):
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in stack["services"]["grafana"]["volumes"]
              if v.split(":")[0].startswith("/")}
    assert mounts["/etc/grafana/provisioning"].resolve() == ROOT / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"].resolve() == ROOT / "grafana" / "dashboards"
    providers = [p for f in (ROOT / "grafana" / "provisioning" / "dashboards").glob("*.yml")
                 for p in yaml.safe_load(f.read_text()).get("providers", [])]
    assert any(p["options"]["path"] == "/var/lib/grafana/dashboards" for p in providers), providers


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!")
        if any(pat == "**" or fnmatch.fnmatchcase(c, pat) or
               (pat.startswith("**/") and fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], pat[3:])) for c in candidates):
            ignored = not negate
    return ignored


def test_everything_the_dockerfiles_copy_exists_and_is_in_the_build_context():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (COMPOSE / dockerfile).read_text()
        assert 'ENTRYPOINT ["gangway-entrypoint"]' in text, dockerfile
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
            for source in [w for w in line.split() if not w.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
                assert not _docker_ignored(source, patterns), f"{dockerfile} copies {source}; .dockerignore drops it"


# -- the entrypoint, for real ------------------------------------------------------------------------------

@pytest.fixture()
def gpu_host(tmp_path):
    """A PATH whose nvidia-smi lists GPUs 0 and 1, and an empty claims directory."""
    _need("sh")
    _need("flock")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\nfor g in ${FAKE_GPUS:-0 1}; do echo "$g"; done\n')
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_CLAIM_DIR": str(tmp_path / "claims"),
           "GANGWAY_WORKER_HOST": "10.0.0.7"}
    procs: list[subprocess.Popen] = []

    def start(**extra) -> subprocess.Popen:
        p = subprocess.Popen([str(ENTRYPOINT), "sh", "-c", 'echo "gpu=$CUDA_VISIBLE_DEVICES"; exec sleep 60'],
                             env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close(), p.stderr.close()


def test_gpu_worker_replicas_claim_distinct_gpus_and_a_surplus_replica_exits(gpu_host):
    assert gpu_host().stdout.readline().strip() == "gpu=0"
    assert gpu_host().stdout.readline().strip() == "gpu=1"
    third = gpu_host()
    assert third.wait(timeout=30) == 1
    assert "fewer than 1 free GPUs on this host (0,1); the others are held by other worker" in third.stderr.read()


def test_gpu_worker_replicas_of_k_gpus_each_claim_disjoint_sets(gpu_host):
    four = {"FAKE_GPUS": "0 1 2 3", "GPUS_PER_WORKER": "2"}
    assert gpu_host(**four).stdout.readline().strip() == "gpu=0,1"
    assert gpu_host(**four).stdout.readline().strip() == "gpu=2,3"
    third = gpu_host(**four)
    assert third.wait(timeout=30) == 1 and "scale worker-gpu to at most 2" in third.stderr.read()
    bad = gpu_host(GPUS_PER_WORKER="9")
    assert bad.wait(timeout=30) == 1 and "claims 1 to 7 GPUs" in bad.stderr.read()


def test_a_stopped_replica_frees_its_gpu(gpu_host):
    first = gpu_host()
    assert first.stdout.readline().strip() == "gpu=0"
    assert gpu_host().stdout.readline().strip() == "gpu=1"
    first.kill()
    first.wait()   # the lock goes with the process that held it
    assert gpu_host().stdout.readline().strip() == "gpu=0"


def test_a_pinned_gpu_is_left_alone(gpu_host):
    p = gpu_host(CUDA_VISIBLE_DEVICES="1")
    assert p.stdout.readline().strip() == "gpu=1"


def test_the_entrypoint_advertises_the_containers_own_address_and_refuses_loopback(tmp_path):
    _need("sh")
    env = {"PATH": os.environ["PATH"]}
    done = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "$GANGWAY_WORKER_HOST"'], env=env,
                          capture_output=True, text=True, timeout=60)
    own = socket.gethostbyname(socket.gethostname())
    if own.startswith("127."):   # e.g. Debian's /etc/hosts: peers could never dial this
        assert done.returncode == 1 and f"resolves to {own}" in done.stderr, done.stderr
    else:                        # a container: its address on the compose network
        assert (done.returncode, done.stdout.strip()) == (0, own), done.stderr
    kept = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "$GANGWAY_WORKER_HOST"'],
                          env={**env, "GANGWAY_WORKER_HOST": "192.0.2.10"}, capture_output=True, text=True, timeout=60)
    assert kept.stdout.strip() == "192.0.2.10"
