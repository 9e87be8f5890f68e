"""The Captions tab's work, without Gradio: the folders under the data root, a folder's images with their captions
(read and saved in the folder's own format by sdtune/caption's stores), edits across all of them (find and replace,
a trigger word), and the missing captions written by sdtune/caption's captioners.

Everything a browser names is confined: folders under the data root, captioner models under the models root or a hub
name, file names among the folder's own images. Messages show the roots by the names they were given, never the
server's paths.
"""

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from sdtune.caption.candidates import candidates_from_lines
from sdtune.caption.run import CaptionSummary, decode_batch
from sdtune.caption.spec import CAPTIONERS, DEFAULT_MODELS, CaptionerSpec
from sdtune.caption.store import MetadataCaptions, caption_store
from sdtune.data.captions import CaptionFileError, is_caption_file_folder, metadata_file
from sdtune.data.folders import IMAGE_SUFFIXES, InputImage, list_images, printable
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.errors import SdtuneError
from sdtune.jobs.recipe import HUB_NAME

MAX_LISTED = 500  # images a folder shows: each is a thumbnail decoded on load and a table row in the page
MAX_FOLDERS = 200  # folders the picker lists
FOLDER_DEPTH = 4  # how deep under the data root the picker looks (data/tinyworld/pokemon/train is 3)
THUMBNAIL_SIDE = 128
MAX_CANDIDATES = 5000  # clip candidates a request may ask for: each is a text embedding on the server's device
MAX_CAPTION_CHARS = 2000  # a caption, a find or a replace text, a trigger word: far beyond what CLIP's 77 tokens read
BATCH_SIZE = 8  # images per captioner call, the command line's default
LIST_PREFIX = "["  # a metadata.jsonl caption that is a list of captions is shown as its JSON


class CaptionRequestError(SdtuneError):
    """A request of the Captions tab that cannot be done as asked; the message says why and what to do."""


@dataclass
class FolderListing:
    """A folder's images as the tab shows them: [file, caption] rows, thumbnails in the same order, and a note."""

    rows: list[list[str]]
    thumbnails: list[tuple]
    note: str


