"""manifest.jsonl of the batch CLI: one line per image, appended as each image is finished, so a killed run
loses at most the images in flight and a rerun knows what is done."""

import json
import os
from pathlib import Path

from sdtune.errors import SdtuneError

MANIFEST = "manifest.jsonl"


def part_path(output_dir, process_index: int) -> Path:
    """Each process appends to its own part; the main process merges them at the end."""
    return Path(output_dir) / f"manifest.part-{process_index:03d}.jsonl"


def read_lines(path: Path) -> list[dict]:
    """Complete lines of a manifest; a line cut short by a kill is ignored, a whole line that is no entry refused."""
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not is_entry(entry):
            raise SdtuneError(f"{path} line {number} is not a manifest entry ({line[:60]}): delete that line (the "
                              "rerun redoes its image) or use another --output.")
        entries.append(entry)
    return entries


def is_entry(entry) -> bool:
    """What the resume reads of a line: the input's key, and the output file and error when there are any."""
    return (isinstance(entry, dict) and isinstance(entry.get("input"), str)
            and isinstance(entry.get("output"), str | None) and isinstance(entry.get("error", ""), str | None))


def read_all(output_dir) -> dict[str, dict]:
    """The latest entry per input over the merged manifest and every part."""
    folder = Path(output_dir)
    latest = {}
    for path in [folder / MANIFEST, *sorted(folder.glob("manifest.part-*.jsonl"))]:
        for entry in read_lines(path):
            latest[entry["input"]] = entry
    return latest


def completed(output_dir) -> set[str]:
    """Inputs whose output exists and whose line records no error."""
    folder = Path(output_dir)
    return {key for key, entry in read_all(folder).items()
            if not entry.get("error") and entry.get("output") and (folder / entry["output"]).is_file()}


def append(path: Path, entry: dict) -> None:
    """Append one line and push it to disk before going on."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge(output_dir) -> Path:
    """One manifest.jsonl, sorted by input, replacing the parts."""
    folder = Path(output_dir)
    entries = sorted(read_all(folder).values(), key=lambda e: e["input"])
    write_atomically(folder / MANIFEST, "".join(json.dumps(e) + "\n" for e in entries))
    for part in folder.glob("manifest.part-*.jsonl"):
        part.unlink()
    return folder / MANIFEST


def write_atomically(path: Path, text: str) -> None:
    """Write through a `.partial` file renamed into place: a reader never sees half a file, and a failed write
    (a full disk) leaves nothing behind."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
