"""The validation loss's parts on small tensors: the held-out split, the fixed-noise loss, its history and plot.
The training runs that record it are in test_training.py, test_resume.py and test_distributed.py."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from sdtune.data.dataset import hold_out
from sdtune.data.splits import split_validation_rows
from sdtune.errors import SdtuneError
from sdtune.training.checkpoints import Progress
from sdtune.training.config import parse_args
from sdtune.training.loop import validation_due
from sdtune.training.loss_plot import TRAIN_COLOUR, VALIDATION_COLOUR, draw_loss_curve, loss_curve_section
from sdtune.training.validation_loss import HeldOutExamples, LossHistory, LossPoint, fixed_timesteps, held_out_loss


def test_hold_out_is_deterministic_disjoint_and_covers_every_row():
    training, held = hold_out(20, 0.25, seed=7)
    assert (training, held) == hold_out(20, 0.25, seed=7)
    assert len(held) == 5
    assert not set(training) & set(held)
    assert sorted(training + held) == list(range(20))
    assert held != hold_out(20, 0.25, seed=8)[1]


@pytest.mark.parametrize("rows, fraction", [(1, 0.5), (3, 0.9)])
def test_hold_out_refuses_to_leave_no_training_row(rows, fraction):
    with pytest.raises(SdtuneError, match="--validation_split"):
        hold_out(rows, fraction, seed=0)


def test_a_missing_validation_folder_is_refused_naming_the_flag(tmp_path):
    args = parse_args(["--pretrained_model_name_or_path", "model", "--train_data_dir", "data",
                       "--validation_data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(SdtuneError, match="--validation_data_dir .*nowhere: no such folder"):
        split_validation_rows(args, rows=[])


def test_timesteps_are_the_centres_of_equal_slices_of_the_schedule():
    assert fixed_timesteps(1000).tolist() == [100, 300, 500, 700, 900]


@pytest.fixture(scope="module")
def unet_and_examples(tiny_pipeline):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    generator = torch.Generator().manual_seed(0)
    examples = HeldOutExamples(torch.randn((3, unet.config.in_channels, 8, 8), generator=generator),
                               torch.randn((3, 8, unet.config.cross_attention_dim), generator=generator))
    return unet, examples, DDPMScheduler.from_pretrained(tiny_pipeline / "scheduler")


def test_validation_loss_is_exactly_repeatable_and_moves_with_the_weights(unet_and_examples):
    unet, examples, scheduler = unet_and_examples
    unet.train()
    first = held_out_loss(unet, examples, scheduler, None, 4, "cpu")
    assert held_out_loss(unet, examples, scheduler, None, 4, "cpu") == first
    assert unet.training  # the training mode comes back
    # the noise is per row: another batching gives the same figure up to float rounding
    assert held_out_loss(unet, examples, scheduler, None, 15, "cpu") == pytest.approx(first, rel=1e-6)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.05)
    assert abs(held_out_loss(unet, examples, scheduler, None, 4, "cpu") - first) > 1e-4


def test_a_resumed_history_keeps_what_came_before_its_checkpoint(tmp_path):
    history = LossHistory.continued(tmp_path, 0)
    for step in range(1, 7):
        history.record_train(step, float(step))
        if step % 2 == 0:
            history.add(step, 10.0 - step)
    assert history.points == [LossPoint(2, 1.5, 8.0), LossPoint(4, 3.5, 6.0), LossPoint(6, 5.5, 4.0)]
    assert history.lowest() == LossPoint(6, 5.5, 4.0)

    resumed = LossHistory.continued(tmp_path, 3)  # killed after step 6, resumed from checkpoint-3
    assert resumed.points == [LossPoint(2, 1.5, 8.0)]
    resumed.record_train(4, 4.0)
    assert resumed.add(4, 6.0) == LossPoint(4, 3.5, 6.0)  # step 3's loss was kept
    assert LossHistory.continued(tmp_path, 0).points == []  # a new run in the same folder starts afresh


def test_the_plot_draws_both_curves_and_the_card_names_the_lowest_point(tmp_path):
    history = LossHistory(tmp_path / "history.jsonl", [
        {"step": 10, "train_loss": 0.3}, {"step": 10, "validation_loss": 0.25}, {"step": 20, "train_loss": 0.2},
        {"step": 20, "validation_loss": 0.21}, {"step": 30, "train_loss": 0.1}, {"step": 30, "validation_loss": 0.23}])
    section = loss_curve_section(history, tmp_path)
    assert "![train and validation loss](loss_curve.png)" in section
    assert "Lowest validation loss: 0.2100 at step 20" in section
    pixels = {tuple(p) for p in np.asarray(Image.open(tmp_path / "loss_curve.png")).reshape(-1, 3)}
    assert TRAIN_COLOUR in pixels and VALIDATION_COLOUR in pixels


def test_a_single_point_plots(tmp_path):
    draw_loss_curve([LossPoint(4, None, 0.5)], tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").size == (640, 400)


def test_validation_is_due_every_validation_steps_and_after_every_validation_epochs_th_epoch():
    every = {"every_steps": 3, "every_epochs": 2}
    assert validation_due(Progress(6, 0, 6), **every)
    assert not validation_due(Progress(4, 0, 4), **every)
    assert validation_due(Progress(4, 2, 0), **every)  # the step that ended epoch 1, the 2nd
    assert not validation_due(Progress(4, 1, 0), **every)  # the step that ended epoch 0, the 1st
    assert not validation_due(Progress(5, 1, 2), every_steps=None, every_epochs=1)  # mid-epoch, no step cadence
