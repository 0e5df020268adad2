"""Which checkpoint a restarted run resumes from: Ray Train's registered one, or a newer one every rank finished."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs
from ray.train import Checkpoint

from raylm.train.checkpoint import COMPLETE_FILE, STATE_FILE, latest_run_checkpoint, mark_complete, resume_checkpoint

FS = pyarrow.fs.LocalFileSystem()


def _checkpoint(run: Path, name: str, step: int, *, complete: bool) -> Checkpoint:
    d = run / f"checkpoint_{name}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text(json.dumps({"step": step}))
    checkpoint = Checkpoint(str(d), filesystem=FS)
    if complete:
        assert mark_complete(checkpoint, step)
    return checkpoint


def test_a_newer_complete_checkpoint_wins_over_the_registered_one(tmp_path):
    registered = _checkpoint(tmp_path, "a", 8, complete=True)
    newer = _checkpoint(tmp_path, "b", 16, complete=True)
    _checkpoint(tmp_path, "c", 24, complete=False)  # a rank was still writing when the run died
    assert resume_checkpoint(registered, FS, str(tmp_path)).path == newer.path
    assert latest_run_checkpoint(tmp_path) == Path(newer.path)  # no snapshot yet: the newest complete one


def test_the_registered_checkpoint_stays_when_nothing_newer_is_complete(tmp_path):
    _checkpoint(tmp_path, "a", 8, complete=True)
    registered = _checkpoint(tmp_path, "b", 16, complete=False)  # registered before its marker was written
    assert resume_checkpoint(registered, FS, str(tmp_path)).path == registered.path


def test_a_fresh_run_has_nothing_to_resume(tmp_path):
    assert resume_checkpoint(None, FS, str(tmp_path / "missing")) is None
    assert latest_run_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, "a", 8, complete=False)
    assert resume_checkpoint(None, FS, str(tmp_path)) is None


def test_a_checkpoint_of_another_step_is_not_marked(tmp_path):
    """Ray skips a report when a worker failed meanwhile: the latest checkpoint is then an older one."""
    older = _checkpoint(tmp_path, "a", 8, complete=False)
    assert not mark_complete(older, 16)
    assert not (Path(older.path) / COMPLETE_FILE).exists()
    assert not mark_complete(None, 16)
