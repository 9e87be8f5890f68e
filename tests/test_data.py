import json
from argparse import Namespace

import pytest
import torch
from transformers import CLIPTokenizer

from conftest import ODD_SKIPS
from sdtune.errors import SdtuneError
from sdtune.data import (CaptionedImages, EpochShuffleSampler, load_rows, screen_rows, usable_captions,
                         warn_long_captions)


def data_args(folder, **overrides):
    args = dict(train_data_dir=str(folder), dataset_name=None, dataset_config_name=None, cache_dir=None,
                image_column="image", caption_column="text", max_train_samples=None, resolution=32,
                center_crop=False, random_flip=True, proportion_empty_prompts=0.0, seed=5)
    args.update(overrides)
    return Namespace(**args)


def test_broken_rows_are_skipped_and_counted_by_reason(odd_dataset):
    rows = load_rows(data_args(odd_dataset))
    result = screen_rows(rows, "image", "text")
    assert dict(result.skipped) == ODD_SKIPS
    assert len(result.usable) == len(rows) - sum(ODD_SKIPS.values())
    assert "Skipped 4 of 18 rows" in result.summary()


def test_every_usable_odd_image_becomes_a_normalised_rgb_tensor(odd_dataset, tiny_pipeline):
    args = data_args(odd_dataset)
    rows = load_rows(args)
    rows = rows.select(screen_rows(rows, "image", "text").usable)
    dataset = CaptionedImages(rows, args, CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer"))
    for position in range(len(dataset)):
        example = dataset[(0, position)]
        assert example["pixel_values"].shape == (3, 32, 32)
        assert -1.0 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1.0
        assert example["input_ids"].shape == (77,)


def test_a_dataset_with_nothing_usable_stops_with_the_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(SdtuneError, match="No usable rows.*zero-byte"):
        screen_rows(load_rows(data_args(tmp_path)), "image", "text")


def test_a_missing_column_is_named(odd_dataset):
    with pytest.raises(SdtuneError, match="Column 'caption' not in the dataset"):
        load_rows(data_args(odd_dataset, caption_column="caption"))


def test_an_unreachable_hub_dataset_names_the_alternatives():
    with pytest.raises(SdtuneError) as error:
        load_rows(data_args(None, train_data_dir=None, dataset_name="lambdalabs/pokemon-blip-captions"))
    message = str(error.value)
    assert "taken down" in message and "--train_data_dir" in message and "mirror" in message


def caption_list_dataset(tmp_path, captions, **overrides):
    from PIL import Image

    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": captions}) + "\n")
    args = data_args(tmp_path, **overrides)
    return CaptionedImages(load_rows(args), args, tokenizer=None)


def test_caption_lists_are_sampled_per_step_and_reproducibly(tmp_path):
    dataset = caption_list_dataset(tmp_path, ["one", "", "two", "three"])
    picks = [dataset.pick_caption(dataset.rows[0]["text"], torch.Generator().manual_seed(s)) for s in range(60)]
    assert set(picks) == {"one", "two", "three"}  # every non-empty caption, never the empty one
    again = [dataset.pick_caption(dataset.rows[0]["text"], torch.Generator().manual_seed(s)) for s in range(60)]
    assert picks == again


def test_caption_dropout_rate(tmp_path):
    dataset = caption_list_dataset(tmp_path, ["one"], proportion_empty_prompts=0.25)
    picks = [dataset.pick_caption(["one"], torch.Generator().manual_seed(s)) for s in range(2000)]
    assert 0.21 < picks.count("") / len(picks) < 0.29


def test_an_example_depends_on_seed_epoch_and_row_only(odd_dataset, tiny_pipeline):
    args = data_args(odd_dataset)
    rows = load_rows(args)
    rows = rows.select(screen_rows(rows, "image", "text").usable)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    first, second = CaptionedImages(rows, args, tokenizer), CaptionedImages(rows, args, tokenizer)
    assert torch.equal(first[(3, 2)]["pixel_values"], second[(3, 2)]["pixel_values"])
    crops = {first[(epoch, 0)]["pixel_values"].numpy().tobytes() for epoch in range(12)}
    assert len(crops) > 1  # random crop and flip change between epochs


def test_sampler_order_is_fixed_per_epoch_and_changes_between_epochs():
    sampler = EpochShuffleSampler(50, seed=1)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(p for _, p in second) == list(range(50)) and second != first
    assert all(epoch == 1 for epoch, _ in second)


def test_usable_captions():
    assert usable_captions(" a cat ") == ["a cat"]
    assert usable_captions(["", None, "x"]) == ["x"]
    assert usable_captions(None) == []


def test_long_captions_warn_once_with_a_count(tiny_pipeline, tmp_path, caplog):
    dataset = caption_list_dataset(tmp_path, "red " * 100)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    with caplog.at_level("WARNING"):
        assert warn_long_captions(dataset.rows, "text", tokenizer) == 1
    assert sum("longer than 77 tokens" in r.message for r in caplog.records) == 1
