"""Where captions are kept: a folder's metadata.jsonl, or kohya's `.txt` beside each image. Every file is written
whole under a temporary name and then renamed over the old one (atomic on POSIX and Windows), so an interrupted
or failed write leaves the previous file as it was, never a half-written one."""

import json
import os
from pathlib import Path

from sdtune.data.captions import caption_file, metadata_file, read_caption_file, read_metadata_jsonl
from sdtune.data.folders import printable
from sdtune.errors import SdtuneError


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one step; SdtuneError naming the file when the folder refuses it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: never listed, never read as a caption
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, so a crash cannot leave an empty file in its place
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SdtuneError(f"Cannot write {printable(path.name)} in {printable(str(path.parent))}: "
                          f"{error.strerror or error}. Make the folder writable; the captions written so far "
                          "are kept, and a rerun captions the rest.") from error


def one_line(caption: str) -> str:
    """kohya's trainers read a caption file's first line only, and a metadata row is one caption: no line breaks."""
    return " ".join(caption.split())


class TxtCaptions:
    """kohya's layout: `cat.png` is captioned by `cat.txt` beside it."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def existing(self, key: str) -> str | None:
        """The image's caption, None when it has none; CaptionFileError for a file that is not UTF-8."""
        return read_caption_file(caption_file(self.folder / key)) or None

    def write(self, captions: dict[str, str]) -> None:
        for key, caption in captions.items():
            write_atomically(caption_file(self.folder / key), one_line(caption))


class MetadataCaptions:
    """datasets' imagefolder layout: FOLDER/metadata.jsonl, one row per image (file_name, text). Rows written by
    others, their other columns and rows of files that are gone are kept as they are."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / "metadata.jsonl"
        other = metadata_file(self.folder)
        if other is not None and other != self.path:
            raise SdtuneError(f"{self.folder} has its captions in {other.name}, which datasets would read beside a "
                              "metadata.jsonl: convert it to metadata.jsonl, or write .txt files with --format txt.")
        self.rows = read_metadata_jsonl(self.path) if self.path.is_file() else []
        self.by_name = {row["file_name"]: row for row in self.rows}

    def existing(self, key: str) -> str | list | None:
        text = self.by_name.get(key, {}).get("text")
        return text if text and (isinstance(text, list) or text.strip()) else None

    def write(self, captions: dict[str, str | list[str]]) -> None:
        """Add or replace the rows of `captions` and rewrite the file (a few bytes a row: cheap beside a model)."""
        for key, caption in captions.items():
            if key not in self.by_name:
                self.by_name[key] = {"file_name": key}
                self.rows.append(self.by_name[key])
            # a list of captions (one drawn each time the image is) stays a list
            self.by_name[key]["text"] = [one_line(item) for item in caption] if isinstance(caption, list) \
                else one_line(caption)
        write_atomically(self.path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows))


def caption_store(folder, output_format: str):
    """The store of `--format` jsonl or txt."""
    return MetadataCaptions(folder) if output_format == "jsonl" else TxtCaptions(folder)
