"""A worker's memory budget, the in-core / out-of-core decision, and out-of-core XGBoost from cached chunks."""
import os

import numpy as np
import pyarrow as pa
import pytest

from common.datasets import ChunkCache, DatasetReader, read_cached, write_dataset
from common.errors import ConfigurationError, WorkerMemoryError
from common.settings import Settings, parse_size
from common.store import MemoryStore
from workers.runtime.memory import (
    HoldMode,
    ShardSize,
    cgroup_memory_limit,
    default_worker_memory,
    plan_gbdt,
    worker_budget,
)

GiB, MiB = 1024 ** 3, 1024 ** 2


@pytest.mark.parametrize("text,value", [("1GiB", GiB), ("512MiB", 512 * MiB), ("1.5GB", 1_500_000_000),
                                        ("2000000", 2_000_000), (" 64 mib ", 64 * MiB)])
def test_sizes_parse_in_binary_and_decimal_units(text, value):
    assert parse_size(text) == value


def test_a_bad_worker_memory_names_the_setting_and_the_value():
    with pytest.raises(ConfigurationError, match=r"GANGWAY_WORKER_MEMORY must be a size like .* got 'lots'"):
        _ = Settings.from_env({"GANGWAY_WORKER_MEMORY": "lots"}).worker_memory_bytes


def test_an_explicit_worker_memory_wins():
    assert worker_budget(Settings.from_env({"GANGWAY_WORKER_MEMORY": "1GiB"})) == GiB


def test_the_default_budget_is_the_cgroup_limit_else_the_hosts_share():
    assert default_worker_memory(2 * GiB, 64 * GiB, 16, 4) == 2 * GiB
    assert default_worker_memory(None, 64 * GiB, 16, 4) == 16 * GiB      # 4 workers of 4 CPUs
    assert default_worker_memory(None, 64 * GiB, 16, 0) == 64 * GiB      # one worker takes the host
    assert default_worker_memory(128 * GiB, 64 * GiB, 16, 4) == 64 * GiB  # a limit above the host's memory


def _cgroup_files(tmp_path, self_cgroup: str, files: dict[str, str]):
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(self_cgroup)
    for rel, text in files.items():
        p = tmp_path / "cg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path / "proc"), str(tmp_path / "cg")


def test_cgroup_v2_and_v1_limits_are_read_and_unlimited_is_none(tmp_path):
    assert cgroup_memory_limit(*_cgroup_files(tmp_path / "a", "0::/w1\n", {"w1/memory.max": "1073741824\n"})) == GiB
    assert cgroup_memory_limit(*_cgroup_files(tmp_path / "b", "0::/\n", {"memory.max": "max\n"})) is None
    v1 = "4:memory:/docker/abc\n1:cpu:/\n"
    assert cgroup_memory_limit(*_cgroup_files(tmp_path / "c", v1,
                                              {"memory/memory.limit_in_bytes": str(512 * MiB)})) == 512 * MiB
    assert cgroup_memory_limit(*_cgroup_files(tmp_path / "d", v1,
                                              {"memory/memory.limit_in_bytes": str(2 ** 63 - 4096)})) is None


SHARD = ShardSize(nbytes=400 * MiB, rows=3_000_000, features=28, largest_chunk=8 * MiB)


def test_a_shard_that_fits_trains_in_core():
    plan = plan_gbdt(SHARD, budget=4 * GiB, in_use=500 * MiB)
    assert plan.mode == HoldMode.IN_CORE and plan.in_core_need > SHARD.nbytes


def test_a_shard_that_does_not_fit_trains_out_of_core():
    plan = plan_gbdt(SHARD, budget=1 * GiB, in_use=500 * MiB)
    assert plan.mode == HoldMode.EXTERNAL and plan.external_need < plan.in_core_need


