"""A worker's memory budget and how a rank's GBDT data is held within it.

The decisions are pure functions of sizes (unit-tested); the readers of cgroup limits and of what
the worker's processes hold (``/proc/<pid>/smaps_rollup``) are thin. The budget covers the worker's
whole process tree (Celery processes, the zygote or warm standby, the training child): what the tree
already holds is subtracted before a shard is planned into the rest.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from common.errors import ConfigurationError, WorkerMemoryError
from common.settings import Settings

MiB = 1024 ** 2
# Per row, what XGBoost keeps in memory however the matrix is held: label, weight, gradient pair,
# prediction cache, row partition and the tree builder's row sets. Measured (xgboost 3.2, 28
# features, ExtMemQuantileDMatrix + 5 rounds, anonymous memory): 56 B/row at 1M rows, 48 at 3M,
# i.e. ~44 B per extra row on top of a fixed part.
GBDT_BYTES_PER_ROW = 44
# What the training child adds whatever the rows (collective buffers, per-thread histograms, the
# fixed part above, malloc arenas), the standby/zygote growing while the child trains, and the pages the
# child shares with its zygote when it plans (counted once then) that it copies as it writes them.
GBDT_FIXED_BYTES = 96 * MiB
# Chunks in memory at once while a matrix is built from chunk files: the DataIter's current chunk,
# its float32 copy, and XGBoost's page/batch under construction (about a chunk's rows).
CHUNKS_IN_FLIGHT = 3
# The quantised matrix: one byte per value for max_bin <= 256 (two above).
HIST_BYTES_PER_VALUE = 1
# LightGBM in core: the float32 matrix its Dataset bins from (``float32_matrix``), held with the Arrow
# shard it is copied from until the Dataset is built. Measured (LightGBM 4.7, 2M + 1M eval rows x 28, in
# core): a worker tree 911 MiB above its planned "in use", 634 MiB planned without it.
MATRIX_BYTES_PER_VALUE = 4
# XGBoost's quantile sketch, held while a QuantileDMatrix or ExtMemQuantileDMatrix is built (in core and
# out of core alike): a summary per feature that grows with log2(rows). Measured (xgboost 3.2, max_bin
# 256, dense float32, anonymous memory above the process's floor, `bench/xgb_sketch.py`): per feature
# 0.72 MiB at 33K rows, 1.10 at 100K, 1.75 at 300K, 2.72 at 1M, 3.12 at 2M; 250 features x 5.4M rows a
# rank went to ~965 MiB. Planned as 0.45 MiB per feature per doubling of rows past 2^13.3, at least
# 0.75 MiB a feature (above every measurement), in proportion to max_bin above 256.
SKETCH_BYTES_PER_FEATURE_LEVEL = 0.45 * MiB
SKETCH_LEVEL_FLOOR = 13.3
SKETCH_MIN_BYTES_PER_FEATURE = 0.75 * MiB
# LightGBM samples up to ``bin_construct_sample_cnt`` rows (200,000) to find its bins. From chunk
# Sequences (out of core) its Python side lists the sampled rows (a float64 row array each, ~112 B of
# object per row), stacks them, transposes them and keeps each column's non-zero values with int32 row
# indices: ~28 B a sampled value plus the rows' objects, all held at once (3M rows x 28 features out of
# core: a tree 567 MiB at its peak against a plan of 578 without it). In core its C++ side keeps the
# sampled values as doubles with their indices (12 B a value): the larger figure is planned for both.
LGB_SAMPLE_BYTES_PER_VALUE = 28
LGB_SAMPLE_BYTES_PER_ROW = 112
LGB_SAMPLE_ROWS = 200_000


class HoldMode(str, enum.Enum):
    IN_CORE = "in_core"          # Arrow shard in memory, QuantileDMatrix next to it
    EXTERNAL = "external"        # chunks streamed from the on-disk cache, ExtMemQuantileDMatrix pages on disk


@dataclass(frozen=True)
class ShardSize:
    """What a rank will train on: Arrow bytes, rows and features of its train (+ eval) shards."""

    nbytes: int
    rows: int
    features: int
    largest_chunk: int
    max_bin: int = 256
    sample_rows: int = LGB_SAMPLE_ROWS   # LightGBM's bin_construct_sample_cnt

    @property
    def quantised_bytes(self) -> int:
        return self.rows * self.features * (HIST_BYTES_PER_VALUE if self.max_bin <= 256 else 2)

    @property
    def bin_sample_bytes(self) -> int:
        """LightGBM's sample of rows while it finds its bins (see LGB_SAMPLE_BYTES_PER_VALUE)."""
        sampled = min(self.rows, self.sample_rows)
        return sampled * (self.features * LGB_SAMPLE_BYTES_PER_VALUE + LGB_SAMPLE_BYTES_PER_ROW)

    @property
    def sketch_bytes(self) -> int:
        """XGBoost's quantile sketch while its matrix is built (see SKETCH_BYTES_PER_FEATURE_LEVEL)."""
        import math
        levels = math.log2(max(self.rows, 2)) - SKETCH_LEVEL_FLOOR
        per_feature = max(SKETCH_MIN_BYTES_PER_FEATURE, SKETCH_BYTES_PER_FEATURE_LEVEL * levels)
        return int(self.features * per_feature * max(1.0, self.max_bin / 256))


