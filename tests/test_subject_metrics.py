"""metrics.py --subject_images: subject fidelity as the DreamBooth paper measures it, CLIP-I and DINO, computed on the
very images the CLIP scores came from, with intervals and the paired difference between models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import PROMPTS, run_metrics
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

from sdtune.evaluation.clip_score import ClipScorer
from sdtune.evaluation.run import main
from sdtune.evaluation.subject import DinoEmbedder, SubjectSet, add_subject_fidelity, fidelity

TILE = 64  # the tiny pipeline's images


def save_tiny_vit(folder, kind: str):
    """A random self-supervised-ViT stand-in: DINO's architecture (ViT) or DINOv2's, with its image processor."""
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32)
    if kind == "vit":
        ViTModel(ViTConfig(patch_size=8, **shape)).save_pretrained(folder)
    else:
        Dinov2Model(Dinov2Config(patch_size=8, **shape)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("dino"), "vit")


def subject_folder(tmp_path):
    """Four pictures of a "subject" and a broken file (skipped and named)."""
    folder = tmp_path / "subject"
    folder.mkdir()
    for index, colour in enumerate(["red", "orange", "darkred"]):
        Image.new("RGB", (48, 48), colour).save(folder / f"dog-{index}.png")
    Image.effect_noise((40, 56), 50).convert("RGB").save(folder / "dog-3.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_fidelity_is_the_mean_cosine_to_every_subject_picture():
    generated = np.array([[1.0, 0.0], [0.6, 0.8]])
    subject = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert fidelity(generated, subject).tolist() == pytest.approx([0.0, (0.6 + 0.8 - 0.6) / 3])


class RedGreen:
    """An embedder whose embedding of an image is its top-left pixel's (red, green), unit length."""

    def image_embeddings(self, images):
        pixels = torch.tensor([image.getpixel((0, 0))[:2] for image in images], dtype=torch.float64)
        return torch.nn.functional.normalize(pixels, dim=-1)


def test_every_model_is_compared_with_the_first_image_by_image():
    red, green = Image.new("RGB", (2, 2), (255, 0, 0)), Image.new("RGB", (2, 2), (0, 255, 0))
    grids = {"first": {"p": [red, green]}, "second": {"p": [green, green]}, "third": {"p": [red, red]}}
    results = {name: {"per_image": [{"prompt": "p", "index": i} for i in range(2)]} for name in grids}
    subject = SubjectSet("subject", 1, [], [], {"clip_i": np.array([[1.0, 0.0]])})  # one red picture
    add_subject_fidelity(results, grids, subject, {"clip_i": RedGreen()}, seed=0)
    assert [row["clip_i"] for row in results["third"]["per_image"]] == [1.0, 1.0]
    means = {name: result["subject"]["clip_i"]["mean"] for name, result in results.items()}
    assert means == {"first": 0.5, "second": 0.0, "third": 1.0}
    assert results["second"]["subject"]["clip_i"]["difference_to_first"]["mean"] == -0.5
    assert results["third"]["subject"]["clip_i"]["difference_to_first"]["mean"] == 0.5


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_the_dino_embedding_is_the_unit_cls_token_of_the_last_layer(kind, tmp_path):
    embedder = DinoEmbedder(str(save_tiny_vit(tmp_path / kind, kind)))
    images = [Image.new("RGB", (40, 40), "blue"), Image.effect_noise((32, 48), 40).convert("RGB")]
    embeddings = embedder.image_embeddings(images)
    pixels = embedder.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = embedder.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings, cls / cls.norm(dim=-1, keepdim=True), atol=1e-6)


def grid_tiles(path) -> list[Image.Image]:
    grid = Image.open(path)
    return [grid.crop((x, y, x + TILE, y + TILE)) for y in range(0, grid.height, TILE)
            for x in range(0, grid.width, TILE)]


def test_metrics_py_scores_clip_i_and_dino_of_the_scored_images(tmp_path, tiny_pipeline, tiny_clip, tiny_dino,
                                                                 capsys):
    subject = subject_folder(tmp_path)
    results, out = run_metrics(tmp_path, [f"base={tiny_pipeline}", f"again={tiny_pipeline}"], tiny_clip, PROMPTS,
                               "--subject_images", str(subject), "--dino_model_name_or_path", str(tiny_dino))
    report = json.loads((out / "report.json").read_text())["models"]
    pictures = [Image.open(subject / name) for name in ("dog-0.png", "dog-1.png", "dog-2.png", "dog-3.jpg")]
    embedders = {"clip_i": ClipScorer(str(tiny_clip)), "dino": DinoEmbedder(str(tiny_dino))}
    for metric, embedder in embedders.items():
        # by hand: each grid image's mean cosine to the four readable pictures, in the per-image rows' order
        tiles = embedder.image_embeddings(grid_tiles(out / "grid-base.png")).double()
        expected = (tiles @ embedder.image_embeddings(pictures).double().T).mean(dim=1)
        rows = [row[metric] for row in report["base"]["per_image"]]
        assert rows == pytest.approx(expected.tolist(), abs=1e-5)
        summary = report["base"]["subject"][metric]
        assert summary["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1] and summary["ci95"][0] < summary["ci95"][1]
        # the same model again: the same images, so a paired difference of exactly zero
        assert report["again"]["subject"][metric]["difference_to_first"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
        assert "difference_to_first" not in summary
    assert report["base"]["subject"]["subject_images"] == 4
    assert report["base"]["subject"]["subject_skipped"] == ["broken.png"]
    assert (out / "scores.csv").read_text().splitlines()[0].endswith("clip_score,clip_i,dino")
    table = capsys.readouterr().out
    assert "Subject fidelity to 4 subject images, 1 unreadable skipped" in table
    assert "CLIP-I [95% CI]" in table and "DINO [95% CI]" in table


def test_dino_none_scores_clip_i_alone(tmp_path, tiny_pipeline, tiny_clip):
    results, _ = run_metrics(tmp_path, [f"base={tiny_pipeline}"], tiny_clip, PROMPTS[:1],
                             "--subject_images", str(subject_folder(tmp_path)), "--dino_model_name_or_path", "none")
    assert set(results["base"]["subject"]) == {"subject_images", "subject_skipped", "folder", "clip_i"}


def test_a_bad_subject_folder_or_dino_model_stops_before_any_pipeline_loads(tmp_path, tiny_clip):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n")
    (tmp_path / "empty").mkdir()
    flags = ["--models", "m=nowhere", "--prompts", str(prompts), "--clip_model_name_or_path", str(tiny_clip)]
    with pytest.raises(SystemExit, match="--subject_images .*empty: no images found"):
        main([*flags, "--subject_images", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--subject_images .*missing: not a folder"):
        main([*flags, "--subject_images", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="(?s)Cannot load the DINO model .*--dino_model_name_or_path"):
        main([*flags, "--subject_images", str(subject_folder(tmp_path)),
              "--dino_model_name_or_path", str(tmp_path / "no-dino")])