def test_xgboost_streams_its_in_core_matrix_so_the_raw_shard_is_not_counted():
    """LightGBM in core holds the Arrow shard and the float32 matrix its Dataset bins from (a worker tree
    measured 911 MiB above "in use" for 3M rows x 28 where the plan said 634 without the matrix);
    XGBoost streams its in-core matrix from chunk files, a window of 3 at a time."""
    raw = plan_gbdt(SHARD, budget=4 * GiB, in_use=500 * MiB)
    streamed = plan_gbdt(SHARD, budget=4 * GiB, in_use=500 * MiB, raw_in_core=False)
    matrix = SHARD.rows * SHARD.features * 4
    assert raw.in_core_need - streamed.in_core_need == SHARD.nbytes + matrix - 3 * SHARD.largest_chunk
    measured_above_in_use = 911 * MiB
    lgb = plan_gbdt(ShardSize(nbytes=332 * MiB, rows=3_000_000, features=28, largest_chunk=8 * MiB),
                    budget=4 * GiB, in_use=254 * MiB)
    assert lgb.in_core_need >= measured_above_in_use


def test_the_plan_counts_the_measured_per_row_state_of_xgboost():
    """12.5M rows a rank (24M x 28 features on 2 workers, + a 0.5M-row eval shard) measured ~987 MiB of
    anonymous memory in a worker tree whose processes used ~400 MiB before training: 32 B/row planned
    it into 1 GiB and the tree went over; the plan now refuses it."""
    shard = ShardSize(nbytes=1328 * MiB, rows=12_500_000, features=28, largest_chunk=8 * MiB)
    with pytest.raises(WorkerMemoryError, match="even out of core"):
        plan_gbdt(shard, budget=1 * GiB, in_use=400 * MiB)
    third = ShardSize(nbytes=1328 * MiB * 2 // 3, rows=8_500_000, features=28, largest_chunk=8 * MiB)
    assert plan_gbdt(third, budget=1 * GiB, in_use=400 * MiB).mode == HoldMode.EXTERNAL


def test_when_even_out_of_core_cannot_fit_the_error_names_shard_budget_and_need():
    with pytest.raises(WorkerMemoryError, match=r"3,000,000 rows x 28 features \(400 MiB of Arrow\) does not fit "
                                                r"GANGWAY_WORKER_MEMORY=600 MiB even out of core: the worker's "
                                                r"processes use 500 MiB.*at least \d+ MiB"):
        plan_gbdt(SHARD, budget=600 * MiB, in_use=500 * MiB)


def test_out_of_core_can_be_forced_either_way_and_a_bad_choice_is_named():
    assert plan_gbdt(SHARD, 64 * GiB, 0, "always").mode == HoldMode.EXTERNAL
    assert plan_gbdt(SHARD, 1 * GiB, 500 * MiB, "never").mode == HoldMode.IN_CORE
    with pytest.raises(ConfigurationError, match="GANGWAY_OUT_OF_CORE must be one of .* got 'sometimes'"):
        plan_gbdt(SHARD, GiB, 0, "sometimes")


def _regression(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6)).astype(np.float32)
    y = (2 * X[:, 0] + np.sin(3 * X[:, 1]) + X[:, 2] * X[:, 3] + rng.normal(0, 0.1, n)).astype(np.float32)
    return pa.table({**{f"f{i}": X[:, i] for i in range(6)}, "y": y})


def test_a_cached_shard_is_chunk_files_that_read_back_as_the_ranks_rows(tmp_path):
    store = MemoryStore()
    uri = write_dataset(_regression(1000), store, "bkt", chunk_rows=128).uri
    reader = DatasetReader(store, ChunkCache(tmp_path, 10 ** 9))
    pieces = reader.cache_shard(uri, world_size=3, rank=1)
    assert all(p.path.exists() for p in pieces)
    assert pa.concat_tables([read_cached(p) for p in pieces]).equals(reader.read(uri, world_size=3, rank=1))


