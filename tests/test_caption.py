"""python -m sdtune.caption: CLIP ranking on the tiny world's CLIP, BLIP and Florence-2 on tiny random models built
here, the caption files it writes and keeps, and the bad input it meets."""

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
from helpers import REPO, subprocess_env

from sdtune.caption.candidates import expand, read_candidates
from sdtune.caption.cli import main as caption
from sdtune.errors import SdtuneError
from tinyworld.creatures import SPECIES, random_creature

TINY_CLIP = str(REPO / "tinyworld" / "clip")
CANDIDATES = str(REPO / "configs" / "tiny_caption_candidates.txt")


def creatures(folder, count: int, seed: int = 0) -> dict[str, str]:
    """`count` creatures (every species in turn, on white or black) saved as PNGs; their true captions by name."""
    rng, truth = random.Random(seed), {}
    for index in range(count):
        image, true_caption = random_creature(rng, SPECIES[index % len(SPECIES)], ("white", "black")[index % 2])
        image.save(folder / f"{index:02d}.png")
        truth[f"{index:02d}.png"] = true_caption
    return truth


def clip_flags(folder, *extra) -> list[str]:
    return [str(folder), "--captioner", "clip", "--model_name_or_path", TINY_CLIP, "--candidates", CANDIDATES,
            "--device", "cpu", *extra]


def metadata(folder) -> dict[str, str]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return {row["file_name"]: row["text"] for row in rows}


def test_braces_stand_for_every_alternative(tmp_path):
    assert expand("a {red|blue} {circle|square}") == ["a red circle", "a red square", "a blue circle",
                                                      "a blue square"]
    assert expand("a {|big }dog") == ["a dog", "a big dog"]
    assert len(read_candidates(CANDIDATES)) == 108
    (tmp_path / "bad.txt").write_text("a red circle\na {red|blue circle\n")
    with pytest.raises(SdtuneError, match="bad.txt line 2"):
        read_candidates(tmp_path / "bad.txt")


