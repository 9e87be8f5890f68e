"""The model manager: models added and removed while serving (folders, LoRAs, a run's checkpoints), what they share
and free, what is remembered across restarts, bad input, and generations running while models come and go."""

import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import LORA, run_in_process, tiny_flags

from sdtune.app.model_sources import SourceError
from sdtune.app.models import ADDED_FILE, ModelManager
from sdtune.generation.backend import LocalBackend
from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.generation.registry import ModelRefused, ModelRegistry, ModelSpec, ModelUnavailable

PROMPT = "a red circle on a white background"
SETTINGS = GenerationSettings(num_inference_steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline, shapes_dataset):
    """A full fine-tune and a LoRA run of the tiny pipeline, each with checkpoint-2 and checkpoint-4, under one root."""
    root = tmp_path_factory.mktemp("models-root")
    for name, extra in (("full", ()), ("lora", LORA)):
        run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, root / name, *extra, "--checkpointing_steps", "2"))
    return root


def draw(registry, name, seed=0) -> bytes:
    return LocalBackend(registry).text_to_images(name, None, PROMPT, [seed], SETTINGS)[0].tobytes()


def manager_for(tiny_pipeline, root, output_dir, *extra_specs) -> ModelManager:
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)), *extra_specs], device="cpu")
    return ModelManager(registry, root, output_dir, models_root_shown="models")


