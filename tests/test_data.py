import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import ODD_SKIPS
from transformers import CLIPTokenizer

from sdtune.data.dataset import (
    CaptionedImages,
    EpochShuffleSampler,
    load_rows,
    screen_rows,
    shuffle_tags,
    usable_captions,
)
from sdtune.errors import SdtuneError
from sdtune.seeds import example_generator
from sdtune.training.config import parse_args


def data_args(folder, **overrides):
    args = dict(train_data_dir=str(folder), dataset_name=None, dataset_config_name=None, cache_dir=None,
                image_column="image", caption_column="text", max_train_samples=None, resolution=32,
                center_crop=False, random_flip=True, proportion_empty_prompts=0.0, seed=5, shuffle_caption=False,
                keep_tokens=0)
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


def test_a_metadata_file_mixing_caption_strings_and_lists_loads(tmp_path):
    # one type a column for datasets' Arrow JSON reader: "changed from string to array" unless read as lists
    from PIL import Image

    captions = ["a red square", ["a blue square", "a square, blue"], None, "a green square"]
    rows = []
    for index, caption in enumerate(captions):
        Image.new("RGB", (40, 40), "red").save(tmp_path / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": caption})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_rows(data_args(tmp_path))
    by_file = {Path(row["image"]["path"]).name: usable_captions(row["text"]) for row in loaded}
    assert by_file == {"0.png": ["a red square"], "1.png": ["a blue square", "a square, blue"], "2.png": [],
                       "3.png": ["a green square"]}
    assert screen_rows(loaded, "image", "text").skipped == {"missing caption": 1}


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


def test_a_missing_column_lists_the_columns_and_names_the_flag(odd_dataset):
    with pytest.raises(SdtuneError, match=r"it has \['image', 'text'\]\. Set --caption_column\..*metadata\.jsonl"):
        load_rows(data_args(odd_dataset, caption_column="caption"))
    with pytest.raises(SdtuneError, match="Column 'picture'.*Set --image_column"):
        load_rows(data_args(odd_dataset, image_column="picture"))


def test_an_unreachable_hub_dataset_is_one_line_naming_the_fix():
    with pytest.raises(SdtuneError) as error:
        load_rows(data_args(None, train_data_dir=None, dataset_name="someone/no-such-set"))
    message = str(error.value)
    assert "\n" not in message and "'someone/no-such-set'" in message and "--train_data_dir" in message
    assert "pokemon" not in message


def test_metadata_naming_missing_images_is_refused_with_a_few_names_and_the_count(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    names = ["here.png", "gone1.png", "gone2.png", "gone3.png", "gone4.png"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in names))
    with pytest.raises(SdtuneError, match=r"names 4 image file\(s\) that do not exist: gone1.png, gone2.png, "
                                          r"gone3.png\. Add the files or remove their rows"):
        load_rows(data_args(tmp_path))


TAGS = "trigger, style, red, round, small, shiny"


def test_the_kohya_caption_dropout_name_sets_the_same_setting():
    required = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    assert parse_args(required + ["--caption_dropout_rate", "0.15"]).proportion_empty_prompts == 0.15
    assert parse_args(required).proportion_empty_prompts == 0.0
    with pytest.raises(SdtuneError, match="between 0 and 1"):
        parse_args(required + ["--caption_dropout_rate", "1.5"])


@pytest.mark.parametrize("flags, message", [
    (["--keep_tokens", "1"], "only applies with --shuffle_caption"),
    (["--shuffle_caption", "--keep_tokens", "-1"], "0 or more"),
    (["--shuffle_caption", "--cache_latents", "--center_crop"], "cannot be used with --cache_latents"),
])
def test_caption_shuffle_flags_that_cannot_work_are_refused(flags, message):
    with pytest.raises(SdtuneError, match=message):
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    shuffles = {shuffle_tags(TAGS, 2, torch.Generator().manual_seed(s)) for s in range(30)}
    assert len(shuffles) > 5
    for shuffled in shuffles:
        tags = shuffled.split(", ")
        assert tags[:2] == ["trigger", "style"] and sorted(tags[2:]) == ["red", "round", "shiny", "small"]
    assert shuffle_tags(" a ,b,, c ", 3, torch.Generator()) == "a, b, c"


def test_a_shuffled_caption_depends_on_seed_epoch_and_row_only(tmp_path, tiny_pipeline):
    dataset = caption_list_dataset(tmp_path, TAGS, shuffle_caption=True, keep_tokens=1)
    dataset.tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")

    def caption(epoch):
        return dataset.pick_caption(TAGS, example_generator(5, epoch, 0))

    by_epoch = [caption(epoch) for epoch in range(8)]
    assert by_epoch == [caption(epoch) for epoch in range(8)]  # a resumed run draws the same
    assert len(set(by_epoch)) > 1 and all(c.startswith("trigger, ") for c in by_epoch)
    assert torch.equal(dataset[(3, 0)]["input_ids"], dataset.tokenize(by_epoch[3]))  # what training sees