def test_help_answers_without_loading_torch():
    script = ("import runpy, sys; sys.argv = ['sdtune.caption', '--help']\n"
              "try:\n    runpy.run_module('sdtune.caption', run_name='__main__')\n"
              "except SystemExit:\n    print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert "--captioner {blip,florence2,clip}" in done.stdout and done.stdout.strip().endswith("[]")


def test_clip_picks_the_true_captions_and_a_rerun_keeps_them(tmp_path, monkeypatch):
    truth = creatures(tmp_path, 12)
    summary = caption(clip_flags(tmp_path, "--batch_size", "5"))
    written = metadata(tmp_path)
    assert summary.captioned == 12 and sorted(written) == sorted(truth)
    assert sum(written[name] == truth[name] for name in truth) >= 11  # the tiny CLIP is near perfect on its world
    # a second run finds every image captioned: it loads no model and changes nothing
    monkeypatch.setattr("sdtune.caption.run.load_captioner", lambda spec: pytest.fail("loaded a model"))
    again = caption(clip_flags(tmp_path, "--prefix", "sks, "))
    assert again.kept == 12 and again.captioned == 0 and metadata(tmp_path) == written


def test_an_interrupted_run_is_finished_by_the_next(tmp_path, monkeypatch):
    creatures(tmp_path, 6)
    from sdtune.caption import captioners

    calls = []
    real = captioners.ClipRanker.caption

    def fail_on_second_batch(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(captioners.ClipRanker, "caption", fail_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        caption(clip_flags(tmp_path, "--batch_size", "4"))
    first = metadata(tmp_path)
    assert len(first) == 4  # the first batch was written before the interruption
    monkeypatch.setattr(captioners.ClipRanker, "caption", real)
    summary = caption(clip_flags(tmp_path, "--batch_size", "4"))
    assert summary.kept == 4 and summary.captioned == 2
    finished = metadata(tmp_path)
    assert len(finished) == 6 and all(finished[name] == caption_text for name, caption_text in first.items())


def test_txt_format_writes_kohya_files_with_trigger_word_and_overwrite_redoes_them(tmp_path):
    (tmp_path / "10_sks").mkdir()
    truth = creatures(tmp_path / "10_sks", 3)
    (tmp_path / "10_sks" / "00.txt").write_text("my own caption")
    summary = caption(clip_flags(tmp_path, "--format", "txt", "--prefix", "sks creature, ", "--suffix", ", best"))
    assert summary.kept == 1 and summary.captioned == 2 and not (tmp_path / "metadata.jsonl").exists()
    assert (tmp_path / "10_sks" / "00.txt").read_text() == "my own caption"
    assert (tmp_path / "10_sks" / "01.txt").read_text() == f"sks creature, {truth['01.png']}, best"
    caption(clip_flags(tmp_path, "--format", "txt", "--overwrite"))
    assert (tmp_path / "10_sks" / "00.txt").read_text() == truth["00.png"]
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(".")]  # no temporary file left


def test_bad_images_are_skipped_and_named(tmp_path):
    creatures(tmp_path, 2)
    png = (tmp_path / "00.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image, not listed")
    summary = caption(clip_flags(tmp_path))
    assert summary.captioned == 2
    assert dict(summary.skipped) == {"undecodable image": 1, "zero-byte file": 1}
    assert "truncated.png" in summary.text() and "zero.jpg" in summary.text()
    assert sorted(metadata(tmp_path)) == ["00.png", "01.png"]


@pytest.mark.parametrize("make, message", [
    (lambda folder: None, "No images in"),
    (lambda folder: (folder / "a.doc").write_text("x"), "No images in"),
])
def test_a_folder_without_images_is_refused(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(SystemExit, match=message):
        caption(clip_flags(tmp_path))


def test_a_caption_file_not_in_utf8_is_left_as_it_is(tmp_path):
    creatures(tmp_path, 2)
    latin1 = "un dessin, créature".encode("latin-1")
    (tmp_path / "00.txt").write_bytes(latin1)
    summary = caption(clip_flags(tmp_path, "--format", "txt"))
    assert summary.captioned == 1 and "00.png" in summary.text() and "not UTF-8" in summary.text()
    assert (tmp_path / "00.txt").read_bytes() == latin1


def test_a_broken_metadata_line_stops_the_run_and_the_file_is_kept(tmp_path):
    creatures(tmp_path, 2)
    broken = '{"file_name": "00.png", "text": "mine"}\n{"file_name": "01.png", "te\n'
    (tmp_path / "metadata.jsonl").write_text(broken)
    with pytest.raises(SystemExit, match="metadata.jsonl line 2 is not valid JSON"):
        caption(clip_flags(tmp_path))
    assert (tmp_path / "metadata.jsonl").read_text() == broken


def test_a_missing_model_or_one_that_is_not_a_captioner_is_named(tmp_path):
    creatures(tmp_path, 1)
    with pytest.raises(SystemExit, match="no_such_model"):
        caption([str(tmp_path), "--captioner", "blip", "--model_name_or_path", str(tmp_path / "no_such_model")])
    with pytest.raises(SystemExit, match="is a clip model, not a blip one"):
        caption([str(tmp_path), "--captioner", "blip", "--model_name_or_path", TINY_CLIP])
    assert not (tmp_path / "metadata.jsonl").exists()


def test_a_folder_that_refuses_writes_is_named_and_nothing_written_is_lost(tmp_path, monkeypatch):
    creatures(tmp_path, 4)
    caption(clip_flags(tmp_path, "--format", "txt"))
    before = {path.name: path.read_text() for path in tmp_path.glob("*.txt")}

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("sdtune.caption.store.os.replace", refuse)  # as a read-only folder does (root ignores modes)
    with pytest.raises(SystemExit, match=r"Cannot write 00.txt in .*Permission denied"):
        caption(clip_flags(tmp_path, "--format", "txt", "--overwrite"))
    assert {path.name: path.read_text() for path in tmp_path.glob("*.txt")} == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


WORDS = ["a", "picture", "of", "drawing", "red", "blue", "green", "creature", "with", "wings", "on", "white", "black"]


def tiny_blip(folder):
    """A random BLIP captioner saved as from_pretrained loads it: a 2-layer ViT on 16 px and a 2-layer text decoder
    over a 19-word vocabulary. Its captions are random words: it proves loading, batching and writing, not quality."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = BlipConfig(text_config={**small, "vocab_size": len(specials) + len(WORDS), "encoder_hidden_size": 32,
                                     "bos_token_id": 5, "sep_token_id": 3, "pad_token_id": 0},
                        vision_config={**small, "image_size": 16, "patch_size": 4}, projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 16, "width": 16})
    BlipProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def tiny_florence2(folder):
    """A random Florence-2 (transformers' native port) saved as from_pretrained loads it: DaViT with one 16-wide
    stage on 8 px images, a 1-layer BART, and a byte-level tokenizer of single characters (no merges)."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration
    from transformers.models.florence2 import Florence2Processor

    folder.mkdir()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(ByteLevel.alphabet()))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    text = {"model_type": "bart", "vocab_size": len(vocab), "max_position_embeddings": 64, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, "encoder_attention_heads": 1,
            "decoder_attention_heads": 1, "d_model": 8, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
            "decoder_start_token_id": 2, "forced_bos_token_id": 0}
    vision = {"depths": [1], "patch_size": [7], "patch_stride": [4], "patch_padding": [3], "patch_prenorm": [False],
              "embed_dim": [16], "num_heads": [1], "num_groups": [1], "window_size": 12,
              "projection_dim": 8}  # the projection feeds BART: its width is d_model
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision, image_token_id=4)
                                      ).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"height": 8, "width": 8}, do_center_crop=False, image_seq_length=5)
    Florence2Processor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def generated(folder, model, captioner, *extra) -> dict[str, str]:
    summary = caption([str(folder), "--captioner", captioner, "--model_name_or_path", str(model), "--device", "cpu",
                       "--num_beams", "1", "--max_new_tokens", "6", "--overwrite", *extra])
    assert summary.captioned == 3, summary.text()
    return metadata(folder)