def test_out_of_core_xgboost_from_cached_chunks_matches_in_core(tmp_path):
    xgb = pytest.importorskip("xgboost")
    if not hasattr(xgb, "ExtMemQuantileDMatrix"):
        pytest.skip(f"xgboost {xgb.__version__} has no ExtMemQuantileDMatrix")
    from workers.runtime.shards import RankData
    from workers.runtime.xgboost_runner import Prepared, build_matrices
    store = MemoryStore()
    uri = write_dataset(_regression(20_000), store, "bkt", chunk_rows=2048).uri
    evaluri = write_dataset(_regression(4_000, seed=1), store, "bkt", chunk_rows=2048).uri
    reader = DatasetReader(store, ChunkCache(tmp_path / "cache", 10 ** 9))
    os.makedirs(tmp_path / "work")
    feats = [f"f{i}" for i in range(6)]
    results = {}
    def files() -> dict:
        return {"train": reader.cache_shard(uri), "eval": reader.cache_shard(evaluri)}
    for mode, data in {"in_core": RankData({"train": reader.read(uri), "eval": reader.read(evaluri)}),
                       # XGBoost's ranks: chunk files either way, the plan's mode picks the matrix
                       "in_core_streamed": RankData({}, files(), extra={"memory": {"mode": "in_core"}}),
                       "external": RankData({}, files(), extra={"memory": {"mode": "external"}})}.items():
        seen: list = []
        evals = build_matrices(Prepared({"workdir": str(tmp_path / "work")}, Settings(), data), feats, "y", None,
                               256, 1, on_chunk=lambda *a: seen.append(a))
        if data.cached:   # every chunk a matrix takes in is heard of (the progress timeout judges silence)
            chunks = {name: len(pieces) for name, pieces in data.cached.items()}
            assert {name for name, _, _ in seen} == {"train", "eval"}, seen
            assert all(n == chunks[name] and 1 <= i <= n for name, i, n in seen), seen
            assert {(name, n, n) for name, n in chunks.items()} <= set(seen), seen
        log: dict = {}
        xgb.train({"max_depth": 5, "nthread": 1}, evals[0][0], 20, evals=evals, evals_result=log, verbose_eval=False)
        results[mode] = (type(evals[0][0]).__name__, log["eval"]["rmse"][-1])
    assert results["in_core"][0] == results["in_core_streamed"][0] == "QuantileDMatrix"
    assert results["external"][0] == "ExtMemQuantileDMatrix"
    assert results["in_core_streamed"][1] == pytest.approx(results["in_core"][1], rel=1e-6), results
    assert results["external"][1] == pytest.approx(results["in_core"][1], rel=0.01), results
    assert os.listdir(tmp_path / "work" / "xgb-extmem")   # its pages went to the rank folder


def test_out_of_core_lightgbm_from_chunk_sequences_matches_in_core(tmp_path):
    lgb = pytest.importorskip("lightgbm")
    from workers.runtime.lightgbm_runner import _datasets
    from workers.runtime.shards import RankData
    store = MemoryStore()
    uri = write_dataset(_regression(20_000), store, "bkt", chunk_rows=2048).uri
    evaluri = write_dataset(_regression(4_000, seed=1), store, "bkt", chunk_rows=2048).uri
    reader = DatasetReader(store, ChunkCache(tmp_path, 10 ** 9))
    opts = {"input_cols": [f"f{i}" for i in range(6)], "label_col": "y", "weight_col": None}
    results = {}
    def files() -> dict:
        return {"train": reader.cache_shard(uri), "eval": reader.cache_shard(evaluri)}
    for mode, data in {"in_core": RankData({"train": reader.read(uri), "eval": reader.read(evaluri)}),
                       # XGBoost's ranks: chunk files either way, the plan's mode picks the matrix
                       "in_core_streamed": RankData({}, files(), extra={"memory": {"mode": "in_core"}}),
                       "external": RankData({}, files(), extra={"memory": {"mode": "external"}})}.items():
        seen: list = []
        sets, names = _datasets(data, opts, lambda *a: seen.append(a))
        log: dict = {}
        lgb.train({"objective": "regression", "num_threads": 1, "verbose": -1}, sets[0], 20, valid_sets=sets,
                  valid_names=names, callbacks=[lgb.record_evaluation(log)])
        results[mode] = log["eval"]["l2"][-1]
        if data.cached:   # binning from chunk files is heard of, chunk by chunk
            assert {name for name, _, _ in seen} == {"train", "eval"}, seen[:5]
            assert all(n == len(data.cached[name]) for name, _, n in seen), seen[:5]
    assert results["external"] == pytest.approx(results["in_core"], rel=0.01), results


def test_a_mapped_shard_reads_the_ranks_rows_without_copying_them_to_the_heap(tmp_path):
    from workers.runtime.shards import _mapped_table
    store = MemoryStore()
    res = write_dataset(_regression(5000), store, "bkt", chunk_rows=512)
    reader = DatasetReader(store, ChunkCache(tmp_path, 10 ** 9))
    before = pa.total_allocated_bytes()
    table = _mapped_table(reader.cache_shard(res.uri, world_size=2, rank=1), res.manifest)
    assert pa.total_allocated_bytes() - before < 64 * 1024   # buffers live in the mapped files
    assert table.equals(reader.read(res.uri, world_size=2, rank=1))