def test_added_models_share_components_and_removing_them_frees_their_weights(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    registry = manager.registry
    before = registry.parameter_bytes()
    stock = registry.load("stock")

    manager.add("tuned", "full")  # the run's final pipeline folder
    manager.add("step-2", "full/checkpoint-2")  # a full fine-tune's checkpoint: its UNet on the base
    manager.add("lora-2", "lora/checkpoint-2", lora_scale=0.5)  # a LoRA run's checkpoint: an adapter on the base
    manager.add("lora", str(runs / "lora"))  # the LoRA run's output folder, by an absolute path under the root
    tuned, step, lora = registry.load("tuned"), registry.load("step-2"), registry.load("lora")
    for pipeline in (tuned, step):  # as at start: identical components are the same modules
        assert pipeline.vae is stock.vae and pipeline.text_encoder is stock.text_encoder
        assert pipeline.unet is not stock.unet
    assert lora is stock and registry.load("lora-2") is stock  # adapters on the one base pipeline
    unet_bytes = sum(p.numel() * p.element_size() for p in tuned.unet.parameters())
    assert before + 2 * unet_bytes < registry.parameter_bytes() < before + 3 * unet_bytes  # two UNets + adapters

    images = {name: draw(registry, name) for name in registry.names}
    assert len(set(images.values())) == len(images)
    listed = ModelRegistry([ModelSpec("tuned", str(runs / "full")),
                            ModelSpec("lora", str(tiny_pipeline), lora=str(runs / "lora"))], device="cpu")
    assert draw(listed, "tuned") == images["tuned"] and draw(listed, "lora") == images["lora"]

    for name in ("tuned", "step-2", "lora-2", "lora"):
        assert "freed now" in manager.remove(name)
    assert registry.names == ["stock"] and registry.parameter_bytes() == before
    assert not any(stock.get_list_adapters().values())
    assert draw(registry, "stock") == images["stock"]


def test_a_checkpoint_draws_what_its_run_drew_at_that_step(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path, ModelSpec("tuned", str(runs / "full")),
                          ModelSpec("lora", str(tiny_pipeline), lora=str(runs / "lora")))
    manager.add("step-4", "full/checkpoint-4")  # the last checkpoint holds the final weights (no EMA)
    manager.add("lora-4", "lora/checkpoint-4")
    registry = manager.registry
    assert draw(registry, "step-4") == draw(registry, "tuned")
    assert draw(registry, "lora-4") == draw(registry, "lora")
    manager.add("step-2", "full/checkpoint-2")
    assert draw(registry, "step-2") != draw(registry, "step-4")


def test_additions_are_served_again_after_a_restart_after_the_configured_list(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    manager.add("lora-2", "lora/checkpoint-2", lora_scale=0.25)
    manager.add("tuned", "full")
    manager.add("gone", "full/checkpoint-2")
    manager.remove("gone")
    image = draw(manager.registry, "lora-2")
    assert (tmp_path / ADDED_FILE).is_file()

    restarted = manager_for(tiny_pipeline, runs, tmp_path)
    restarted.restore()
    assert restarted.registry.names == ["stock", "lora-2", "tuned"]
    assert restarted.registry.configured_scale("lora-2") == 0.25
    assert draw(restarted.registry, "lora-2") == image
    assert [entry["name"] for entry in restarted.listing() if entry["added"]] == ["lora-2", "tuned"]


def test_a_single_file_checkpoint_is_served_as_the_pipeline_it_was_written_from(tiny_pipeline, runs, tmp_path):
    """The fine-tune shared as one original-format file (as A1111 users share SD v1 models), read against the stock
    pipeline folder's configs: its VAE and text encoder are the stock ones (a full fine-tune trains the UNet only),
    its UNet the fine-tune's, and it draws the fine-tune's images; the .ckpt of the same weights only when allowed."""
    from tinyworld.single_file import write_single_file

    write_single_file(runs / "full", runs / "full.safetensors")
    write_single_file(runs / "full", runs / "full.ckpt", pickle=True)
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    registry = manager.registry
    stock, before = registry.load("stock"), registry.parameter_bytes()
    assert "single-file checkpoint full.safetensors" in manager.add("single", "full.safetensors")
    single = registry.load("single")
    assert single.vae is stock.vae and single.text_encoder is stock.text_encoder and single.unet is not stock.unet
    folder = ModelRegistry([ModelSpec("tuned", str(runs / "full"))], device="cpu")
    assert draw(registry, "single") == draw(folder, "tuned") != draw(registry, "stock")

    with pytest.raises(SourceError, match="allow_pickle: full.ckpt is a pickle"):
        manager.add("pickled", "full.ckpt")
    with pytest.raises(ModelUnavailable, match="full.ckpt is a pickle; it is read only with allow_pickle"):
        registry.add(ModelSpec("raw", str(tiny_pipeline), single_file=str(runs / "full.ckpt")))  # the registry too
    manager.add("pickled", "full.ckpt", allow_pickle=True)
    assert registry.load("pickled").unet is single.unet  # the same weights: the one module, shared
    assert draw(registry, "pickled") == draw(folder, "tuned")
    manager.remove("pickled")
    manager.remove("single")
    assert registry.parameter_bytes() == before


def bad_inputs(runs: Path, outside: Path):
    (runs / "half").mkdir(exist_ok=True)
    (runs / "half" / "model_index.json").write_text("{}")
    (runs / "pickle.ckpt").write_bytes(b"\x80\x04N.")
    (runs / "notes.safetensors").write_bytes(b"not a safetensors file")
    (runs / "run.tmp").mkdir(exist_ok=True)
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.out.0.weight": torch.zeros(1), "cond_stage_model.model.ln_final.weight":
               torch.zeros(1)}, str(runs / "sd2.safetensors"))  # SD 2's text encoder (OpenCLIP) under an SD UNet
    save_file({"encoder.weight": torch.zeros(1)}, str(runs / "other.safetensors"))
    return [
        (dict(name="x", path="../outside"), SourceError, "path: ../outside is outside the models root models"),
        (dict(name="x", path=str(outside)), SourceError, "is outside the models root models"),
        (dict(name="x", path="missing"), SourceError, "path: missing does not exist"),
        (dict(name="x", path=""), SourceError, "path: empty"),
        (dict(name="x", path="half"), SourceError, "path: half has a model_index.json but no unet/config.json"),
        (dict(name="x", path="run.tmp"), SourceError, "still being written"),
        (dict(name="x", path="pickle.ckpt"), SourceError, "allow_pickle: pickle.ckpt is a pickle"),
        (dict(name="x", path="notes.safetensors"), SourceError, "path: notes.safetensors is not a readable"),
        (dict(name="x", path="sd2.safetensors"), SourceError, "path: sd2.safetensors is a Stable Diffusion checkpoint "
         "but not an SD v1 one"),
        (dict(name="x", path="other.safetensors"), SourceError,
         "path: other.safetensors is neither an SD v1 checkpoint nor a LoRA"),
        (dict(name="x", path="full/training_config.yaml"), SourceError, "is neither a .safetensors file nor a .ckpt"),
        (dict(name="x", path="lora", base="nothing"), SourceError, "base: 'nothing' is not a served base model"),
        (dict(name="x", path="lora", base="lora-a"), SourceError, "base: 'lora-a' is not a served base model"),
        (dict(name="x", path="lora", lora_scale=math.nan), SourceError, "lora_scale must be a number"),
        (dict(name="x", path="lora", lora_scale=3), SourceError, "lora_scale must be a number"),
        (dict(name="", path="full"), SourceError, "name: '' is not a model name"),
        (dict(name="../up", path="full"), SourceError, "name: '../up' is not a model name"),
        (dict(name="stock", path="full"), ModelRefused, "name: 'stock' is already served"),
    ]