class CaptionFolders:
    """The caption folders under one data root, and the captioner (the last one loaded is kept for the next click)."""

    def __init__(self, data_root, models_root, device: str, data_root_shown: str | None = None,
                 models_root_shown: str | None = None):
        self.root, self.models_root = Path(data_root).resolve(), Path(models_root).resolve()
        self.root_shown = data_root_shown or str(data_root)
        self.models_root_shown = models_root_shown or str(models_root)
        self.device = device
        self._captioner, self._lock = (None, None), threading.Lock()

    # -- folders ---------------------------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        """The folders under the data root that hold images directly, by relative path, at most MAX_FOLDERS."""
        found = []
        for directory in sorted(self._walk(self.root, FOLDER_DEPTH)):
            if any(entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file() for entry in directory.iterdir()):
                found.append(directory.relative_to(self.root).as_posix() or ".")
            if len(found) == MAX_FOLDERS:
                break
        return found

    def _walk(self, folder: Path, depth: int):
        """`folder` and the folders under it, `depth` levels down; hidden ones, links and unreadable ones left out."""
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        yield folder
        if depth == 0:
            return
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
                yield from self._walk(entry, depth - 1)

    def resolve(self, folder: str) -> Path:
        """`folder` (relative to the data root) resolved; refused outside the root or when it is no folder."""
        given = str(folder or "").strip()
        if not given:
            raise CaptionRequestError(f"Pick a folder under the data root {self.root_shown}.")
        shown = printable(Path(given).name if Path(given).is_absolute() else given)
        resolved = (self.root / given).resolve()  # an absolute `given` replaces the root; links are followed
        if not resolved.is_relative_to(self.root):
            raise CaptionRequestError(f"Folder {shown} is outside the data root {self.root_shown}.")
        if not resolved.is_dir():
            raise CaptionRequestError(f"Folder {shown} does not exist under the data root {self.root_shown}.")
        return resolved

    def folder_format(self, folder: Path) -> str:
        """The folder's own caption format: its metadata.jsonl, else kohya's .txt files (also for a folder with no
        caption yet: the layout most training sets are shared in, and the trainer reads it)."""
        metadata = metadata_file(folder)
        if metadata is not None and metadata.name != "metadata.jsonl":
            raise CaptionRequestError(f"{self._shown(folder)} keeps its captions in {metadata.name}: convert it to "
                                      "metadata.jsonl to edit them here.")
        if metadata is None and not is_caption_file_folder(folder):
            raise CaptionRequestError(f"{self._shown(folder)} has a metadata file in a subfolder, which the "
                                      "trainer would read instead of .txt files: open that subfolder.")
        return "jsonl" if metadata is not None else "txt"

    def _images(self, folder: Path) -> list[InputImage]:
        return [image for image in list_images(folder, root=self.root) if not image.error][:MAX_LISTED]

    def _shown(self, path: Path) -> str:
        relative = path.relative_to(self.root).as_posix()
        return f"{self.root_shown}/{relative}" if relative != "." else self.root_shown

    def _store(self, folder: Path):
        try:
            return caption_store(folder, self.folder_format(folder))
        except CaptionRequestError:
            raise
        except SdtuneError as error:  # a broken metadata.jsonl line, named by number
            raise CaptionRequestError(self.hide_roots(str(error))) from error

    def hide_roots(self, message: str) -> str:
        """A message with the roots' server paths replaced by the names they were given."""
        return message.replace(str(self.root), self.root_shown).replace(str(self.models_root), self.models_root_shown)

    # -- load and save ---------------------------------------------------------------------------------------------
    def load(self, folder: str) -> FolderListing:
        """The folder's images (the first MAX_LISTED) with their captions and thumbnails; images that cannot be
        decoded and caption files that are not UTF-8 are left out and named in the note."""
        path = self.resolve(folder)
        store, images = self._store(path), list_images(path, root=self.root)
        rows, thumbnails, summary = [], [], CaptionSummary()
        for image in images[:MAX_LISTED]:
            if image.error:
                summary.skip("refused (a link outside the data root)", image.key)
                continue
            try:
                caption = store.existing(image.key)
                thumbnails.append((thumbnail(image.path), image.key))
            except CaptionFileError:
                summary.skip("caption file not UTF-8 (save it as UTF-8)", image.key)
                continue
            except (BadImageError, OSError):
                summary.skip("undecodable image", image.key)
                continue
            rows.append([image.key, to_cell(caption)])
        missing = sum(not caption.strip() for _, caption in rows)
        lines = [f"{len(rows)} images in {self._shown(path)} ({store_name(store)}), {missing} without a caption."]
        if len(images) > MAX_LISTED:
            lines.append(f"Only the first {MAX_LISTED} of its {len(images)} images are shown; caption the rest with "
                         "python -m sdtune.caption.")
        if summary.skipped:
            lines.append("Left out: " + summary.text().split("\n", 1)[1].strip())
        return FolderListing(rows, thumbnails, "\n\n".join(lines))

    def save(self, folder: str, rows) -> str:
        """Write the rows' captions that differ from the folder's, in its format, each file replaced whole. Empty
        captions are not written (an image keeps the caption it had)."""
        path = self.resolve(folder)
        store = self._store(path)
        captions = self._checked_rows(path, rows)
        changed, kept = {}, []
        for key, cell in captions.items():
            caption = from_cell(cell)
            if isinstance(caption, list) and not isinstance(store, MetadataCaptions):
                caption = " ".join(cell.split())  # a .txt file holds one caption
            try:
                if caption and caption != store.existing(key):
                    changed[key] = caption
            except CaptionFileError:
                kept.append(printable(key))  # not UTF-8: what the user wrote there is not overwritten
        if changed:
            try:
                store.write(changed)
            except SdtuneError as error:  # a read-only folder: its message names the server's folder
                raise CaptionRequestError(self.hide_roots(str(error))) from error
        empty = sum(not from_cell(cell) for cell in captions.values())
        return (f"Saved {len(changed)} changed captions to {store_name(store)} in {self._shown(path)}"
                + f"; {empty} empty ones not written" * bool(empty)
                + f"; {len(kept)} caption files that are not UTF-8 left as they are ({', '.join(kept[:3])})"
                * bool(kept) + ".")

    def _checked_rows(self, folder: Path, rows) -> dict[str, str]:
        """The table's {file: caption}, every file one of the folder's listed images (a request cannot name others)."""
        listed = {image.key for image in self._images(folder)}
        captions = {}
        for row in rows or []:
            if len(row) != 2:
                raise CaptionRequestError("Each row of the table is [file, caption].")
            key, cell = str(row[0]), "" if row[1] is None else str(row[1])
            if key not in listed:
                raise CaptionRequestError(f"{printable(key)} is not one of the images of {self._shown(folder)}: "
                                          "load the folder again.")
            check_length(cell, f"The caption of {printable(key)}")
            captions[key] = cell
        return captions

    # -- captioning ------------------------------------------------------------------------------------------------
    def caption_missing(self, folder: str, rows, captioner: str, model: str = "", candidates: str = "",
                        batch_size: int = BATCH_SIZE) -> tuple[list[list[str]], str]:
        """The rows with the empty captions written by the captioner (not saved: Save writes them); the others
        untouched."""
        path = self.resolve(folder)
        captions = self._checked_rows(path, rows)
        todo = [image for image in self._images(path) if image.key in captions and not captions[image.key].strip()]
        if not todo:
            return [[key, cell] for key, cell in captions.items()], "Every image has a caption: nothing to caption."
        spec = self.spec(captioner, model, candidates)
        summary, written = CaptionSummary(), {}
        with self._lock:  # one captioner call at a time: a second click waits rather than loading a second model
            loaded = self._loaded(spec)
            for start in range(0, len(todo), batch_size):
                keys, pictures = decode_batch(todo[start:start + batch_size], summary)
                for key, caption in zip(keys, loaded.caption(pictures) if pictures else []):
                    if caption.strip():
                        written[key] = caption.strip()
                    else:
                        summary.skip("empty caption from the captioner", key)
        summary.captioned = len(written)
        rows = [[key, written.get(key, cell)] for key, cell in captions.items()]
        return rows, summary.text() + "\n\nSave writes them to the folder."

    def spec(self, captioner: str, model: str = "", candidates: str = "") -> CaptionerSpec:
        """The captioner a request asks for; its model a hub name or a folder under the models root."""
        if captioner not in CAPTIONERS:
            raise CaptionRequestError(f"captioner must be one of {', '.join(CAPTIONERS)}, not {captioner!r}.")
        texts = ()
        if captioner == "clip":
            check_length(candidates or "", "The candidates", MAX_CAPTION_CHARS * MAX_CANDIDATES)
            texts = tuple(candidates_from_lines(str(candidates or "").splitlines(), "The candidates"))
            if len(texts) > MAX_CANDIDATES:
                raise CaptionRequestError(f"The candidates stand for {len(texts)} captions; at most {MAX_CANDIDATES} "
                                          "here (python -m sdtune.caption takes more).")
        return CaptionerSpec(captioner, self.model_source(captioner, model), self.device, texts)

    def model_source(self, captioner: str, model: str) -> str:
        given = str(model or "").strip() or DEFAULT_MODELS[captioner]
        local = self.models_root / given
        if local.exists():
            if not local.resolve().is_relative_to(self.models_root):
                raise CaptionRequestError(f"Model {printable(Path(given).name)} is outside the models root "
                                          f"{self.models_root_shown}.")
            return str(local.resolve())
        if Path(given).is_absolute() or ".." in Path(given).parts or not HUB_NAME.fullmatch(given):
            raise CaptionRequestError(f"Model {printable(Path(given).name)}: neither a folder under the models root "
                                      f"{self.models_root_shown} nor a hub name (owner/name).")
        return given

    def _loaded(self, spec: CaptionerSpec):
        from sdtune.caption.captioners import load_captioner  # torch and transformers: only once one is asked for

        if self._captioner[0] != spec:
            self._captioner = (None, None)  # the old model is let go before the new one loads
            try:
                self._captioner = (spec, load_captioner(spec))
            except SdtuneError as error:
                raise CaptionRequestError(self.hide_roots(str(error))) from error
        return self._captioner[1]


