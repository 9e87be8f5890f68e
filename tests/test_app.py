"""The Gradio app through its API, as gradio_client users see it, with tiny models on the CPU."""

import base64
import concurrent.futures
import io
import json
import os
import tempfile
import time
import zipfile
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import png_header_only, within
from PIL import Image, PngImagePlugin

from sdtune.app.flags import parse_app_args
from sdtune.app.launch import check_output_dir
from sdtune.app.service import BatchUpdate, Outcome
from sdtune.app.ui.blocks import model_status
from sdtune.app.ui.controls import StopSignals
from sdtune.app.ui.handlers import Handlers
from sdtune.errors import SdtuneError
from sdtune.generation.core import Interrupted
from sdtune.generation.pnginfo import parse_parameters

T2I = dict(negative_prompt="", scheduler="dpmsolver++", num_inference_steps=4, guidance_scale=7.5, width=64,
           height=64, num_images=1)

NO_STACK = {"headers": ["LoRA", "weight"], "data": []}  # the LoRA stack table a raw API call sends empty


@pytest.fixture
def client(app):
    return Client(app["url"], verbose=False)


def image_file(path, size=(80, 48), colour="red"):
    Image.new("RGB", size, colour).save(path)
    return path


def test_the_named_endpoints_exist(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == \
        {"/text2img", "/img2img", "/random_batch", "/compare", "/png_info", "/add_model", "/remove_model",
         "/list_models"}


def test_text2img_returns_pngs_that_carry_their_parameters(client):
    gallery, seed, run = client.predict(prompt="a red circle", model="tuned", seed=1234, **dict(T2I, num_images=2),
                                        api_name="/text2img")
    assert seed == 1234 and len(gallery) == 2 and run["images"] == 2 and run["peak_ram_mib"] > 0
    for index, item in enumerate(gallery):
        image = Image.open(item["image"])
        assert image.format == "PNG" and image.size == (64, 64)
        parameters = parse_parameters(image.info["parameters"])
        assert parameters["prompt"] == "a red circle"
        assert parameters["Seed"] == str(1234 + index) and parameters["Model"] == "tuned"
        assert parameters["Steps"] == "4" and parameters["Sampler"] == "DPM++ 2M" and parameters["Size"] == "64x64"


def test_text2img_streams_previews_and_ends_with_its_result(client):
    job = client.submit(prompt="a red circle", model="stock", seed=5, **T2I, api_name="/text2img")
    gallery, seed, run = job.result()
    *previews, final = job.outputs()  # 4 steps: previews after steps 1, 2 and 3
    assert len(previews) == 3 and final == (gallery, seed, run) and seed == 5
    assert Image.open(previews[0][0][0]["image"]).size == (64, 64)


def test_text2img_defaults_to_the_first_models_native_size(client):
    # A 64 px model asked for SD's 512 px draws nonsense slowly: width and height default to what it was trained at.
    # API callers may also leave out the negative prompt.
    settings = {k: v for k, v in T2I.items() if k not in ("width", "height", "negative_prompt")}
    gallery, _, _ = client.predict(prompt="a red circle", model="stock", seed=3, **settings, api_name="/text2img")
    assert Image.open(gallery[0]["image"]).size == (64, 64)


def test_random_seed_is_reported_and_reproduces_the_image(client):
    gallery, seed, _ = client.predict(prompt="a blue square", model="stock", seed=-1, **T2I, api_name="/text2img")
    assert 0 <= seed < 2**32
    again, same_seed, _ = client.predict(prompt="a blue square", model="stock", seed=seed, **T2I,
                                         api_name="/text2img")
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"])), np.asarray(Image.open(again[0]["image"])))


def test_img2img_returns_the_input_size(client, tmp_path):
    path, seed, run = client.predict(image=handle_file(image_file(tmp_path / "in.png", (100, 60))), prompt="a cat",
                                     negative_prompt="", model="stock", scheduler="euler_a", num_inference_steps=4,
                                     guidance_scale=7.5, strength=0.5, seed=5, resolution=0, api_name="/img2img")
    image = Image.open(path)
    assert image.size == (100, 60) and seed == 5
    parameters = parse_parameters(image.info["parameters"])
    assert parameters["Denoising strength"] == "0.5" and parameters["Size"] == "64x40"  # the working size


def batch(client, paths, seed, **overrides):
    request = dict(folder="", models=["stock", "tuned"], prompt="", seed=seed, strength=0.6, num_inference_steps=4,
                   guidance_scale=7.5, scheduler="dpmsolver++", resolution=0)
    request.update(overrides)
    return client.predict(images=[handle_file(p) for p in paths], **request, api_name="/random_batch")


def test_random_batch_is_reproducible_from_its_seed(client, tmp_path):
    names = ["a_red_dragon.png", "a_blue_bird.png", "green_frog_02.png", "yellow_star.png", "orange_cat.png"]
    paths = [image_file(tmp_path / n, colour=c) for n, c in zip(names, ["red", "blue", "green", "yellow", "orange"])]
    first_gallery, first_table, archive, run = batch(client, paths, seed=11)
    second_gallery, second_table, _, _ = batch(client, paths, seed=11)
    without_timing = lambda table: [row[:4] + row[5:] for row in table["data"]]  # noqa: E731
    assert without_timing(first_table) == without_timing(second_table)
    assert {row[1] for row in first_table["data"]} == {"stock", "tuned"}  # both models drawn over 5 images
    assert [row[2] for row in first_table["data"]][:3] == ["a red dragon", "a blue bird", "green frog"]
    for a, b in zip(first_gallery, second_gallery):
        assert np.array_equal(np.asarray(Image.open(a["image"])), np.asarray(Image.open(b["image"])))
    with zipfile.ZipFile(archive) as z:
        assert len(z.namelist()) == 5
    assert run["images"] == 5 and run["failed"] == 0 and run["batch_seed"] == 11


def test_a_bad_image_in_a_batch_is_listed_and_the_batch_goes_on(client, tmp_path):
    good = image_file(tmp_path / "good_one.png")
    bad = tmp_path / "broken_one.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    gallery, table, _, run = batch(client, [good, bad], seed=2, models=["stock"])
    errors = {row[0]: row[5] for row in table["data"]}
    assert errors["good_one.png"] == "" and "cannot decode" in errors["broken_one.png"]
    assert len(gallery) == 1 and run["failed"] == 1


def test_batch_reads_folders_under_the_allowed_root_only(client, app, tmp_path):
    (app["allowed"] / "set").mkdir(exist_ok=True)
    image_file(app["allowed"] / "set" / "a_red_circle.png")
    _, table, _, _ = client.predict(images=[], folder="set", models=["stock"], prompt="", seed=0, strength=0.6,
                                    num_inference_steps=4, guidance_scale=7.5, scheduler="dpmsolver++", resolution=0,
                                    api_name="/random_batch")
    assert [row[0] for row in table["data"]] == ["a_red_circle.png"]
    for outside in [str(tmp_path), "../", "set/../../"]:
        with pytest.raises(Exception, match="outside the allowed root"):
            client.predict(images=[], folder=outside, models=["stock"], prompt="", seed=0, strength=0.6,
                           num_inference_steps=4, guidance_scale=7.5, scheduler="dpmsolver++", resolution=0,
                           api_name="/random_batch")


def test_same_named_uploads_each_keep_their_own_output(client, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    paths = [image_file(tmp_path / "one" / "image.png", colour="red"),
             image_file(tmp_path / "two" / "image.png", colour="blue")]
    gallery, table, archive, _ = batch(client, paths, seed=3, models=["stock"])
    rows = table["data"]
    assert [row[0] for row in rows] == ["image.png", "image (2).png"] and [row[2] for row in rows] == ["image"] * 2
    assert rows[0][3] != rows[1][3] and len(gallery) == 2
    first, second = (np.asarray(Image.open(item["image"])) for item in gallery)
    assert not np.array_equal(first, second)  # the red input's edit and the blue one's
    with zipfile.ZipFile(archive) as z:
        assert len(z.namelist()) == 2


def folder_batch(client, folder):
    return client.predict(images=[], folder=folder, models=["stock"], prompt="", seed=0, strength=0.6,
                          num_inference_steps=4, guidance_scale=7.5, scheduler="dpmsolver++", resolution=0,
                          api_name="/random_batch")


def test_a_folder_batch_goes_on_past_a_name_that_is_not_utf8_and_refuses_links_outside(client, app, tmp_path):
    folder = app["allowed"] / "odd"
    folder.mkdir()
    image_file(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    image_file(folder / "z_red_circle.png")
    (folder / "secret.png").symlink_to(image_file(tmp_path / "secret.png"))
    os.mkfifo(folder / "pipe.png")  # reading it would hold the only generation slot for ever
    gallery, table, _, run = within(300, folder_batch, client, "odd")
    errors = {row[0]: row[5] for row in table["data"]}
    assert errors.keys() == {"caf\\xe9.png", "secret.png", "z_red_circle.png", "pipe.png"}
    assert errors["caf\\xe9.png"] == errors["z_red_circle.png"] == "" and "outside" in errors["secret.png"]
    assert "not a regular file" in errors["pipe.png"] and len(gallery) == 2 and run["failed"] == 2


def test_a_folder_name_too_long_is_refused_without_the_servers_path(client, app):
    with pytest.raises(Exception, match="Folder x{300} cannot be read under .*File name too long") as error:
        folder_batch(client, "x" * 300)
    assert "Errno" not in str(error.value) and str(app["allowed"].resolve() / ("x" * 300)) not in str(error.value)


def test_the_app_creates_its_allowed_root(tmp_path, tiny_pipeline, monkeypatch):
    from sdtune.app import launch as app_module

    class Demo:  # stands in for the Gradio app: this test is about what main prepares
        share_url = None

        def queue(self, **kwargs):
            pass

        def launch(self, **kwargs):
            pass

        def block_thread(self):
            pass

    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: stock\n    path: {tiny_pipeline}\n")
    monkeypatch.setattr(app_module, "build_ui", lambda service, jobs=None, captions=None: Demo())
    app_module.serve(parse_app_args(["--models", str(models), "--lazy",
                                     "--allowed-root", str(tmp_path / "data" / "input_images"),
                                     "--output_dir", str(tmp_path / "outputs")]))
    assert (tmp_path / "data" / "input_images").is_dir()


@pytest.mark.parametrize("override, message", [
    # Gradio's sliders check their bounds first; the service checks the same for other callers (batch CLI)
    ({"num_inference_steps": 0}, "at least 1|less than minimum value 1"),
    ({"guidance_scale": -1}, "0 or more|less than minimum value 0"),
    ({"width": 2048}, "from 8 to 1024|greater than maximum value 1024"),
    ({"width": 100}, "width must be a multiple of 8"),
    ({"model": "nope"}, "Unknown model|not in the list of choices"),
    ({"model": "broken"}, "could not be loaded"),
    ({"scheduler": "lms"}, "Unknown scheduler|not in the list of choices"),
])
def test_bad_text2img_requests_get_a_clear_error_and_the_server_stays_up(client, override, message):
    request = dict(prompt="a red circle", model="stock", seed=1, **T2I)
    request.update(override)
    with pytest.raises(Exception, match=message):
        client.predict(**request, api_name="/text2img")
    assert client.predict(prompt="still up", model="stock", seed=1, **T2I, api_name="/text2img")[1] == 1


@pytest.mark.parametrize("strength, message", [(0.0, r"in \(0, 1\]"),
                                               (1.5, r"in \(0, 1\]|greater than maximum value 1"),
                                               (0.1, "no denoising step")])
def test_bad_strength_is_refused(client, tmp_path, strength, message):
    with pytest.raises(Exception, match=message):
        client.predict(image=handle_file(image_file(tmp_path / "in.png")), prompt="x", negative_prompt="",
                       model="stock", scheduler="dpmsolver++", num_inference_steps=4, guidance_scale=7.5,
                       strength=strength, seed=1, resolution=0, api_name="/img2img")


def test_not_an_image_and_a_decompression_bomb_are_refused(client, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(bomb)  # 25 megapixels in a few kilobytes
    for path, message in [(text, "notes.png: cannot decode image: cannot identify image file 'notes.png'"),
                          (bomb, r"bomb.png: image too large \(5000x5000 > 16777216 pixels\)")]:
        with pytest.raises(Exception, match=message) as error:
            client.predict(image=handle_file(path), prompt="x", negative_prompt="", model="stock",
                           scheduler="dpmsolver++", num_inference_steps=4, guidance_scale=7.5, strength=0.5, seed=1,
                           resolution=0, api_name="/img2img")
        assert tempfile.gettempdir() not in str(error.value)  # not the file's path in Gradio's upload folder


def call_api(app, endpoint: str, data: list) -> str:
    """The answer of a call through the HTTP API, as its event stream's text."""
    event = httpx.post(f"{app['url']}gradio_api/call/{endpoint}", json={"data": data}).json()["event_id"]
    return httpx.get(f"{app['url']}gradio_api/call/{endpoint}/{event}", timeout=120).text


def test_a_data_url_is_refused_from_its_header_before_gradio_decodes_it(app, tmp_path, monkeypatch):
    import gradio.image_utils

    decoded = []
    decode = gradio.image_utils.decode_base64_to_image
    monkeypatch.setattr(gradio.image_utils, "decode_base64_to_image", lambda *args: decoded.append(1) or decode(*args))

    def img2img(path):
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        return call_api(app, "img2img", [{"url": url}, "x", "", "stock", "dpmsolver++", 4, 7.5, 0.5, 1, 0, None,
                                             NO_STACK])

    answer = img2img(png_header_only(tmp_path / "huge.png", 13000, 13000))  # 169 megapixels in 80 bytes
    assert "event: error" in answer and r"image too large (13000x13000 > 16777216 pixels)" in answer
    answer = img2img(image_file(tmp_path / "small.png", size=(64, 48)))
    assert "event: complete" in answer and decoded == []  # within the limit: kept as sent, decoded by the service


def test_img2img_takes_only_files_uploaded_to_the_server(app, tmp_path):
    # without "meta", Gradio does not confine a path to its upload folder: gr.Image handed any server image over
    secret = image_file(tmp_path / "secret.png")
    answer = call_api(app, "img2img", [{"path": str(secret)}, "x", "", "stock", "dpmsolver++", 4, 7.5, 0.5, 1, 0,
                                        None, NO_STACK])
    assert "event: error" in answer and "not a file uploaded to this server" in answer


def test_concurrent_users_get_their_own_results(app):
    # requests queue one at a time on the device; each result must carry its own request's parameters
    def request(index):
        client = Client(app["url"], verbose=False)
        model = ["stock", "tuned"][index % 2]
        gallery, seed, _ = client.predict(prompt=f"prompt number {index}", model=model, seed=100 + index,
                                          **T2I, api_name="/text2img")
        return index, model, parse_parameters(Image.open(gallery[0]["image"]).info["parameters"])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for index, model, parameters in pool.map(request, range(6)):
            assert parameters["prompt"] == f"prompt number {index}"
            assert parameters["Seed"] == str(100 + index) and parameters["Model"] == model


def test_runs_are_logged(app, client):
    client.predict(prompt="logged", model="stock", seed=3, **T2I, api_name="/text2img")
    records = [json.loads(line) for line in (app["service"].run_log).read_text().splitlines()]
    assert records[-1]["kind"] == "text2img" and records[-1]["run_id"] and records[-1]["total_seconds"] > 0


def test_only_files_handed_to_a_client_are_served(app, client):
    # another user's run: its PNG, its folder's other files and the run log all live in the output folder
    (gallery, _, run) = client.predict(prompt="someone else's", model="stock", seed=4, **T2I, api_name="/text2img")
    other_run = app["service"].output_dir / run["run_id"]
    mine = Client(app["url"], verbose=False, download_files=False)
    given, _, _ = mine.predict(prompt="mine", model="stock", seed=5, **T2I, api_name="/text2img")
    returned = httpx.get(given[0]["image"]["url"])
    assert returned.status_code == 200 and Image.open(io.BytesIO(returned.content)).size == (64, 64)
    for private in [app["service"].run_log, next(other_run.glob("*.png")), other_run]:
        assert httpx.get(f"{app['url']}gradio_api/file={private}").status_code == 403, private
    # what is served sits under a name derived from a server secret and the file's bytes, not its run or seed
    url = given[0]["image"]["url"]
    assert run["run_id"] not in url and str(app["service"].output_dir) not in url


class FakeService:
    """Stands in for the service to show which stop flag a handler passes on."""

    def text2img(self, prompt, model, seed, num_images, settings, stop, lora_scale, preview):
        if stop.is_set():
            raise Interrupted("Generation stopped.")
        return Outcome([], [seed], {})

    def random_batch(self, items, models, prompt, seed, settings, resolution, stop, preview):
        yield BatchUpdate(0, len(items), [], run={"stopped": stop.is_set()})


def test_stop_pressed_while_a_request_waits_is_kept_for_it_and_flags_are_dropped():
    handlers = Handlers(FakeService())
    waiting, other = SimpleNamespace(session_hash="waiting"), SimpleNamespace(session_hash="other")
    for session in (waiting, other):
        handlers.stops.arm(session)  # the click, before the request queues
    handlers.stops.stop(waiting)  # Stop while it waits in the queue
    with pytest.raises(gr.Error, match="stopped"):
        list(handlers.text2img("x", "", "stock", "dpmsolver++", 4, 7.5, 64, 64, 1, 1, waiting))
    assert list(handlers.text2img("x", "", "stock", "dpmsolver++", 4, 7.5, 64, 64, 1, 1, other))[-1][1] == 1
    handlers.stops.arm(waiting)
    handlers.stops.stop(waiting)
    updates = list(handlers.random_batch([], "", ["stock"], "", 0, 0.6, 4, 7.5, "dpmsolver++", 0, waiting,
                                         progress=lambda *args, **kwargs: None))
    assert updates[-1][3] == {"stopped": True}  # a queued batch is stopped too
    assert len(handlers.stops) == 0  # every request's flag went with it


def test_stop_flags_of_requests_that_never_ran_are_bounded():
    stops = StopSignals(limit=10)
    for index in range(100):
        stops.arm(SimpleNamespace(session_hash=f"session-{index}"))  # each cancelled in the queue
    assert len(stops) == 10


@pytest.mark.parametrize("override, message", [
    ({"seed": 2**32}, "seed must be a whole number from 0 to 4294967295"),
    ({"seed": -2}, "seed must be a whole number from 0 to 4294967295"),
    ({"width": 1024, "height": 1024, "num_inference_steps": 100, "num_images": 8}, "allows 8 per request"),
    ({"seed": 1.5}, r"seed must be a whole number, not 1\.5"),  # gr.Number(precision=0) made it 2
    ({"num_images": 2.7}, r"num_images must be a whole number, not 2\.7"),  # int() made it 2
])
def test_seeds_out_of_range_and_costly_requests_are_refused(client, override, message):
    request = dict(prompt="a red circle", model="stock", seed=1, **T2I)
    request.update(override)
    with pytest.raises(Exception, match=message):
        client.predict(**request, api_name="/text2img")


def test_nan_guidance_is_refused(app):
    # gradio_client refuses to send NaN, but the HTTP API parses it (Python's json does) and the slider passes it
    body = ('{"data": ["a red circle", "", "stock", "dpmsolver++", 4, NaN, 64, 64, 1, 1, null, '
            '{"headers": ["LoRA", "weight"], "data": []}]}')
    event = httpx.post(f"{app['url']}gradio_api/call/text2img", content=body,
                       headers={"Content-Type": "application/json"}).json()["event_id"]
    answer = httpx.get(f"{app['url']}gradio_api/call/text2img/{event}", timeout=120).text
    assert "event: error" in answer and "guidance_scale must be a finite number" in answer


def test_img2img_refuses_a_seed_beyond_64_bits(client, tmp_path):
    with pytest.raises(Exception, match="seed must be a whole number"):
        client.predict(image=handle_file(image_file(tmp_path / "in.png")), prompt="x", negative_prompt="",
                       model="stock", scheduler="dpmsolver++", num_inference_steps=4, guidance_scale=7.5,
                       strength=0.5, seed=2**64, resolution=0, api_name="/img2img")


def test_an_output_folder_gradio_cannot_hand_out_from_is_refused_at_start(tmp_path):
    check_output_dir(tmp_path / "outputs")  # under the temp folder: Gradio copies returned files from there
    with pytest.raises(SdtuneError, match="inside the working directory"):
        check_output_dir("/var/lib/sdtune-outputs")


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(item["image"] if isinstance(item, dict) else item))


def png_parameters(item) -> dict:
    return parse_parameters(Image.open(item["image"] if isinstance(item, dict) else item).info["parameters"])


def test_lora_scale_is_an_optional_parameter_of_the_api_and_at_0_gives_the_stock_image(client, tmp_path):
    request = dict(prompt="a red circle", seed=8, **T2I, api_name="/text2img")
    (stock,), _, _ = client.predict(model="stock", **request)
    (off,), _, off_run = client.predict(model="lora", lora_scale=0, **request)
    (listed,), _, listed_run = client.predict(model="lora", **request)  # left out: the listed scale, 0.5
    assert np.array_equal(pixels(off), pixels(stock)) and not np.array_equal(pixels(listed), pixels(stock))
    assert (off_run["lora_scale"], listed_run["lora_scale"]) == (0, 0.5)
    assert png_parameters(listed)["LoRA scale"] == "0.5" and "LoRA scale" not in png_parameters(stock)
    path, _, run = client.predict(image=handle_file(image_file(tmp_path / "in.png")), prompt="x", negative_prompt="",
                                  model="lora", scheduler="dpmsolver++", num_inference_steps=4, guidance_scale=7.5,
                                  strength=0.5, seed=1, resolution=0, lora_scale=-1.25, api_name="/img2img")
    assert png_parameters(path)["LoRA scale"] == "-1.25" and run["lora_scale"] == -1.25


def test_a_random_batch_draws_each_lora_model_at_its_listed_scale(client, tmp_path):
    gallery, _, _, run = batch(client, [image_file(tmp_path / "a_red_circle.png")], seed=1, models=["lora"])
    assert png_parameters(gallery[0])["LoRA scale"] == "0.5" and run["lora_scales"] == {"lora": 0.5}


def test_bad_lora_scales_are_refused_and_the_server_stays_up(app, client):
    request = dict(prompt="a red circle", seed=1, **T2I, api_name="/text2img")
    for model, scale, message in [("lora", 2.5, "lora_scale must be a number from -2 to 2"),
                                  ("lora", -3, "lora_scale must be a number from -2 to 2"),
                                  ("stock", 1, "'stock' has no adapter")]:
        with pytest.raises(Exception, match=message):
            client.predict(model=model, lora_scale=scale, **request)
    for scale in ["NaN", "Infinity"]:  # gradio_client cannot send these; the HTTP API parses them
        body = (f'{{"data": ["a red circle", "", "lora", "dpmsolver++", 4, 7.5, 64, 64, 1, 1, {scale}, '
                '{"headers": ["LoRA", "weight"], "data": []}]}')
        event = httpx.post(f"{app['url']}gradio_api/call/text2img", content=body,
                           headers={"Content-Type": "application/json"}).json()["event_id"]
        answer = httpx.get(f"{app['url']}gradio_api/call/text2img/{event}", timeout=120).text
        assert "event: error" in answer and "lora_scale must be a number from -2 to 2" in answer
    assert client.predict(model="lora", lora_scale=2, **request)[1] == 1


def test_the_lora_scale_control_follows_the_chosen_model(app):
    demo = app["demo"]
    followers = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "lora_scale_field"]
    assert len(followers) == 2  # text to image and image to image
    for follower in followers:
        model = follower.inputs[0]
        targets = {tuple(target) for target in follower.targets}
        # at page load (Gradio names the page by an id of its own, not always the Blocks') and on each change
        assert "load" in {event for _, event in targets} and (model._id, "change") in targets
        assert follower.outputs[0].label == "LoRA scale"
        lora, stock = follower.fn("lora"), follower.fn("stock")
        assert (lora["visible"], lora["value"]) == (True, 0.5) and "0 gives the base model's image" in lora["info"]
        assert (stock["visible"], stock["value"]) == (False, None)


def test_the_model_list_names_each_loras_base_and_scale_and_a_broken_adapter_leaves_the_others_serving(
        app, client, tiny_pipeline):
    status = model_status(app["service"])
    assert "**lora** is a LoRA on `stock`, at scale 0.5" in status  # its base by its served name
    assert str(tiny_pipeline) not in status  # never a server path
    assert "**bad-lora failed to load** and is unavailable" in status
    with pytest.raises(Exception, match="'bad-lora' could not be loaded"):
        client.predict(prompt="x", model="bad-lora", seed=1, **T2I, api_name="/text2img")
    for model in ["lora", "stock"]:
        assert client.predict(prompt="x", model=model, seed=1, **T2I, api_name="/text2img")[1] == 1


COMPARE = dict(prompt="a red circle", negative_prompt="", axis="seed", values="1", seed=3, scheduler="dpmsolver++",
               num_inference_steps=2, guidance_scale=7.5, width=64, height=64, api_name="/compare")


def test_compare_gives_text2imgs_images_a_grid_and_a_failed_cell_for_a_broken_model(client):
    grid, cells, download, run = client.predict(**dict(COMPARE, models=["stock", "tuned", "bad-lora"]))
    assert [cell["caption"] for cell in cells] == ["stock, Seed 3", "tuned, Seed 3"]
    (stock,), _, _ = client.predict(prompt="a red circle", model="stock", seed=3, **dict(T2I, num_inference_steps=2),
                                    api_name="/text2img")
    assert np.array_equal(pixels(cells[0]), pixels(stock)) and png_parameters(cells[0]) == png_parameters(stock)
    assert pixels(grid).shape == pixels(download).shape and png_parameters(download)["X Values"] == \
        "stock, tuned, bad-lora"
    assert run["kind"] == "compare" and [cell["model"] for cell in run["failed_cells"]] == ["bad-lora"]


def test_compare_streams_its_cells_and_writes_one_grid_png_whatever_its_rows(app, client):
    from pathlib import Path

    from sdtune.app.compare_grid import label_font, layout

    cache = Path(app["demo"].GRADIO_CACHE)
    before = set(cache.rglob("*.png"))
    job = client.submit(**dict(COMPARE, models=["stock"], values="4", prompt="a blue square"))
    job.result()
    *streamed, (grid, cells, download, run) = job.outputs()
    assert [len(update[1]) for update in streamed] == [1, 2, 3, 4] and run["images"] == 4  # a cell at a time
    written = [Image.open(path).size for path in set(cache.rglob("*.png")) - before]
    grids = [size for size in written if size != (64, 64)]
    assert 1 <= len(grids) <= 2 and len(written) <= 4 + 2  # the cells at most once each, the grid as the image and
    # the download (one or two copies, as the two land; before: once more after every row)
    boxes = layout((64, 64), ["stock"], [f"Seed {seed}" for seed in range(3, 7)], label_font((64, 64)))
    assert pixels(grid).shape[1::-1] == boxes.size and np.array_equal(pixels(grid), pixels(download))
    for row, cell in enumerate(cells):
        left, top, right, bottom = boxes.box(row, 0)
        assert np.array_equal(pixels(grid)[top:bottom, left:right], pixels(cell)[..., :3])


def test_bad_comparisons_get_a_clear_error_and_the_server_stays_up(client):
    for override, message in [({"models": []}, "models: none chosen"),
                              ({"axis": "guidance_scale", "values": "1, x"}, "values: 'x' is not a number"),
                              ({"values": "40", "models": ["stock", "tuned"]}, "at most 64"),
                              ({"values": ""}, "values: empty"),
                              ({"axis": "guidance_scale", "values": "1, 1e308"}, "0 or more and at most 20")]:
        request = dict(COMPARE, models=["stock"])
        request.update(override)
        with pytest.raises(Exception, match=message):
            client.predict(**request)
    assert client.predict(**dict(COMPARE, models=["stock"]))[3]["images"] == 1


def png_info(client, path):
    return client.predict(image=handle_file(path), api_name="/png_info")


def test_png_info_reads_a_generated_png_and_send_to_fills_the_forms(app, client):
    from sdtune.generation.core import GenerationSettings

    settings = GenerationSettings(num_inference_steps=2, guidance_scale=6.5, width=64, height=64,
                                  negative_prompt="blurry, grey", scheduler="euler_a")
    outcome = app["service"].text2img("a red circle, big", "lora", 31, 1, settings, lora_scale=-0.5)
    _, raw, values, notes = png_info(client, outcome.paths[0])
    assert raw.startswith("a red circle, big\nNegative prompt: blurry, grey\n") and notes == ""
    assert values == dict(prompt="a red circle, big", negative_prompt="blurry, grey", model="lora",
                          scheduler="euler_a", num_inference_steps=2, guidance_scale=6.5, seed=31, width=64,
                          height=64, lora_scale=-0.5)
    senders = {fn.outputs[-2].label: fn.fn.__self__ for fn in app["demo"].fns.values()
               if getattr(fn.fn, "__name__", "") == "from_png"}
    text_form = senders["Height"].form.filled()  # text to image's sender: its last filled control is the height
    text = dict(zip(text_form, senders["Height"].from_png(str(outcome.paths[0]), "lora")))
    assert {name: text[name] for name in values} == values and text["lora_scale"] == -0.5
    image = senders["Input image"].from_png(str(outcome.paths[0]), "stock")  # another model: its listed scale
    assert image[-2] == str(outcome.paths[0]) and image[-1].selected == "img2img"
    assert dict(zip(senders["Input image"].form.filled(), image))["lora_scale"] == gr.skip()


def test_png_info_bad_input_gets_a_clear_message_and_the_app_keeps_answering(client, tmp_path):
    bare = image_file(tmp_path / "bare.png")
    garbage = tmp_path / "garbage.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "\x00\x01 not parameters")
    Image.new("RGB", (8, 8)).save(garbage, pnginfo=info)
    elsewhere = tmp_path / "elsewhere.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: abc, Sampler: Euler a, Model: sd_xl_base_1.0, Size: 12")
    Image.new("RGB", (8, 8)).save(elsewhere, pnginfo=info)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, messages in [(bare, ["no generation parameters"]), (garbage, ["No settings line"]),
                           (elsewhere, ["Steps: 'abc' not applied", "Model 'sd_xl_base_1.0' is not served here",
                                        "Size: '12' not applied"]),
                           (text, ["notes.png cannot be read as an image: cannot decode image: cannot identify "
                                   "image file 'notes.png'"]),
                           (png_header_only(tmp_path / "huge.png", 30000, 30000),  # 900 megapixels, 70 bytes
                            ["huge.png cannot be read as an image: image too large (more than 67108864 pixels)"])]:
        _, _, values, notes = png_info(client, path)
        assert all(message in notes for message in messages), notes
        assert tempfile.gettempdir() not in notes and "DOS" not in notes
        assert "model" not in values and "num_inference_steps" not in values
    assert png_info(client, elsewhere)[2]["scheduler"] == "euler_a"  # still answering, and the rest applied


def test_a_megabyte_of_parameters_is_answered_at_once_while_the_app_serves_another_request(app, client, tmp_path):
    # the A1111 field pattern took 8 s on 40 KB, holding the interpreter: every other request waited
    big = tmp_path / "big.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a " * 500_000)  # 1 MB, just under Pillow's limit on one text chunk
    Image.new("RGB", (8, 8)).save(big, pnginfo=info)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        answer = pool.submit(png_info, client, big)
        other = httpx.get(f"{app['url']}gradio_api/info", timeout=60)
        other_seconds = time.perf_counter() - start
        _, raw, values, notes = answer.result(timeout=60)
        seconds = time.perf_counter() - start
    assert other.status_code == 200 and other_seconds < 1.0 and seconds < 1.0, (other_seconds, seconds)
    assert values == {} and "1,000,000 characters long, more than the 65,536 this reads" in notes
    assert raw == "a " * 32768  # the start of it, for the eye


def test_the_history_keeps_the_newest_images_first_and_restores_their_settings(app):
    from sdtune.app.ui.recall_tab import HISTORY_SIZE, remember
    from sdtune.generation.core import GenerationSettings

    settings = GenerationSettings(num_inference_steps=1, width=32, height=32)
    paths = [str(p) for p in app["service"].text2img("history", "stock", 40, 2, settings).paths]
    history, shown_history, shown = remember([(p, None) for p in paths], [("older.png", "older")] * HISTORY_SIZE)
    assert [path for path, _ in history[:3]] == [*paths, "older.png"] and len(history) == HISTORY_SIZE
    assert history == shown_history and shown == 0 and history[1][1] == "stock, seed 41: history"
    restore = next(fn.fn for fn in app["demo"].fns.values() if getattr(fn.fn, "__name__", "") == "from_history")
    updates = dict(zip(restore.__self__.form.filled(), restore(history, "stock", SimpleNamespace(index=1))))
    assert (updates["seed"], updates["prompt"]) == (41, "history")
    assert updates["width"] == gr.skip()  # 32 px is below the form's range: it keeps its width