def test_bad_additions_are_refused_naming_the_field_and_nothing_served_changes(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path,
                          ModelSpec("lora-a", str(tiny_pipeline), lora=str(runs / "lora")))
    registry = manager.registry
    before, names, image = registry.parameter_bytes(), registry.names, draw(registry, "lora-a")
    for request, error, message in bad_inputs(runs, tmp_path):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")) as raised:
            manager.add(**request)
        assert str(runs) not in str(raised.value) and str(tmp_path) not in str(raised.value)
        assert registry.names == names and registry.parameter_bytes() == before, request
    with pytest.raises(ModelRefused, match="name: 'x' is the last model"):
        ModelManager(ModelRegistry([ModelSpec("x", str(tiny_pipeline))], device="cpu"), runs, tmp_path).remove("x")
    with pytest.raises(ModelUnavailable, match="Unknown model 'nothing'"):
        manager.remove("nothing")
    assert draw(registry, "lora-a") == image and not (tmp_path / ADDED_FILE).exists()


def test_a_lora_whose_layers_do_not_match_its_base_is_refused_and_leaves_the_base_as_it_was(tiny_pipeline, runs,
                                                                                          tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(runs / "lora" / "pytorch_lora_weights.safetensors"))
    save_file({key: torch.zeros(value.shape[0], value.shape[1] + 8) if "lora.down" in key else value
               for key, value in weights.items()}, str(runs / "wider.safetensors"))
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    image, before = draw(manager.registry, "stock"), manager.registry.parameter_bytes()
    with pytest.raises(ModelUnavailable, match="size mismatch") as raised:
        manager.add("wider", "wider.safetensors", base="stock")
    assert str(runs) not in str(raised.value)
    assert manager.registry.names == ["stock"] and manager.registry.parameter_bytes() == before
    assert draw(manager.registry, "stock") == image


def test_requests_keep_their_own_images_while_models_come_and_go(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path,
                          ModelSpec("lora", str(tiny_pipeline), lora=str(runs / "lora")))
    registry = manager.registry
    alone = {name: draw(registry, name) for name in ("stock", "lora")}
    failures, drawn, done = [], [], threading.Event()

    def load(name):
        while not done.is_set():
            try:
                drawn.append((name, draw(registry, name)))
            except Exception as error:  # noqa: BLE001 - any failure fails the test below
                failures.append(repr(error))

    workers = [threading.Thread(target=load, args=(name,)) for name in ("stock", "lora", "lora")]
    for worker in workers:
        worker.start()
    try:
        for _ in range(3):  # another LoRA and another base come and go beside them
            manager.add("lora-2", "lora/checkpoint-2")
            manager.add("step-2", "full/checkpoint-2")
            assert draw(registry, "lora-2") != alone["lora"]
            manager.remove("lora-2")
            manager.remove("step-2")
    finally:
        done.set()
        for worker in workers:
            worker.join()
    assert not failures and len(drawn) >= 6
    assert [name for name, image in drawn if image != alone[name]] == []


def test_a_model_removed_during_its_request_is_freed_after_it(tiny_pipeline, runs, tmp_path):
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    registry = manager.registry
    before = registry.parameter_bytes()
    manager.add("tuned", "full")
    slow = GenerationSettings(num_inference_steps=20, width=64, height=64)  # long enough to remove it meanwhile
    expected = text_to_images(registry.get("tuned"), PROMPT, [0], slow)[0].tobytes()
    started, result = threading.Event(), {}

    def request():
        with registry.use("tuned") as pipeline:
            started.set()
            result["image"] = text_to_images(pipeline, PROMPT, [0], slow)[0].tobytes()

    thread = threading.Thread(target=request)
    thread.start()
    started.wait()
    assert "freed when the request using it ends" in manager.remove("tuned")
    assert "tuned" not in registry.names and registry.parameter_bytes() > before  # still drawing
    with pytest.raises(ModelUnavailable, match="Unknown model 'tuned'"):
        draw(registry, "tuned")  # a new request for it is refused
    thread.join()
    assert result["image"] == expected  # its own model's image to the end
    assert registry.parameter_bytes() == before


@pytest.fixture(scope="module")
def models_app(tmp_path_factory, tiny_pipeline, runs):
    """The app serving the tiny stock model, adding models from under the runs' folder."""
    from helpers import serve_in_process

    yield from serve_in_process(tmp_path_factory.mktemp("models-app"), runs, tiny_pipeline)


