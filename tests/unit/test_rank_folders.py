"""A worker's start sweeps rank folders nobody will come back for, and only those."""
from __future__ import annotations

import os

from common.settings import Settings
from workers.runtime.rank import _rank_folders, rank_dirs, sweep_rank_dirs, sweep_tmp_dirs


def _leave(settings: Settings, worker_id: str) -> str:
    folder = os.path.join(rank_dirs(settings, worker_id), "J-r0-abc", "work")
    os.makedirs(folder)
    open(os.path.join(folder, "model.ubj"), "wb").close()
    return folder


def test_a_starting_worker_sweeps_its_own_and_unregistered_workers_rank_folders_but_not_registered_ones(tmp_path):
    settings = Settings.from_env({}, home=str(tmp_path))
    mine, live, gone = (_leave(settings, w) for w in ("me", "live", "host-4242"))
    sweep_rank_dirs(settings, "me", registered={"live"})
    assert os.listdir(rank_dirs(settings, "me")) == [] and not os.path.exists(mine)
    assert os.path.exists(live)
    assert not os.path.exists(gone) and not os.path.exists(rank_dirs(settings, "host-4242"))


def test_without_the_registry_a_starting_worker_sweeps_only_its_own_folder(tmp_path):
    settings = Settings.from_env({}, home=str(tmp_path))
    _leave(settings, "me")
    gone = _leave(settings, "host-4242")
    sweep_rank_dirs(settings, "me")
    assert os.listdir(rank_dirs(settings, "me")) == [] and os.path.exists(gone)


def test_a_starting_worker_sweeps_the_temp_folders_of_its_fleets_gone_workers_only(tmp_path):
    settings = Settings.from_env({}, home=str(tmp_path / "home"))
    other_fleet = Settings.from_env({}, home=str(tmp_path / "elsewhere"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def leave(s: Settings, worker: str) -> str:
        made: list[str] = []
        _rank_folders(s, {"worker_id": worker, "job_id": "J", "rank": 0}, made)
        folder = os.path.join(str(tmp), os.path.basename(made[1]))
        os.rename(made[1], folder)   # as if made under ``tmp``
        return folder
    mine, live, gone, foreign = (leave(settings, "me"), leave(settings, "live"), leave(settings, "dead"),
                                 leave(other_fleet, "dead"))
    ownerless = tmp / "gw-ownerless"
    ownerless.mkdir()
    sweep_tmp_dirs(settings, "me", {"me", "live"}, tmp=str(tmp))
    assert not os.path.exists(mine) and not os.path.exists(gone)
    assert os.path.exists(live) and os.path.exists(foreign) and ownerless.exists()
    sweep_tmp_dirs(settings, "me", None, tmp=str(tmp))   # no registry to ask: nothing but its own
    assert os.path.exists(live)
