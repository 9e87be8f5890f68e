import pytest

from sdtune.checkpoints import PROGRESS_FILE, list_checkpoints, prune_checkpoints, resolve_resume_path


def make_checkpoints(folder, *names):
    for name in names:
        (folder / name).mkdir()
        (folder / name / PROGRESS_FILE).write_text("{}")


def test_half_written_checkpoints_are_never_picked(tmp_path):
    make_checkpoints(tmp_path, "checkpoint-000010", "checkpoint-000020", "checkpoint-000030.tmp")
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-000020"


def test_latest_is_by_step_not_by_name(tmp_path):
    # the diffusers example names checkpoints without padding: checkpoint-500 sorts after checkpoint-1000 as text
    make_checkpoints(tmp_path, "checkpoint-500", "checkpoint-1000")
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-1000"


def test_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume_path("latest", tmp_path) is None
    assert resolve_resume_path(None, tmp_path) is None


def test_pruning_keeps_the_newest(tmp_path):
    make_checkpoints(tmp_path, "checkpoint-000001", "checkpoint-000002", "checkpoint-000003")
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]


def test_resuming_from_an_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "checkpoint-000005").mkdir()
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        resolve_resume_path(str(tmp_path / "checkpoint-000005"), tmp_path)