def test_blip_captions_a_folder_in_batches(tmp_path):
    model = tiny_blip(tmp_path / "blip")
    images = tmp_path / "images"
    images.mkdir()
    creatures(images, 3)
    one_by_one = generated(images, model, "blip", "--batch_size", "1")
    assert generated(images, model, "blip", "--batch_size", "2") == one_by_one  # a batch changes no caption
    assert all(set(text.split()) <= set(WORDS) and text for text in one_by_one.values())
    prompted = generated(images, model, "blip", "--prompt", "a picture of")
    assert all(text.startswith("a picture of") for text in prompted.values())


def test_florence2_captions_a_folder_in_batches(tmp_path):
    model = tiny_florence2(tmp_path / "florence2")
    images = tmp_path / "images"
    images.mkdir()
    creatures(images, 3)
    one_by_one = generated(images, model, "florence2", "--batch_size", "1", "--task", "<DETAILED_CAPTION>")
    assert generated(images, model, "florence2", "--batch_size", "2", "--task", "<DETAILED_CAPTION>") == one_by_one
    assert all(text and "<" not in text for text in one_by_one.values())  # no <s>, </s> or <pad> left in


def kohya_folder(folder):
    """kohya's layout: two images repeated 3 times in `3_sks creature/`, two at the top, one without a caption."""
    (folder / "3_sks creature").mkdir(parents=True)
    truth = creatures(folder / "3_sks creature", 2)
    truth.update({f"top{name}": text for name, text in creatures(folder, 3, seed=1).items()})
    for name in ("00.png", "01.png"):
        (folder / "3_sks creature" / name).with_suffix(".txt").write_text(f"sks creature, {truth[name]}\n")
        (folder / name).rename(folder / f"top{name}")
        (folder / f"top{name}").with_suffix(".txt").write_text(truth[f"top{name}"])
    (folder / "02.png").rename(folder / "no_caption.png")
    return folder


def test_the_data_check_reads_kohya_caption_files_and_repeats(tmp_path, tiny_pipeline):
    from sdtune.data.check import main as check_data
    from sdtune.training.config import parse_args

    folder = kohya_folder(tmp_path / "data")
    report = check_data(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir",
                                    str(folder), "--resolution", "64", "--check_data"]))
    assert len(report.screened.usable) == 2 + 2  # one row per image: the repeats are the training examples'
    assert dict(report.screened.skipped) == {"missing caption": 1}
    assert report.sources == (
        "Captions from: 4 .txt caption files beside the images (kohya's layout).",
        f"Images without a caption file, left out: 1, e.g. no_caption.png (python -m sdtune.caption {folder} "
        "--format txt writes them).",
        "Repeats (kohya's N_name folders): 3_sks creature: 2 images x 3.")
    assert not report.duplicates  # a repeated image is one file, not a duplicate
    assert sorted(report.caption_counts.values()) == [1, 1, 3, 3]  # rows per caption: the repeats count
    # a metadata.jsonl comes first: the caption files beside it are named as not read
    caption(clip_flags(folder))
    again = check_data(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir",
                                   str(folder), "--resolution", "64", "--check_data"]))
    assert again.sources == ("Captions from: metadata.jsonl (4 .txt caption files beside the images not read: the "
                             "metadata comes first).",)
    assert len(again.screened.usable) == 5