def thumbnail(path: Path):
    """A small RGB copy of the image for the gallery, decoded by the project's safe loader."""
    image = to_rgb(open_image(path))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return image


def store_name(store) -> str:
    return "metadata.jsonl" if isinstance(store, MetadataCaptions) else ".txt caption files"


def to_cell(caption) -> str:
    """A caption as the table shows it: a list of captions (a metadata.jsonl may hold one) as its JSON."""
    if caption is None:
        return ""
    return json.dumps(caption, ensure_ascii=False) if isinstance(caption, list) else caption


def from_cell(cell: str):
    """A table cell back to a caption: a JSON list of texts stays a list; anything else is one caption."""
    text = " ".join(str(cell or "").split())
    if text.startswith(LIST_PREFIX):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(parsed, list) and parsed and all(isinstance(item, str) for item in parsed):
            return parsed
    return text


def check_length(text: str, name: str, limit: int = MAX_CAPTION_CHARS) -> None:
    if len(text) > limit:
        raise CaptionRequestError(f"{name} is {len(text)} characters long; at most {limit}.")


# -- edits across the table: plain functions of its rows -----------------------------------------------------------
def each_caption(cell: str, change) -> str:
    """`change` applied to a cell's caption, or to each caption of a list."""
    caption = from_cell(cell)
    if isinstance(caption, list):
        return to_cell([change(item) for item in caption])
    return change(caption) if caption else ""


def find_replace(rows, find: str, replace: str) -> tuple[list[list[str]], int]:
    """Every caption with `find` replaced by `replace` (plain text, case-sensitive); and how many changed."""
    if not find:
        raise CaptionRequestError("Find is empty: type the text to replace.")
    check_length(find, "Find")
    check_length(replace, "Replace")
    return changed_rows(rows, lambda caption: " ".join(caption.replace(find, replace).split()))


def add_trigger(rows, trigger: str) -> tuple[list[list[str]], int]:
    """`trigger, ` put before every caption that does not start with it already; empty captions stay empty (Caption
    fills them first). Returns the rows and how many changed."""
    word = trigger.strip().rstrip(",").strip()
    if not word:
        raise CaptionRequestError("The trigger word is empty: type one, e.g. sks dog.")
    check_length(word, "The trigger word")
    return changed_rows(rows, lambda caption: caption if starts_with(caption, word) else f"{word}, {caption}")


def starts_with(caption: str, word: str) -> bool:
    """Whether the caption's first words are `word` (followed by its end, a comma or a space)."""
    return caption.startswith(word) and (len(caption) == len(word) or caption[len(word)] in ", ")


def changed_rows(rows, change) -> tuple[list[list[str]], int]:
    result, changed = [], 0
    for row in rows or []:
        key, cell = str(row[0]), "" if row[1] is None else str(row[1])
        new = each_caption(cell, change)
        changed += new != cell
        result.append([key, new])
    return result, changed