def test_models_are_added_used_and_removed_through_the_api(models_app, runs):
    from gradio_client import Client

    client = Client(models_app["url"], verbose=False)
    assert {"/add_model", "/remove_model", "/list_models"} <= \
        set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    message, listing = client.predict(name="step-4", path="full/checkpoint-4", base="", lora_scale=None,
                                      allow_pickle=False, api_name="/add_model")
    assert "Added 'step-4'" in message and [m["name"] for m in listing] == ["stock", "step-4"]
    gallery, _, run = client.predict(prompt=PROMPT, negative_prompt="", model="step-4", scheduler="dpmsolver++",
                                     num_inference_steps=2, guidance_scale=7.5, width=64, height=64, seed=1,
                                     num_images=1, api_name="/text2img")
    assert run["model"] == "step-4" and len(gallery) == 1
    with pytest.raises(Exception, match="path: ../elsewhere is outside the models root") as raised:
        client.predict(name="x", path="../elsewhere", base="", lora_scale=None, allow_pickle=False,
                       api_name="/add_model")
    assert str(runs) not in str(raised.value)
    message, listing = client.predict(name="step-4", api_name="/remove_model")
    assert "Removed 'step-4'" in message
    assert [m["name"] for m in client.predict(api_name="/list_models")] == ["stock"]


def test_every_model_picker_and_the_header_follow_an_addition_and_a_removal(models_app):
    from sdtune.app.ui.blocks import model_status
    from sdtune.app.ui.models_tab import PickerRefresh, base_choices

    service = models_app["service"]
    manager = service.models
    refresh = PickerRefresh(manager, singles=2, status=lambda: model_status(service),
                            bases=[lambda: base_choices(manager)])
    seen = manager.registry.version
    assert all(update.get("__type__") == "update" and len(update) == 1  # gr.skip(): nothing changes
               for update in refresh(seen, "stock", None, ["stock"])[1:])
    manager.add("tuned", "full")
    version, text, remove, compare, base, header = refresh(seen, "stock", None, ["stock"])
    assert version == manager.registry.version
    assert text == {"__type__": "update", "choices": ["stock", "tuned"], "value": "stock"}
    assert remove["value"] is None and compare["value"] == ["stock"] and compare["choices"] == ["stock", "tuned"]
    assert base["choices"] == ["", "stock", "tuned"]
    assert header.startswith("Models: stock, tuned on cpu.")
    manager.remove("stock")
    _, text, _, compare, _, header = refresh(version, "stock", None, ["stock", "tuned"])
    assert text["value"] == "tuned" and compare["value"] == ["tuned"]  # a removed choice falls back to a served one
    assert header.startswith("Models: tuned on cpu.")


@pytest.mark.parametrize("run", ["full", "lora"])
def test_a_runs_checkpoints_are_compare_columns_with_the_same_seeds(tiny_pipeline, runs, tmp_path, run):
    from sdtune.app.compare import compare
    from sdtune.app.service import Service

    service = Service(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), tmp_path / "out",
                      tmp_path, models_root=runs)
    before = service.registry.parameter_bytes()
    assert service.models.run_choices(run) == ["checkpoint-2", "checkpoint-4", "final"]
    *_, last = compare(service, PROMPT, ["stock"], "seed", "2", 5, SETTINGS, run=run,
                       checkpoints=["checkpoint-2", "checkpoint-4", "final"])
    assert last.columns == ["stock", "checkpoint-2", "checkpoint-4", "final"]
    assert last.run["models"] == ["stock", f"{run}-checkpoint-2", f"{run}-checkpoint-4", f"{run}-final"]
    images = {(cell.model, cell.row.seed): cell.image.tobytes() for cell in last.cells}
    assert {cell.row.seed for cell in last.cells} == {5, 6} and not any(cell.error for cell in last.cells)
    for seed in (5, 6):  # the last checkpoint holds the final weights; the first differs from both ends
        assert images[(f"{run}-checkpoint-4", seed)] == images[(f"{run}-final", seed)]
        assert images[(f"{run}-checkpoint-2", seed)] not in (images[(f"{run}-final", seed)], images[("stock", seed)])
    assert service.registry.names == ["stock"] and service.registry.parameter_bytes() == before  # freed after it
    with pytest.raises(SourceError, match=r"checkpoints: \['checkpoint-9'\] are not in the run"):
        next(compare(service, PROMPT, ["stock"], "seed", "1", 5, SETTINGS, run=run, checkpoints=["checkpoint-9"]))
    with pytest.raises(SourceError, match="run: ../x is outside the models root"):
        next(compare(service, PROMPT, ["stock"], "seed", "1", 5, SETTINGS, run="../x", checkpoints=["final"]))


