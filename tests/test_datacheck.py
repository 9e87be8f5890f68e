import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdtune.data.check import main as check_data
from sdtune.errors import SdtuneError
from sdtune.training.config import parse_args

# The usable images of `unseen_dataset`: every PIL mode, sizes from 1x1 to 4000x300, each size different except
# for the three duplicates.
MODES = {"mode1.png": ("1", (33, 17)), "one_pixel.png": ("L", (1, 1)), "palette.gif": ("P", (20, 20)),
         "wide.png": ("RGBA", (4000, 300)), "cmyk.jpg": ("CMYK", (60, 80)), "float.tif": ("F", (30, 30)),
         "alpha.png": ("LA", (16, 64)), "palette_alpha.tif": ("PA", (25, 25))}
LONG_CAPTION = "red " * 100


@pytest.fixture(scope="module")
def unseen_dataset(tmp_path_factory):
    """A folder as a user might bring it: every image mode, extreme sizes, broken and duplicate files, long and
    shared captions, and the captions in a column called `caption`."""
    folder = tmp_path_factory.mktemp("unseen")
    captions = {}
    for index, (name, (mode, size)) in enumerate(MODES.items()):
        Image.new(mode, size).save(folder / name)
        captions[name] = "a thing" if index < 3 else f"image {name}"
    Image.fromarray(np.full((60, 40), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    captions["deep16.png"] = LONG_CAPTION
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    for name in ("dup_a.png", "dup_b.bmp", "dup_c.png"):  # the same pixels, in two formats
        noise.save(folder / name)
        captions[name] = f"noise {name}"
    png = (folder / "dup_a.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "zero.png").write_bytes(b"")
    captions.update({"truncated.png": "x", "corrupt.jpg": "x", "zero.png": "x"})
    Image.new("RGB", (10, 10)).save(folder / "no_caption.png")
    Image.new("RGB", (12, 10)).save(folder / "stray.png")  # no metadata row
    rows = [{"file_name": name, "caption": caption} for name, caption in captions.items()]
    rows.append({"file_name": "no_caption.png"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def check_flags(pipeline, folder, *extra):
    return ["--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(folder), "--resolution", "64",
            "--check_data", *extra]


def test_the_report_counts_what_an_unseen_dataset_holds(unseen_dataset, tiny_pipeline, capsys):
    report = check_data(parse_args(check_flags(tiny_pipeline, unseen_dataset, "--caption_column", "caption")))
    screened = report.screened
    assert len(screened.usable) == 12
    assert dict(screened.skipped) == {"undecodable image": 2, "zero-byte file": 1, "missing caption": 1}
    assert sorted(screened.skipped_names["undecodable image"]) == ["corrupt.jpg", "truncated.png"]
    assert screened.skipped_names["missing caption"] == ["no_caption.png"]
    assert report.token_limit == 77 and report.truncated == 1 and max(report.token_lengths) > 77
    assert report.duplicates == [["dup_a.png", "dup_b.bmp", "dup_c.png"]]
    assert report.shared_captions == [("a thing", 3)]
    assert report.unlisted == ["stray.png"]
    assert report.aspect_histogram() == {"taller than 1:2": 1, "1:2 to 3:4": 1, "3:4 to 4:3": 8, "4:3 to 2:1": 1,
                                         "2:1 or wider": 1}
    printed = capsys.readouterr().out
    assert "Data check: Skipped 4 of 16 rows: 2 undecodable image, 1 zero-byte file, 1 missing caption. " \
           "12 usable." in printed
    assert "e.g. zero-byte file: zero.png" in printed
    assert "Not in the metadata, so left out: 1 image file(s), e.g. stray.png" in printed
    assert "width min 1, median 24, max 4000; height min 1, median 24, max 300; 11 smaller than --resolution 64" \
        in printed
    assert "2 repeat another, in 1 group(s), e.g. dup_a.png = dup_b.bmp = dup_c.png" in printed
    assert "1 longer than 77 and truncated" in printed
    assert "Distinct captions: 10; shared by several images: 3 x 'a thing'" in printed


def test_with_buckets_the_report_counts_the_images_of_each_bucket(unseen_dataset, tiny_pipeline, capsys):
    flags = check_flags(tiny_pipeline, unseen_dataset, "--caption_column", "caption", "--enable_bucket")
    report = check_data(parse_args(flags))
    sizes = dict(zip([(i.width, i.height) for i in report.screened.images], report.buckets))
    assert sizes[(4000, 300)] == (128, 32) and sizes[(1, 1)] == (64, 64)  # the widest bucket; a square
    printed = capsys.readouterr().out
    # the seven squares (1x1 to 30x30) in 64x64; 33x17, 60x80, 40x60 and 16x64 in 80x40, 56x72, 48x72 and 32x128
    assert "Aspect-ratio buckets: 6 in use (width x height: images)\n  32x128: 1\n" in printed
    assert "  64x64: 7\n" in printed and "  56x72: 1\n" in printed
    report = check_data(parse_args([*flags, "--bucket_no_upscale"]))
    sizes = dict(zip([(i.width, i.height) for i in report.screened.images], report.buckets))
    assert sizes[(4000, 300)] == (128, 32) and sizes[(1, 1)] == (8, 8) and sizes[(60, 80)] == (56, 72)
    assert sizes[(24, 24)] == (24, 24) and sizes[(33, 17)] == (32, 16)  # their own sizes, rounded down to the step


def test_a_clean_dataset_reports_no_problems(shapes_dataset, tiny_pipeline, capsys):
    report = check_data(parse_args(check_flags(tiny_pipeline, shapes_dataset)))
    printed = capsys.readouterr().out
    assert f"Data check: All {len(report.screened.usable)} rows usable." in printed
    assert "Duplicate images (same pixels): none." in printed and report.truncated == 0
    assert report.unlisted == [] and "Not in the metadata" not in printed


def test_a_row_without_an_image_is_skipped_not_a_crash():
    import datasets

    from sdtune.data.dataset import inspect_rows

    rows = datasets.Dataset.from_dict({"image": [None], "text": ["x"]}).cast_column("image",
                                                                                    datasets.Image(decode=False))
    result = inspect_rows(rows, "image", "text")
    assert dict(result.skipped) == {"undecodable image": 1} and result.skipped_names["undecodable image"] == ["row 0"]


def test_nothing_usable_prints_the_report_then_exits_non_zero(tmp_path, tiny_pipeline, capsys, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["train_text_to_image.py", *check_flags(tiny_pipeline, tmp_path)])
    with pytest.raises(SystemExit, match="No usable rows"):
        runpy.run_path("train_text_to_image.py", run_name="__main__")
    assert "Data check: Skipped 1 of 1 rows: 1 zero-byte file." in capsys.readouterr().out


def test_the_check_loads_no_model(odd_dataset, tiny_pipeline):
    script = ("import runpy, sys; sys.argv = ['train_text_to_image.py', *sys.argv[1:]]\n"
              "try:\n    runpy.run_path('train_text_to_image.py', run_name='__main__')\n"
              "finally:\n    print(sorted(m for m in ('diffusers', 'accelerate',"
              " 'transformers.models.clip.modeling_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, *check_flags(tiny_pipeline, odd_dataset)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Data check: Skipped 4 of 18 rows" in done.stdout and done.stdout.strip().endswith("[]")


def test_the_check_reports_the_validation_split_and_refuses_a_broken_validation_folder(odd_dataset, tiny_pipeline,
                                                                                      tmp_path, capsys):
    check_data(parse_args(check_flags(tiny_pipeline, odd_dataset, "--validation_split", "0.25")))
    assert "Validation loss: 4 held-out rows; 10 rows to train on." in capsys.readouterr().out  # 14 usable rows
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SdtuneError, match=f"--validation_data_dir {empty}: "):
        check_data(parse_args(check_flags(tiny_pipeline, odd_dataset, "--validation_data_dir", str(empty))))
