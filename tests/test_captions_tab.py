"""The Captions tab (gradio_app.py --train), its handlers driven as functions: a folder's captions loaded, edited and
saved in its own format, find-and-replace, the trigger word, Caption on the tiny world's CLIP, and the roots kept."""

import json
import random

import gradio as gr
import pytest
from helpers import REPO
from PIL import Image

from sdtune.app.captions import CaptionFolders
from sdtune.app.ui.captions_tab import CaptionsHandler, captions_tab
from tinyworld.creatures import SPECIES, random_creature

CANDIDATES = (REPO / "configs" / "tiny_caption_candidates.txt").read_text()


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    return root


def handler(root, models_root=REPO) -> CaptionsHandler:
    return CaptionsHandler(CaptionFolders(root, models_root, "cpu", data_root_shown="data",
                                          models_root_shown="models"))


def creatures(folder, count: int) -> dict[str, str]:
    """`count` creature PNGs (every species in turn, on white or black); their true captions by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, truth = random.Random(0), {}
    for index in range(count):
        image, caption = random_creature(rng, SPECIES[index % len(SPECIES)], ("white", "black")[index % 2])
        image.save(folder / f"{index:02d}.png")
        truth[f"{index:02d}.png"] = caption
    return truth


def kohya_folder(root) -> None:
    """data/10_sks/: 00.png with a caption file, 01.png without, and a thumbnail-sized 02.png captioned."""
    folder = root / "10_sks"
    creatures(folder, 2)
    Image.new("RGB", (300, 200), "red").save(folder / "02.png")
    (folder / "00.txt").write_text("a red creature\n")
    (folder / "02.txt").write_text("a red square")


def data(table) -> list[list[str]]:
    return table["data"]


def test_a_kohya_folder_is_loaded_edited_saved_and_read_back(root):
    kohya_folder(root)
    tab = handler(root)
    assert tab.caption_folders() == ["10_sks"]
    table, thumbnails, note = tab.load_captions("10_sks")
    assert data(table) == [["00.png", "a red creature"], ["01.png", ""], ["02.png", "a red square"]]
    assert [name for _, name in thumbnails] == ["00.png", "01.png", "02.png"]
    assert max(thumbnails[2][0].size) == 128  # a thumbnail, not the 300 px image
    assert "3 images in data/10_sks (.txt caption files), 1 without a caption" in note
    edited = [["00.png", "a blue creature"], ["01.png", "a green creature"], ["02.png", "a red square"]]
    written_before = (root / "10_sks" / "02.txt").stat().st_mtime_ns
    assert tab.save_captions("10_sks", {"headers": ["file", "caption"], "data": edited}) == \
        "Saved 2 changed captions to .txt caption files in data/10_sks."
    assert (root / "10_sks" / "00.txt").read_text() == "a blue creature"
    assert (root / "10_sks" / "01.txt").read_text() == "a green creature"
    assert (root / "10_sks" / "02.txt").stat().st_mtime_ns == written_before  # unchanged: not rewritten
    assert data(tab.load_captions("10_sks")[0]) == edited


def test_a_metadata_folder_is_saved_to_its_metadata_jsonl(root):
    folder = root / "set"
    creatures(folder, 3)
    rows = [{"file_name": "00.png", "text": "old", "score": 7}, {"file_name": "01.png", "text": ["one", "two"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tab = handler(root)
    table, _, note = tab.load_captions("set")
    assert data(table) == [["00.png", "old"], ["01.png", '["one", "two"]'], ["02.png", ""]]
    assert "(metadata.jsonl)" in note
    edited = [["00.png", "new"], ["01.png", '["one", "three"]'], ["02.png", "third"]]
    tab.save_captions("set", edited)
    saved = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert saved == [{"file_name": "00.png", "text": "new", "score": 7}, {"file_name": "01.png",
                     "text": ["one", "three"]}, {"file_name": "02.png", "text": "third"}]
    assert not list(folder.glob("*.txt"))  # the folder's own format only


def test_find_and_replace_and_the_trigger_word_put_once(root):
    tab = handler(root)
    table = [["a.png", "a red dog on a red sofa"], ["b.png", "sks dog, a red dog"], ["c.png", ""],
             ["d.png", '["a red cat", "sks dog"]'], ["e.png", "sks doggy"]]
    replaced, note = tab.find_replace(table, "red", "blue")
    assert data(replaced)[0] == ["a.png", "a blue dog on a blue sofa"] and note.startswith("Replaced in 3 captions")
    triggered, note = tab.add_trigger(data(replaced), "sks dog, ")
    assert data(triggered) == [["a.png", "sks dog, a blue dog on a blue sofa"], ["b.png", "sks dog, a blue dog"],
                               ["c.png", ""], ["d.png", '["sks dog, a blue cat", "sks dog"]'],
                               ["e.png", "sks dog, sks doggy"]]
    assert note.startswith("Trigger word put before 3 captions")
    again, note = tab.add_trigger(data(triggered), "sks dog")
    assert data(again) == data(triggered) and note.startswith("Trigger word put before 0 captions")
    with pytest.raises(gr.Error, match="Find is empty"):
        tab.find_replace(table, "", "x")


def test_caption_fills_only_the_missing_with_the_tiny_worlds_clip(root):
    truth = creatures(root / "creatures", 6)
    (root / "creatures" / "01.txt").write_text("mine, kept")
    tab = handler(root)
    table, _, _ = tab.load_captions("creatures")
    rows = data(table)
    rows[2][1] = "typed, not saved yet"
    filled, note = tab.caption_missing("creatures", rows, "clip", "tinyworld/clip", CANDIDATES)
    captions = dict(data(filled))
    assert captions["01.png"] == "mine, kept" and captions["02.png"] == "typed, not saved yet"
    new = {name: captions[name] for name in ("00.png", "03.png", "04.png", "05.png")}
    assert sum(caption == truth[name] for name, caption in new.items()) >= 3  # the tiny CLIP knows its world
    assert note.startswith("Captioned 4,")
    assert not (root / "creatures" / "00.txt").exists()  # nothing written before Save
    tab.save_captions("creatures", data(filled))
    assert (root / "creatures" / "00.txt").read_text() == captions["00.png"]
    again, note = tab.caption_missing("creatures", data(filled), "clip", "tinyworld/clip", CANDIDATES)
    assert data(again) == data(filled) and note.startswith("Every image has a caption")


def test_folders_files_and_models_outside_their_roots_are_refused_without_server_paths(root, tmp_path):
    kohya_folder(root)
    outside = tmp_path / "outside"
    creatures(outside, 1)
    (root / "link").symlink_to(outside)
    tab = handler(root)
    for folder in ("..", str(outside), "link", "10_sks/../../outside"):
        with pytest.raises(gr.Error, match="outside the data root data") as refused:
            tab.load_captions(folder)
        assert str(tmp_path) not in str(refused.value)
    with pytest.raises(gr.Error, match="does not exist under the data root data"):
        tab.load_captions("missing")
    with pytest.raises(gr.Error, match="not one of the images of data/10_sks"):
        tab.save_captions("10_sks", [["../../outside/00.png", "x"]])
    assert not (tmp_path / "outside" / "00.txt").exists()
    with pytest.raises(gr.Error, match="outside the models root models") as refused:
        tab.caption_missing("10_sks", [["01.png", ""]], "clip", str(outside), CANDIDATES)
    assert str(tmp_path) not in str(refused.value)
    with pytest.raises(gr.Error, match="neither a folder under the models root models nor a hub name"):
        tab.caption_missing("10_sks", [["01.png", ""]], "blip", "../x y")


def test_a_folder_that_refuses_writes_is_named_by_its_place_under_the_data_root(root, monkeypatch):
    kohya_folder(root)

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("sdtune.caption.store.os.replace", refuse)  # as a read-only folder does (root ignores modes)
    with pytest.raises(gr.Error, match=r"Cannot write 01.txt in data/10_sks: Permission denied") as refused:
        handler(root).save_captions("10_sks", [["01.png", "a caption"]])
    assert str(root) not in str(refused.value) and not (root / "10_sks" / "01.txt").exists()


def test_the_tab_builds_and_lists_its_endpoints(root):
    kohya_folder(root)
    with gr.Blocks() as demo:
        captions_tab(CaptionFolders(root, REPO, "cpu", data_root_shown="data"))
    endpoints = {dependency.get("api_name") for dependency in demo.config["dependencies"]}
    assert {"load_captions", "save_captions", "caption_missing", "caption_folders"} <= endpoints
