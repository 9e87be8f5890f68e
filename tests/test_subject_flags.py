"""Subject training's (DreamBooth) flags, --use_dora and --optimizer, checked where they are parsed: every bad input
stops with a message naming the flag and the fix, before any model loads (the model path here does not exist)."""

import copy
import importlib.util

import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training.config import parse_args, settings_from
from sdtune.training.optim import OptimizerSettings, make_optimizer

MODEL = ["--pretrained_model_name_or_path", "no-such-model", "--seed", "0"]


def write_images(folder, count: int, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (24, 16), (index * 40, 80, 120)).save(folder / f"{prefix}{index}.png")
    return folder


@pytest.fixture
def instance_dir(tmp_path):
    return write_images(tmp_path / "instance", 3)


def subject_args(instance_dir, *flags):
    return parse_args([*MODEL, "--instance_data_dir", str(instance_dir), "--instance_prompt", "a photo of sks dog",
                       *flags])


def test_diffusers_dreambooth_flags_parse(instance_dir, tmp_path):
    args = subject_args(instance_dir, "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"),
                        "--class_prompt", "a photo of a dog", "--prior_loss_weight", "0.5", "--num_class_images",
                        "7", "--sample_batch_size", "2", "--train_text_encoder", "--rank", "8",
                        "--validation_prompt", "sks dog in a bucket")
    assert (args.prior_loss_weight, args.num_class_images, args.sample_batch_size) == (0.5, 7, 2)
    assert args.train_text_encoder and args.with_prior_preservation
    assert args.lora_rank == 8  # --rank, train_dreambooth_lora.py's name
    assert args.validation_prompts == ["sks dog in a bucket"]
    assert (args.optimizer, args.learning_rate) == ("adamw", 1e-4)


def test_a_class_folder_that_does_not_exist_yet_is_accepted(instance_dir, tmp_path):
    # it is created and filled by generation
    args = subject_args(instance_dir, "--with_prior_preservation", "--class_data_dir", str(tmp_path / "new"),
                        "--class_prompt", "a dog")
    assert args.class_data_dir.endswith("new")


def broken_folder(tmp_path, name="broken"):
    folder = write_images(tmp_path / name, 2)
    (folder / "cut.png").write_bytes((folder / "img0.png").read_bytes()[:40])
    return folder