def test_pinned_shards_survive_another_ranks_trim_of_the_shared_cache(tmp_path):
    store = MemoryStore()
    res = write_dataset(_regression(4000), store, "bkt", chunk_rows=500)
    cache = ChunkCache(tmp_path / "cache", max_bytes=1)   # every trim removes all but the caller's shard
    mine = DatasetReader(store, cache).cache_shard(res.uri, world_size=2, rank=0, pin_dir=tmp_path / "r0")
    DatasetReader(store, cache).cache_shard(res.uri, world_size=2, rank=1, pin_dir=tmp_path / "r1")
    assert not any(cache.path(res.manifest.chunks[i].sha256).exists() for i in range(4))   # trimmed ...
    got = pa.concat_tables([read_cached(p) for p in mine])   # ... but rank 0's links still read
    assert got.equals(DatasetReader(store, ChunkCache(tmp_path / "other", 10 ** 9)).read(res.uri, world_size=2, rank=0))


def test_xgboosts_quantile_sketch_of_wide_rows_is_planned_and_named():
    """The 10x run: 251 columns, 5.4M rows a rank, 1 GiB workers whose processes used ~600 MiB. Planned
    without the sketch it fit (~870 MiB); the training child alone then held ~965 MiB of anonymous memory
    while it built its matrix. With the sketch planned it is refused before training, with the numbers."""
    wide = ShardSize(nbytes=5182 * MiB, rows=5_400_000, features=250, largest_chunk=32 * MiB)
    assert 900 * MiB < wide.sketch_bytes < 1200 * MiB
    assert plan_gbdt(wide, budget=3 * GiB // 2, in_use=600 * MiB).mode == HoldMode.EXTERNAL   # LightGBM: no sketch
    with pytest.raises(WorkerMemoryError, match=r"5,400,000 rows x 250 features .* of it 1020 MiB for XGBoost's "
                                                r"quantile sketch of 250 features\); raise GANGWAY_WORKER_MEMORY "
                                                r"to at least 2\d\d\d MiB"):
        plan_gbdt(wide, budget=3 * GiB // 2, in_use=600 * MiB, sketch=True)
    narrow = ShardSize(nbytes=400 * MiB, rows=3_000_000, features=28, largest_chunk=8 * MiB)
    assert narrow.sketch_bytes < 128 * MiB   # HIGGS-shaped shards barely notice it
    ShardSize(0, 1, 1, 0).sketch_bytes   # one row: no log of zero
    assert abs(ShardSize(0, 10**6, 10, 0, max_bin=1024).sketch_bytes - 4 * ShardSize(0, 10**6, 10, 0).sketch_bytes) < 4


def test_lightgbms_binned_dataset_is_planned_in_memory_out_of_core_too():
    """LightGBM streams only its raw data from chunk Sequences: the binned Dataset (a byte per value) has
    no pages on disk, so a wide shard that XGBoost trains out of core within a budget can be refused to
    LightGBM with the same budget."""
    wide = ShardSize(nbytes=2000 * MiB, rows=2_000_000, features=250, largest_chunk=32 * MiB)
    xgb_like = plan_gbdt(wide, budget=1 * GiB, in_use=300 * MiB)
    assert xgb_like.mode == HoldMode.EXTERNAL
    with pytest.raises(WorkerMemoryError, match="even out of core"):
        plan_gbdt(wide, budget=1 * GiB, in_use=300 * MiB, bins_in_memory=True)
    assert plan_gbdt(wide, budget=1 * GiB, in_use=0, bins_in_memory=True).external_need == \
        xgb_like.external_need + wide.quantised_bytes


def _proc(root, pid: int, *, rss_kb: int, anon_kb: int, pss_anon_kb: int | None, statm_pages: int = 0,
          shmem_kb: int = 0) -> None:
    folder = root / str(pid)
    folder.mkdir()
    (folder / "status").write_text(f"Name:\tpython\nRssAnon:\t{anon_kb} kB\nRssShmem:\t{shmem_kb} kB\n")
    lines = [f"Rss: {rss_kb} kB", f"Anonymous: {anon_kb} kB", f"Pss_Shmem: {shmem_kb} kB"]
    if pss_anon_kb is not None:
        lines.append(f"Pss_Anon: {pss_anon_kb} kB")
    (folder / "smaps_rollup").write_text("7f00-7fff ---p 00000000 00:00 0   [rollup]\n" + "\n".join(lines) + "\n")
    (folder / "statm").write_text(f"0 {statm_pages} 0 0 0 0 0\n")


def test_a_worker_tree_counts_forked_pages_once_and_shared_libraries_once(tmp_path):
    from workers.runtime.memory import tree_memory
    KiB = 1024
    # zygote: 200 MiB of imports shared with its child (half of each page's share each), 90 MiB of libraries;
    # child: the same shared imports plus 50 MiB of its own, the same libraries plus a 10 MiB mapped chunk
    _proc(tmp_path, 10, rss_kb=290 * 1024, anon_kb=200 * 1024, pss_anon_kb=100 * 1024)
    _proc(tmp_path, 11, rss_kb=350 * 1024, anon_kb=250 * 1024, pss_anon_kb=150 * 1024)
    held = tree_memory([10, 11], proc_root=str(tmp_path))
    assert held == (100 + 150 + 100) * 1024 * KiB   # 250 MiB anonymous, once; the larger file part, once
    # (summed RSS would have said 640 MiB)


def test_shared_memory_counts_once_not_again_as_a_mapped_file(tmp_path):
    from workers.runtime.memory import tree_memory
    # 64 MiB of MAP_SHARED anonymous memory (torch /dev/shm tensors) besides 8 MiB of libraries:
    # smaps_rollup's Rss holds it, and so does Pss_Shmem
    _proc(tmp_path, 10, rss_kb=(1 + 8 + 64) * 1024, anon_kb=1024, pss_anon_kb=1024, shmem_kb=64 * 1024)
    assert tree_memory([10], proc_root=str(tmp_path)) == (1 + 64 + 8) * 1024 * 1024


def test_a_process_gone_since_it_was_listed_holds_nothing(tmp_path):
    from workers.runtime.memory import tree_memory
    _proc(tmp_path, 10, rss_kb=4096, anon_kb=1024, pss_anon_kb=1024)
    assert tree_memory([10, 99], proc_root=str(tmp_path)) == (1024 + 3072) * 1024


def test_without_proportional_anonymous_sizes_the_tree_is_summed_rss(tmp_path):
    from workers.runtime.memory import tree_memory
    page = os.sysconf("SC_PAGE_SIZE")
    _proc(tmp_path, 10, rss_kb=4096, anon_kb=1024, pss_anon_kb=1024, statm_pages=1000)
    _proc(tmp_path, 11, rss_kb=4096, anon_kb=1024, pss_anon_kb=None, statm_pages=300)   # a kernel before 5.10
    assert tree_memory([10, 11], proc_root=str(tmp_path)) == 1300 * page


def test_lightgbms_sample_of_rows_for_its_bins_is_planned_and_follows_its_parameter():
    """3M rows x 28 features out of core: a tree measured 567 MiB at its peak, planned 578 without the sample
    (254 MiB in use); LightGBM lists, stacks and filters its 200,000 sampled rows at once while it bins."""
    shard = ShardSize(nbytes=332 * MiB, rows=3_000_000, features=28, largest_chunk=8 * MiB)
    assert shard.bin_sample_bytes == 200_000 * (28 * 28 + 112)
    without = plan_gbdt(shard, budget=4 * GiB, in_use=254 * MiB, out_of_core="always", bins_in_memory=True)
    planned = plan_gbdt(shard, budget=4 * GiB, in_use=254 * MiB, out_of_core="always", bins_in_memory=True,
                        bin_sample=True)
    assert planned.external_need - without.external_need == shard.bin_sample_bytes
    assert planned.in_use + planned.external_need >= 567 * MiB + 100 * MiB   # room over the measured peak
    small = ShardSize(nbytes=1 * MiB, rows=1000, features=28, largest_chunk=MiB, sample_rows=200_000)
    assert small.bin_sample_bytes == 1000 * (28 * 28 + 112)   # never more rows than the shard has
    fewer = ShardSize(nbytes=332 * MiB, rows=3_000_000, features=28, largest_chunk=8 * MiB, sample_rows=50_000)
    assert fewer.bin_sample_bytes == shard.bin_sample_bytes // 4
