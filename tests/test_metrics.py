"""metrics.py: CLIP scores on fixed prompts and seeds, compared across models."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO, subprocess_env, within
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sdtune.data.prompts import read_prompts
from sdtune.evaluation.clip_score import ClipScorer
from sdtune.evaluation.cmmd import cmmd
from sdtune.evaluation.run import main
from sdtune.evaluation.stats import paired_bootstrap

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a gray background"]


def scorer_with_embeddings(tiny_clip, image_embedding, text_embedding):
    """A scorer whose CLIP returns fixed embeddings, in transformers 5's output type."""
    scorer = ClipScorer(str(tiny_clip))
    wrap = lambda vector: lambda *a, **k: BaseModelOutputWithPooling(pooler_output=torch.tensor([vector]))  # noqa
    scorer.model.model.get_image_features = wrap(image_embedding)
    scorer.model.model.get_text_features = wrap(text_embedding)
    return scorer


def test_identical_embeddings_score_100(tiny_clip):
    scorer = scorer_with_embeddings(tiny_clip, [0.3, -1.0, 2.0], [0.3, -1.0, 2.0])
    assert scorer.score(Image.new("RGB", (32, 32)), "anything") == pytest.approx(100.0, abs=1e-4)


def test_negative_cosine_scores_zero(tiny_clip):
    scorer = scorer_with_embeddings(tiny_clip, [1.0, 0.0, 0.0], [-1.0, 0.2, 0.0])
    assert scorer.score(Image.new("RGB", (32, 32)), "anything") == 0.0


def test_torchmetrics_score_matches_the_cosine_of_real_clip_embeddings(tiny_clip):
    # Guards the transformers 5 / torchmetrics 1.9 adapter: the score must be 100 * max(cos, 0) of the model's
    # own projected embeddings, whatever type get_*_features returns.
    scorer = ClipScorer(str(tiny_clip))
    image = Image.effect_noise((40, 40), 60).convert("RGB")
    for prompt in PROMPTS:
        cosine = float(scorer.image_embeddings([image])[0] @ scorer.text_embeddings([prompt])[0])
        assert scorer.score(image, prompt) == pytest.approx(100 * max(cosine, 0.0), abs=1e-3)


def run_metrics(tmp_path, models, clip, prompts=PROMPTS, *extra):
    prompts_file = tmp_path / f"prompts-{random.random()}.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    results = main(["--models", *models, "--prompts", str(prompts_file), "--num_images_per_prompt", "2",
                    "--num_inference_steps", "3", "--clip_model_name_or_path", str(clip), "--output_dir", str(out),
                    "--device", "cpu", *extra])
    return results, out


def test_the_same_model_twice_gets_identical_scores(tmp_path, tiny_pipeline, tiny_clip):
    results, _ = run_metrics(tmp_path, [f"a={tiny_pipeline}", f"b={tiny_pipeline}"], tiny_clip)
    assert [r["clip_score"] for r in results["a"]["per_image"]] == [r["clip_score"] for r in results["b"]["per_image"]]
    assert results["b"]["difference_to_first"]["mean"] == 0.0


def test_shuffling_the_prompt_file_changes_no_per_prompt_score(tmp_path, tiny_pipeline, tiny_clip):
    # seeds are tied to the prompt's text, not its line number
    ordered, _ = run_metrics(tmp_path, [f"m={tiny_pipeline}"], tiny_clip, PROMPTS)
    shuffled, _ = run_metrics(tmp_path, [f"m={tiny_pipeline}"], tiny_clip, list(reversed(PROMPTS)))
    assert ordered["m"]["per_prompt"] == shuffled["m"]["per_prompt"]