@dataclass(frozen=True)
class MemoryPlan:
    mode: HoldMode
    budget: int
    in_use: int
    in_core_need: int
    external_need: int

    def describe(self) -> str:
        return (f"{self.mode.value}: budget {self.budget / MiB:.0f} MiB, worker tree using {self.in_use / MiB:.0f} MiB, "
                f"in core needs {self.in_core_need / MiB:.0f} MiB, out of core {self.external_need / MiB:.0f} MiB")


def default_worker_memory(cgroup_limit: int | None, host_memory: int, host_cpus: int, worker_cpus: int) -> int:
    """The budget when GANGWAY_WORKER_MEMORY is unset: the container's cgroup limit if it has one (a
    container per worker), else the host's memory split evenly among its workers (host CPUs / the
    CPUs each worker takes; the local fleet gives each worker an equal share)."""
    if cgroup_limit:
        return min(cgroup_limit, host_memory)
    workers = max(1, host_cpus // worker_cpus) if worker_cpus > 0 else 1
    return host_memory // workers


OUT_OF_CORE_CHOICES = ("auto", "always", "never")


def plan_gbdt(shard: ShardSize, budget: int, in_use: int, out_of_core: str = "auto", *,
              raw_in_core: bool = True, sketch: bool = False, bins_in_memory: bool = False,
              bin_sample: bool = False) -> MemoryPlan:
    """In core when the quantised matrix and the per-row state (and, with ``raw_in_core``, the whole
    Arrow shard and the float32 matrix copied from it: LightGBM) fit what the budget has left; else out
    of core (a few chunks and a matrix page at a time, plus the per-row state); WorkerMemoryError, with
    the numbers, when not even that fits. XGBoost streams its in-core ``QuantileDMatrix`` from the chunk files too
    (``raw_in_core=False``): the raw shard is never whole in memory. ``out_of_core`` ("always",
    "never") overrides the choice, e.g. to compare both modes on one dataset. ``sketch``: the framework
    builds XGBoost's quantile sketch (``ShardSize.sketch_bytes``, either mode), which dominates for wide
    rows: 250 features need ~1 GiB of it at 5M rows a rank. ``bins_in_memory``: the binned matrix stays
    in memory out of core too (LightGBM: only its raw data streams; XGBoost's pages go to disk).
    ``bin_sample``: the framework samples rows to find its bins (LightGBM, ``ShardSize.bin_sample_bytes``)."""
    if out_of_core not in OUT_OF_CORE_CHOICES:
        raise ConfigurationError(f"GANGWAY_OUT_OF_CORE must be one of {list(OUT_OF_CORE_CHOICES)}, "
                                 f"got {out_of_core!r}")
    per_row = (shard.rows * GBDT_BYTES_PER_ROW + GBDT_FIXED_BYTES + (shard.sketch_bytes if sketch else 0)
               + (shard.bin_sample_bytes if bin_sample else 0))
    window = CHUNKS_IN_FLIGHT * shard.largest_chunk
    raw = shard.nbytes + shard.rows * shard.features * MATRIX_BYTES_PER_VALUE if raw_in_core else window
    in_core = raw + shard.quantised_bytes + per_row
    # Out of core XGBoost's quantised pages live in the rank folder; only the chunk window and the per-row
    # state stay in memory (and LightGBM's binned Dataset, which has no pages).
    external = window + per_row + (shard.quantised_bytes if bins_in_memory else 0)
    left = budget - in_use
    fits = in_core <= left if out_of_core == "auto" else out_of_core == "never"
    plan = MemoryPlan(HoldMode.IN_CORE if fits else HoldMode.EXTERNAL, budget, in_use, in_core, external)
    if plan.mode == HoldMode.EXTERNAL and external > left:
        raise WorkerMemoryError(
            f"a shard of {shard.rows:,} rows x {shard.features} features ({shard.nbytes / MiB:.0f} MiB of Arrow) "
            f"does not fit GANGWAY_WORKER_MEMORY={budget / MiB:.0f} MiB even out of core: the worker's processes "
            f"use {in_use / MiB:.0f} MiB, and training needs {external / MiB:.0f} MiB out of core "
            f"({in_core / MiB:.0f} MiB in core"
            + (f"; of it {shard.sketch_bytes / MiB:.0f} MiB for XGBoost's quantile sketch of {shard.features} "
               f"features" if sketch else "")
            + f"); raise GANGWAY_WORKER_MEMORY to at least {(in_use + external) / MiB:.0f} MiB or use more workers")
    return plan


def plan_stream(shard: ShardSize, budget: int, in_use: int) -> MemoryPlan:
    """PyTorch ranks always stream: the shard is memory-mapped chunk files (file-backed pages the kernel
    can drop), and what the rank adds on the heap is a window of chunks (a chunk, its shuffled copy and
    the batch being cut). WorkerMemoryError, with the numbers, when not even that window fits."""
    window = CHUNKS_IN_FLIGHT * shard.largest_chunk
    plan = MemoryPlan(HoldMode.EXTERNAL, budget, in_use, shard.nbytes + window, window)
    if window > budget - in_use:
        raise WorkerMemoryError(
            f"a shard of {shard.rows:,} rows ({shard.nbytes / MiB:.0f} MiB of Arrow, chunks of up to "
            f"{shard.largest_chunk / MiB:.0f} MiB) does not fit GANGWAY_WORKER_MEMORY={budget / MiB:.0f} MiB even "
            f"streamed: the worker's processes use {in_use / MiB:.0f} MiB, and a window of {CHUNKS_IN_FLIGHT} "
            f"chunks needs {window / MiB:.0f} MiB; raise GANGWAY_WORKER_MEMORY to at least "
            f"{(in_use + window) / MiB:.0f} MiB or upload with a smaller GANGWAY_CHUNK_BYTES")
    return plan


# readers ----------------------------------------------------------------------------------------

def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), None if unlimited."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":   # v2 unified hierarchy
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        # Inside a container the cgroup is mounted as the root, while /proc/self/cgroup may name the host path.
        for folder in (os.path.join(base, path.lstrip("/")), base):
            limit = _read_limit(os.path.join(folder, name))
            if limit is not None:
                return limit
    return None


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    value = int(text)
    return value if value < 1 << 60 else None   # v1 says "unlimited" with a huge number


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def worker_budget(settings: Settings) -> int:
    """GANGWAY_WORKER_MEMORY, else ``default_worker_memory`` of this host."""
    explicit = settings.worker_memory_bytes
    if explicit is not None:
        return explicit
    return default_worker_memory(cgroup_memory_limit(), host_memory(), os.cpu_count() or 1, settings.worker_cpus)


