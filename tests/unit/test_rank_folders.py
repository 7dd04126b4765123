"""A worker's start sweeps rank folders nobody will come back for, and only those."""
from __future__ import annotations

import os

from common.settings import Settings
from workers.runtime.rank import rank_dirs, sweep_rank_dirs


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