def text_folder(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image")
    return folder


PRIOR = ["--with_prior_preservation", "--class_prompt", "a dog"]


@pytest.mark.parametrize("case, message", [
    ("empty instance folder", "--instance_data_dir .*no images"),
    ("instance folder of text files", "--instance_data_dir .*no images"),
    ("broken instance image", "--instance_data_dir .*1 file.* do not decode.*cut.png.*Replace or remove"),
    ("missing instance folder", "--instance_data_dir .*no such folder"),
    ("no instance prompt", "--instance_data_dir needs --instance_prompt"),
    ("prior without class prompt", "--with_prior_preservation needs --class_prompt"),
    ("prior without class folder", "--with_prior_preservation needs --class_data_dir"),
    ("no class images", "--num_class_images 0 with --with_prior_preservation"),
    ("negative prior weight", "--prior_loss_weight -1.0 must be"),
    ("broken class image", "--class_data_dir .*do not decode.*cut.png"),
    ("class prompt without prior", "only used with --with_prior_preservation"),
    ("two data sources", "--train_data_dir and --instance_data_dir both"),
    ("prior without instances", "--with_prior_preservation: subject-training settings without --instance_data_dir"),
    ("dora without lora", "--use_dora: LoRA settings, but this is a full fine-tune"),
    ("text encoder with cached latents", "--train_text_encoder cannot be used with --cache_latents"),
    ("validation split", "--validation_split does not apply to subject training"),
    ("text encoder with EMA", "--use_ema averages the UNet only"),
])
def test_bad_subject_input_names_the_flag_and_the_fix(tmp_path, instance_dir, case, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    instance = ["--instance_data_dir", str(instance_dir), "--instance_prompt", "sks dog"]
    class_dir = ["--class_data_dir", str(tmp_path / "class")]
    flags = {
        "empty instance folder": ["--instance_data_dir", str(empty), "--instance_prompt", "sks dog"],
        "instance folder of text files": ["--instance_data_dir", str(text_folder(tmp_path)), "--instance_prompt", "x"],
        "broken instance image": ["--instance_data_dir", str(broken_folder(tmp_path)), "--instance_prompt", "x"],
        "missing instance folder": ["--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", "x"],
        "no instance prompt": ["--instance_data_dir", str(instance_dir)],
        "prior without class prompt": [*instance, *class_dir, "--with_prior_preservation"],
        "prior without class folder": [*instance, *PRIOR],
        "no class images": [*instance, *class_dir, *PRIOR, "--num_class_images", "0"],
        "negative prior weight": [*instance, *class_dir, *PRIOR, "--prior_loss_weight", "-1"],
        "broken class image": [*instance, *PRIOR, "--class_data_dir", str(broken_folder(tmp_path, "badclass"))],
        "class prompt without prior": [*instance, "--class_prompt", "a dog"],
        "two data sources": [*instance, "--train_data_dir", str(instance_dir)],
        "prior without instances": ["--train_data_dir", "data", *class_dir, *PRIOR],
        "dora without lora": [*instance, "--use_dora"],
        "text encoder with cached latents": [*instance, "--train_text_encoder", "--cache_latents", "--center_crop"],
        "validation split": [*instance, "--validation_split", "0.2"],
        "text encoder with EMA": [*instance, "--train_text_encoder", "--use_ema"],
    }[case]
    with pytest.raises(SdtuneError, match=message):
        parse_args([*MODEL, *flags])


def test_dora_is_accepted_with_lora(instance_dir):
    assert subject_args(instance_dir, "--lora_rank", "4", "--use_dora").use_dora


def test_prodigy_takes_its_learning_rate_convention(instance_dir):
    args = subject_args(instance_dir, "--optimizer", "prodigy")
    assert args.learning_rate == 1.0
    with pytest.raises(SdtuneError, match="--learning_rate 0.0001 with --optimizer prodigy.*use 1.0"):
        subject_args(instance_dir, "--optimizer", "prodigy", "--learning_rate", "1e-4")


def test_prodigy_not_installed_is_refused_before_any_model_loads(instance_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(SdtuneError, match="--optimizer prodigy needs the prodigyopt package: pip install prodigyopt"):
        subject_args(instance_dir, "--optimizer", "prodigy")


def test_use_8bit_adam_is_still_adamw8bit(instance_dir):
    assert subject_args(instance_dir, "--use_8bit_adam").optimizer == "adamw8bit"
    assert subject_args(instance_dir, "--optimizer", "AdamW8bit").use_8bit_adam  # diffusers spells it AdamW
    with pytest.raises(SdtuneError, match="--use_8bit_adam asks for adamw8bit but --optimizer is prodigy"):
        subject_args(instance_dir, "--use_8bit_adam", "--optimizer", "prodigy")


def test_prodigy_resumes_exactly_from_its_state_dict(instance_dir):
    """accelerate's checkpoint holds optimizer.state_dict(): Prodigy's step-size estimate (d) must be in it, or a
    resumed run steps differently from one that never stopped."""
    settings = settings_from(OptimizerSettings, subject_args(instance_dir, "--optimizer", "prodigy"))

    def loss(weight):
        return ((weight - torch.linspace(-3, 3, 64)) ** 2).sum()

    def step(optimizer, weight):
        optimizer.zero_grad()
        loss(weight).backward()
        optimizer.step()

    weight = torch.nn.Parameter(torch.ones(64))
    optimizer = make_optimizer([weight], settings, num_processes=1)
    assert type(optimizer).__name__ == "Prodigy"
    for _ in range(20):  # Prodigy's estimate starts growing after about 15 steps here
        step(optimizer, weight)
    # a deep copy, as written to disk: state_dict() hands out the live tensors, which later steps change in place
    saved_weight, saved_state = weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    assert optimizer.param_groups[0]["d"] != 1e-6  # the estimate has moved from its start
    for _ in range(5):
        step(optimizer, weight)

    resumed = torch.nn.Parameter(saved_weight.clone())
    fresh = make_optimizer([resumed], settings, num_processes=1)
    fresh.load_state_dict(saved_state)
    for _ in range(5):
        step(fresh, resumed)
    assert torch.equal(resumed.detach(), weight.detach())