def _rss(pid: int, proc_root: str = "/proc") -> int:
    try:
        with open(os.path.join(proc_root, str(pid), "statm")) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pids: list[int], proc_root: str = "/proc") -> int:
    """Summed RSS: a page shared by several of ``pids`` counts once per process."""
    return sum(_rss(pid, proc_root) for pid in pids)


@dataclass(frozen=True)
class Footprint:
    """One process's memory, from ``/proc/<pid>/smaps_rollup`` and ``status`` (bytes): its proportional
    share of anonymous and shmem pages (a page shared by n processes counts 1/n in each, so a fork's
    copy-on-write pages count once over the processes sharing them), and its mapped files' resident pages
    whole."""

    proportional: int   # Pss_Anon + Pss_Shmem
    file: int           # Rss - Anonymous - RssShmem: mapped files (libraries, memory-mapped chunk files)


def _kb_fields(path: str) -> dict[str, int]:
    fields = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields


def _footprint(pid: int, proc_root: str = "/proc") -> Footprint | None:
    """None where the kernel gives no ``Pss_Anon`` (before Linux 5.10); nothing for a process gone."""
    folder = os.path.join(proc_root, str(pid))
    try:
        fields = _kb_fields(os.path.join(folder, "smaps_rollup"))
        shmem = _kb_fields(os.path.join(folder, "status")).get("RssShmem", 0)
    except (FileNotFoundError, ProcessLookupError):
        return Footprint(0, 0)   # exited since it was listed: it holds nothing now
    except (OSError, ValueError):
        return None
    if "Pss_Anon" not in fields or "Rss" not in fields:
        return None
    return Footprint(fields["Pss_Anon"] + fields.get("Pss_Shmem", 0),
                     max(0, fields["Rss"] - fields.get("Anonymous", 0) - shmem))


