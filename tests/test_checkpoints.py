"""Checkpoints in diffusers' layout and naming: listed and pruned by step number, resumed by path, name or 'latest',
and read without unpickling anything but plain data."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_in_process, tiny_flags
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.training.checkpoints import (
    PROGRESS_FILE,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
)

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# 4 steps with a checkpoint every 2 and the EMA on: checkpoint-2 is resumed, the run's end is the reference
EMA_FLAGS = ("--use_ema", "--checkpointing_steps", "2")


def make_checkpoints(folder, *names):
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / PROGRESS_FILE).write_text("{}")


def names(paths):
    return [p.name for p in paths]


def same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_checkpoints_are_named_by_their_step_like_diffusers():
    assert checkpoint_name(500) == "checkpoint-500"
    assert checkpoint_name(4) == "checkpoint-4"


def test_latest_and_pruning_go_by_step_number(tmp_path):
    # as text, checkpoint-9 sorts after checkpoint-12
    make_checkpoints(tmp_path, *(checkpoint_name(step) for step in [1, 2, 3, 9, 10, 11, 12]))
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-9",
                                                 "checkpoint-10", "checkpoint-11", "checkpoint-12"]
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-12"
    prune_checkpoints(tmp_path, 3)
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-10", "checkpoint-11", "checkpoint-12"]


def test_half_written_checkpoints_are_never_picked(tmp_path):
    make_checkpoints(tmp_path, "checkpoint-10", "checkpoint-20", "checkpoint-30.tmp")
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-20"


def test_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume_path("latest", tmp_path) is None
    assert resolve_resume_path(None, tmp_path) is None


def test_a_name_is_looked_up_in_the_output_dir_and_a_path_is_taken_as_it_is(tmp_path):
    make_checkpoints(tmp_path / "run", "checkpoint-4")
    make_checkpoints(tmp_path / "elsewhere", "checkpoint-2")
    assert resolve_resume_path("checkpoint-4", tmp_path / "run") == tmp_path / "run" / "checkpoint-4"
    path = tmp_path / "elsewhere" / "checkpoint-2"
    assert resolve_resume_path(str(path), tmp_path / "run") == path


def test_an_unknown_name_is_refused_with_the_checkpoints_there_are(tmp_path):
    make_checkpoints(tmp_path, "checkpoint-2", "checkpoint-4")
    with pytest.raises(CheckpointError, match="checkpoints there: checkpoint-2, checkpoint-4") as error:
        resolve_resume_path("checkpoint-3", tmp_path)
    assert isinstance(error.value, SdtuneError)


def test_resuming_from_an_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume_path(str(tmp_path / "checkpoint-5"), tmp_path)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_pipeline, shapes_dataset) -> Path:
    """An uninterrupted 4-step run with the EMA, saving checkpoint-2 and checkpoint-4."""
    return run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, tmp_path_factory.mktemp("ema") / "run", *EMA_FLAGS))


def test_resume_by_name_gives_the_same_weights_and_unpickles_no_code(train, ema_run, tmp_path, monkeypatch):
    shutil.copytree(ema_run / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    loaded = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        result = real_load(f, *args, **kwargs)
        loaded.append((Path(f).name, kwargs.get("weights_only")))
        return result

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = train(tmp_path / "run", *EMA_FLAGS, "--resume_from_checkpoint", "checkpoint-2")
    assert same_weights(resumed / UNET_WEIGHTS, ema_run / UNET_WEIGHTS)
    # optimizer, schedule and RNG state are read (successfully) and only as data; the weights are safetensors
    assert sorted(loaded) == [("optimizer.bin", True), ("random_states_0.pkl", True), ("scheduler.bin", True)]


def test_resume_by_path_gives_the_same_weights(train, ema_run, tmp_path):
    resumed = train(tmp_path / "run", *EMA_FLAGS, "--resume_from_checkpoint", str(ema_run / "checkpoint-2"))
    assert same_weights(resumed / UNET_WEIGHTS, ema_run / UNET_WEIGHTS)
    assert f"Resumed from {ema_run / 'checkpoint-2'}" in (resumed / "train.log").read_text()


def test_a_checkpoint_without_its_unet_is_refused(train, ema_run, tmp_path):
    copied = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(ema_run / "checkpoint-2", copied, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(CheckpointError, match="has no unet/"):
        train(tmp_path / "run", *EMA_FLAGS, "--resume_from_checkpoint", "latest")