def test_training_runs_on_kohya_caption_files(tmp_path, train):
    folder = kohya_folder(tmp_path / "data")
    out = train(tmp_path / "run", data=folder)
    assert "on 8 rows" in (out / "train.log").read_text()


def test_the_repeats_of_an_image_read_its_one_row_decoded_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch
    from transformers import CLIPTokenizer

    from sdtune.data import dataset as data
    from sdtune.data.captions import caption_file_rows
    from sdtune.training.latent_cache import build_latent_cache

    rows = caption_file_rows(kohya_folder(tmp_path / "data"), "image", "text")
    decoded, decode = Counter(), data.decode_row_image
    monkeypatch.setattr(data, "decode_row_image", lambda value: decoded.update([value["path"]]) or decode(value))
    screened = data.screen_rows(rows, "image", "text")
    assert len(rows) == 5 and len(screened.usable) == 4 and sorted(decoded.values()) == [1, 1, 1, 1]
    args = SimpleNamespace(image_column="image", caption_column="text", resolution=32, center_crop=True,
                           random_flip=True, proportion_empty_prompts=0.0, seed=0, shuffle_caption=False, keep_tokens=0)
    usable = rows.select(screened.usable)  # 3_sks creature/00.png, 01.png (x 3 each), top00.png, top01.png
    examples = data.CaptionedImages(usable, args, CLIPTokenizer.from_pretrained(TINY_CLIP))
    assert len(examples) == 2 * 3 + 2 and examples.row_of == [0, 0, 0, 1, 1, 1, 2, 3]
    sizes = [(32, 32), (32, 32), (64, 32), (32, 64)]
    assert data.CaptionedImages(usable, args, examples.tokenizer, buckets=sizes).buckets == \
        [(32, 32)] * 6 + [(64, 32), (32, 64)]  # by position, as the bucket sampler reads them

    decoded.clear()  # --cache_latents: each image encoded once per flip, its repeats sharing the tensors
    vae = SimpleNamespace(dtype=torch.float32, encode=lambda pixels: SimpleNamespace(latent_dist=SimpleNamespace(
        mean=pixels[:, :2, ::8, ::8], std=pixels[:, 2:, ::8, ::8].abs())))
    cache = build_latent_cache(examples, vae, lambda ids, return_dict: (torch.zeros(len(ids), 3, 4),), "cpu", 4,
                               False)
    assert sorted(decoded.values()) == [2, 2, 2, 2]
    assert cache.means[0] is cache.means[2] and cache.means[3] is cache.means[5]
    assert not torch.equal(cache.means[0], cache.means[3])
    examples.cache = cache
    assert torch.equal(examples[(0, 1)]["latent_mean"], cache.image_distribution(0, False)[0]) or \
        torch.equal(examples[(0, 1)]["latent_mean"], cache.image_distribution(0, True)[0])


def test_a_caption_file_is_read_as_kohya_reads_it(tmp_path):
    from sdtune.data.captions import read_caption_file, repeats_of

    (tmp_path / "a.txt").write_text("\ufeffsks dog, on a sofa\nnotes kohya does not read\n", encoding="utf-8")
    assert read_caption_file(tmp_path / "a.txt") == "sks dog, on a sofa"  # first line, byte-order mark dropped
    assert read_caption_file(tmp_path / "none.txt") is None
    assert [repeats_of(key) for key in ("10_sks dog/a.png", "a.png", "10_x.png", "sks/a.png")] == [10, 1, 1, 1]
    with pytest.raises(SdtuneError, match="0_sks dog asks for 0 repeats"):
        repeats_of("0_sks dog/a.png")


def test_the_trainer_names_a_caption_file_not_in_utf8(tmp_path, tiny_pipeline):
    from sdtune.data.check import main as check_data
    from sdtune.training.config import parse_args

    folder = kohya_folder(tmp_path / "data")
    (folder / "top00.txt").write_bytes("créature".encode("latin-1"))
    with pytest.raises(SdtuneError, match=r"top00.txt is not UTF-8 text \(byte 2\): save it as UTF-8"):
        check_data(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir",
                               str(folder), "--resolution", "64", "--check_data"]))


def test_a_folder_without_captions_says_how_to_write_them(tmp_path, tiny_pipeline):
    from sdtune.data.check import main as check_data
    from sdtune.training.config import parse_args

    creatures(tmp_path, 2)
    with pytest.raises(SdtuneError, match="No captions in .*python -m sdtune.caption"):
        check_data(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir",
                               str(tmp_path), "--resolution", "64", "--check_data"]))