def tree_memory(pids: list[int], proc_root: str = "/proc") -> int:
    """What a worker's processes hold together, counting no page twice as far as the kernel tells:
    the sum of their proportional anonymous pages (the zygote's imports and Celery's fork share
    theirs with the children) plus the largest file-backed part of any one of them (they map the
    same libraries; counted whole, not divided among every process on the host that maps them, as a
    container's memory cgroup may charge them all to this worker). Falls back to summed RSS (which
    counts shared pages once per process: safe, and ~2x an idle tree's real use) where a process's
    ``smaps_rollup`` lacks the fields."""
    prints = [_footprint(pid, proc_root) for pid in pids]
    if any(fp is None for fp in prints):
        return tree_rss(pids, proc_root)
    return sum(fp.proportional for fp in prints) + max((fp.file for fp in prints), default=0)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _subtree(pid: int) -> list[int]:
    return [pid, *(p for c in _children(pid) for p in _subtree(c))]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"workers.runtime.zygote" in f.read()
    except OSError:
        return False


def worker_pids(child: int | None = None) -> list[int]:
    """The worker's processes as seen from its training ``child`` (default: this process): the Celery
    pool process's whole subtree (the zygote that forked the child, or the warm standby, and the child)
    plus Celery's main process."""
    child = os.getpid() if child is None else child
    parent = _ppid(child)
    if parent > 1 and _is_zygote(parent):
        parent = _ppid(parent)   # the zygote's parent is the pool process that supervises the child
    if parent <= 1:
        return [child]
    grandparent = _ppid(parent)
    return _subtree(parent) + ([grandparent] if grandparent > 1 else [])


def worker_tree_memory(child: int | None = None) -> int:
    """What the worker's processes hold (``tree_memory`` of ``worker_pids``): the plan's "in use"."""
    return tree_memory(worker_pids(child))