def test_each_model_says_its_base_how_it_was_trained_and_its_trigger_words(tiny_pipeline, runs, tmp_path):
    import json
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    from sdtune.app.ui.handlers import Handlers

    subject = runs / "subject-lora"  # a run that declared its subject's prompt
    if not subject.exists():
        shutil.copytree(runs / "lora", subject, ignore=shutil.ignore_patterns("checkpoint-*"))
        settings = yaml.safe_load((subject / "training_config.yaml").read_text())
        (subject / "training_config.yaml").write_text(yaml.safe_dump({**settings, "instance_prompt": "sks dog"}))
    tags = {"shapes": {"red circle": 3, "white background": 9, "blue square": 1}, "more": {"red circle": 7}}
    save_file(load_file(str(runs / "lora" / "lora.safetensors")), str(runs / "a1111.safetensors"),
              metadata={"ss_network_dim": "4", "ss_tag_frequency": json.dumps(tags), "ss_num_train_images": "24",
                        "ss_sd_model_name": str(tiny_pipeline), "ss_training_started_at": "1700000000"})
    manager = manager_for(tiny_pipeline, runs, tmp_path)
    for name, path in [("step-2", "full/checkpoint-2"), ("lora-2", "lora/checkpoint-2"), ("subject", "subject-lora"),
                       ("a1111", "a1111.safetensors")]:
        manager.add(name, path)
    listing = {entry["name"]: entry for entry in manager.listing()}
    assert "training" not in listing["stock"] and "trigger_words" not in listing["stock"]
    assert listing["step-2"]["base"] == tiny_pipeline.name
    assert listing["step-2"]["training"]["method"] == "full fine-tune"
    assert listing["step-2"]["training"]["steps"] == 2 and listing["step-2"]["training"]["resolution"] == 64
    assert listing["lora-2"]["training"]["method"] == "LoRA rank 4" and listing["lora-2"]["training"]["steps"] == 2
    assert listing["subject"]["trigger_words"] == ["sks dog"] and listing["subject"]["training"]["steps"] == 4
    assert listing["a1111"]["trigger_words"] == ["red circle", "white background", "blue square"]  # summed
    assert listing["a1111"]["training"] == {"method": "LoRA rank 4", "images": "24", "date": "2023-11-14"}
    assert listing["a1111"]["base"] == tiny_pipeline.name

    service = SimpleNamespace(models=manager)
    handlers = Handlers.__new__(Handlers)
    handlers.service = service
    assert handlers.add_trigger_words("subject", "") == "sks dog"
    assert handlers.add_trigger_words("subject", "a dog on a beach") == "sks dog, a dog on a beach"
    assert handlers.add_trigger_words("subject", "sks dog on a beach") == "sks dog on a beach"


def test_a_subject_runs_rare_token_is_its_trigger_word_from_its_folder_or_its_kohya_file_alone(tmp_path):
    """What a DreamBooth run writes (its training_config.yaml; with --lora_rank the kohya file's metadata), written by
    the trainer's own functions from its flags, read as the app reads a served model."""
    import torch
    from safetensors.torch import save_file

    from sdtune.app.model_info import model_info
    from sdtune.training.config import build_parser, save_resolved_config
    from sdtune.training.lora import kohya_metadata

    def subject_run(name, *flags):
        args = build_parser().parse_args(["--pretrained_model_name_or_path", "stock", "--output_dir",
                                          str(tmp_path / name), "--instance_data_dir", "dog", *flags])
        (tmp_path / name).mkdir()
        save_resolved_config(args, tmp_path / name)
        return args

    subject_run("prior", "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
                "--class_data_dir", "dogs", "--class_prompt", "a photo of dog")
    info = model_info(ModelSpec("prior", str(tmp_path / "prior")))
    assert info["trigger_words"] == ["sks"] and info["training"]["instance_prompt"] == "a photo of sks dog"
    subject_run("alone", "--instance_prompt", "a photo of sks dog")  # no class prompt tells the token apart
    assert model_info(ModelSpec("alone", str(tmp_path / "alone")))["trigger_words"] == ["a photo of sks dog"]

    args = subject_run("lora", "--instance_prompt", "zwx, a cat on a sofa", "--with_prior_preservation",
                       "--class_data_dir", "cats", "--class_prompt", "a cat on a sofa", "--lora_rank", "4")
    shared = tmp_path / "shared"  # the kohya file on its own, away from its run's folder (A1111's models/Lora)
    shared.mkdir()
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(shared / "zwx.safetensors"),
              metadata=kohya_metadata(args))
    info = model_info(ModelSpec("zwx", "stock", lora=str(shared / "zwx.safetensors")))
    assert info["trigger_words"] == ["zwx"] and info["training"]["method"] == "LoRA rank 4"
    assert info["base"] == "stock"