def reference_folder(tmp_path):
    """Three images and a broken file (skipped and counted); a metadata.jsonl as in a datasets imagefolder."""
    folder = tmp_path / "reference"
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "red.png")
    Image.new("RGB", (48, 80), "blue").save(folder / "blue.jpg")
    Image.new("L", (64, 64), 128).save(folder / "more" / "gray.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "metadata.jsonl").write_text('{"file_name": "red.png", "text": "red"}\n')
    return folder


def test_report_schema_and_files(tmp_path, tiny_pipeline, finetuned_pipeline, tiny_clip, capsys):
    results, out = run_metrics(tmp_path, [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"], tiny_clip,
                               PROMPTS, "--reference_images", str(reference_folder(tmp_path)))
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"settings", "versions", "models"}
    assert report["settings"]["num_images_per_prompt"] == 2 and report["versions"]["torchmetrics"]
    for name in ("stock", "tuned"):
        model = report["models"][name]
        for key in ("clip_score_mean", "clip_score_std", "clip_score_prompt_means_std", "per_prompt", "per_image"):
            assert key in model
        assert len(model["per_image"]) == len(PROMPTS) * 2
        assert all(0 <= row["clip_score"] <= 100 for row in model["per_image"])
        assert Image.open(out / f"grid-{name}.png").size == (2 * 64, len(PROMPTS) * 64)  # seeds x prompts
    low, high = report["models"]["tuned"]["difference_to_first"]["ci95"]
    assert low <= report["models"]["tuned"]["difference_to_first"]["mean"] <= high
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("model,prompt,index,seed,clip_score") and len(lines) == 1 + 2 * len(PROMPTS) * 2
    table = capsys.readouterr().out
    assert "difference to stock" in table and "tuned" in table
    assert "CMMD to 3 reference images, 1 unreadable skipped" in table
    check_cmmd_of_the_scored_images(report, out, tmp_path / "reference", tiny_clip)


def check_cmmd_of_the_scored_images(report, out, reference, tiny_clip):
    """CMMD is computed on the very images the CLIP scores came from (the grids) and on the readable references."""
    scorer = ClipScorer(str(tiny_clip))
    references = [Image.open(reference / name) for name in ("red.png", "blue.jpg", "more/gray.png")]
    reference_embeddings = scorer.image_embeddings(references).double().numpy()
    for name, model in report["models"].items():
        grid = Image.open(out / f"grid-{name}.png")
        tiles = [grid.crop((x, y, x + 64, y + 64)) for y in range(0, grid.height, 64) for x in range(0, grid.width, 64)]
        expected = cmmd(scorer.image_embeddings(tiles).double().numpy(), reference_embeddings)
        assert model["cmmd"]["value"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert model["cmmd"]["reference_images"] == 3 and model["cmmd"]["reference_skipped"] == ["broken.png"]
        assert model["cmmd"]["ci95"][0] <= model["cmmd"]["value"] <= model["cmmd"]["ci95"][1]
    difference = report["models"]["tuned"]["cmmd"]["difference_to_first"]
    tuned, stock = report["models"]["tuned"]["cmmd"]["value"], report["models"]["stock"]["cmmd"]["value"]
    assert difference["mean"] == pytest.approx(tuned - stock)
    assert "difference_to_first" not in report["models"]["stock"]["cmmd"]


def test_an_empty_or_missing_reference_folder_fails_before_any_model_loads(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--reference_images .*empty: no images found"):
        main(["--models", f"m={tmp_path / 'no-model'}", "--prompts", str(prompts),
              "--reference_images", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--reference_images .*nowhere: not a folder"):
        main(["--models", "m=x", "--prompts", str(prompts), "--reference_images", str(tmp_path / "nowhere")])


def test_a_named_pipe_among_the_reference_images_is_skipped_and_named(tmp_path):
    import os

    from sdtune.evaluation.reference import decode_or_skip, list_reference

    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait for a writer for ever
    reference = list_reference(str(tmp_path))
    decoded = [within(10, decode_or_skip, image, reference.skipped) for image in reference.listed]
    assert [image is not None for image in decoded] == [False, True] and reference.skipped == ["pipe.png"]


def test_same_noise_for_every_model(tmp_path, tiny_pipeline, finetuned_pipeline, tiny_clip):
    results, _ = run_metrics(tmp_path, [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"], tiny_clip)
    assert [r["seed"] for r in results["stock"]["per_image"]] == [r["seed"] for r in results["tuned"]["per_image"]]


def test_a_missing_model_fails_cleanly_without_a_report(tmp_path, tiny_clip):
    with pytest.raises(SystemExit, match="nope"):
        run_metrics(tmp_path, [f"nope={tmp_path / 'does-not-exist'}"], tiny_clip)
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_missing_clip_or_prompts_file_fails_cleanly(tmp_path, tiny_pipeline):
    with pytest.raises(SystemExit, match="Cannot load CLIP"):
        run_metrics(tmp_path, [f"m={tiny_pipeline}"], tmp_path / "no-clip")
    with pytest.raises(SystemExit, match="not found"):
        main(["--models", f"m={tiny_pipeline}", "--prompts", str(tmp_path / "none.txt")])


def test_a_latin1_prompts_file_stops_with_its_name_and_encoding(tmp_path, tiny_pipeline):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\na caf\u00e9 on a white background\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=re.escape(f"{prompts} is not UTF-8 text (line 2, byte 0xe9)")):
        main(["--models", f"m={tiny_pipeline}", "--prompts", str(prompts)])


def test_a_repeated_prompt_is_read_once_with_a_warning(tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffa red circle\na blue square\n# a comment\na red circle\n", encoding="utf-8")
    assert read_prompts(prompts) == ["a red circle", "a blue square"]
    assert "repeats 'a red circle'" in caplog.text


def test_commands_start_without_the_expected_torchvision_warnings():
    # transformers warns at diffusers' import that torchvision (not a dependency) is missing; sdtune drops exactly that
    result = subprocess.run([sys.executable, "metrics.py", "--help"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, check=True)
    assert "usage:" in result.stdout
    assert "requires torchvision" not in result.stderr


def test_a_crash_midway_leaves_no_report(tmp_path, tiny_pipeline, tiny_clip, monkeypatch):
    calls = []

    def failing_score(self, image, prompt):
        calls.append(prompt)
        if len(calls) > 3:
            raise RuntimeError("simulated crash")
        return 50.0
    monkeypatch.setattr(ClipScorer, "score", failing_score)
    with pytest.raises(RuntimeError):
        run_metrics(tmp_path, [f"m={tiny_pipeline}"], tiny_clip)
    assert not (tmp_path / "out").exists()


def test_image_edits_are_scored_by_direction_and_preservation(tmp_path, tiny_pipeline, tiny_clip):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (48, 40), "red").save(inputs / "a_red_circle.png")
    Image.new("RGB", (40, 40), "blue").save(inputs / "a_blue_square.png")
    results, out = run_metrics(tmp_path, [f"m={tiny_pipeline}"], tiny_clip, PROMPTS, "--init_images", str(inputs),
                               "--edit_prompt", "a green circle")
    model = results["m"]
    assert -1 <= model["directional_similarity_mean"] <= 1 and -1 <= model["preservation_mean"] <= 1
    assert {r["source_caption"] for r in model["per_image"]} == {"a red circle", "a blue square"}


def test_paired_bootstrap_interval():
    mean, (low, high) = paired_bootstrap([1.0, 2.0, 3.0, 4.0], seed=0)
    assert mean == 2.5 and 1.0 <= low < 2.5 < high <= 4.0
    assert paired_bootstrap([5.0] * 6)[1] == (5.0, 5.0)
