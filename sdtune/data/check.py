"""The data check: what a dataset holds and what training will make of it, before any model loads.

`train_text_to_image.py --check_data` prints the report and exits; every training run logs the same report at its
start. It costs no extra decoding: the screening (sdtune/data/dataset.py) decodes every image once anyway, and notes
each usable image's size and pixel digest on the way.
"""

import bisect
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from statistics import median_low

from sdtune.data.buckets import BucketSpec, assign_buckets, bucket_table
from sdtune.data.captions import caption_sources
from sdtune.data.dataset import EXAMPLE_NAMES, ScreenResult, inspect_rows, load_rows, repeat_counts, usable_captions
from sdtune.data.folders import list_images
from sdtune.data.splits import split_validation_rows
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

TOP_CAPTIONS = 3  # captions shared by several images: how many the report lists
SHOWN_CAPTION_CHARS = 70
# Aspect ratio (width / height) bins: each holds the ratios from the previous bound up to (not including) its own
ASPECT_BINS = ((1 / 2, "taller than 1:2"), (3 / 4, "1:2 to 3:4"), (4 / 3, "3:4 to 4:3"), (2, "4:3 to 2:1"),
               (math.inf, "2:1 or wider"))


@dataclass
class DataReport:
    screened: ScreenResult
    token_lengths: list[int]  # of every usable caption, BOS and EOS included, before truncation
    token_limit: int  # the tokenizer's window; longer captions are truncated
    duplicates: list[list[str]]  # groups of rows whose images have the same decoded pixels, largest first
    caption_counts: Counter  # caption -> how many usable rows have it
    unlisted: list[str]  # image files of a --train_data_dir that no metadata row names (imagefolder leaves them out)
    buckets: list[tuple[int, int]] | None = None  # under --enable_bucket: each usable image's (width, height)
    sources: tuple[str, ...] = ()  # where the captions come from, and which images have none (caption_sources)

    @property
    def shared_captions(self) -> list[tuple[str, int]]:
        """The captions of several rows, with their row counts, most used first."""
        return [(caption, count) for caption, count in self.caption_counts.most_common(TOP_CAPTIONS) if count > 1]

    @property
    def truncated(self) -> int:
        return sum(length > self.token_limit for length in self.token_lengths)

    def aspect_histogram(self) -> dict[str, int]:
        counts = Counter(bisect.bisect_right([bound for bound, _ in ASPECT_BINS], image.width / image.height)
                         for image in self.screened.images)
        return {name: counts[index] for index, (_, name) in enumerate(ASPECT_BINS)}

    def lines(self, resolution: int) -> list[str]:
        """The report as printed by --check_data and logged at the start of training."""
        unlisted = ([f"Not in the metadata, so left out: {len(self.unlisted)} image file(s), e.g. "
                     f"{', '.join(self.unlisted[:EXAMPLE_NAMES])}"] if self.unlisted else [])
        buckets = bucket_table(self.buckets) if self.buckets is not None else []
        return [*self._row_lines(), *self.sources, *unlisted, self._caption_line(), *self._size_lines(resolution),
                *buckets, self._duplicate_line(), self._shared_caption_line()]

    def _row_lines(self) -> list[str]:
        screened = self.screened
        usable = f" {len(screened.usable)} usable." if screened.skipped else ""
        return [f"Data check: {screened.summary()}{usable}",
                *(f"  e.g. {reason}: {', '.join(names)}" for reason, names in screened.skipped_names.items())]

    def _caption_line(self) -> str:
        if not self.token_lengths:
            return "Captions: none usable."
        low, middle, high = spread(self.token_lengths)
        return (f"Caption length in tokens: min {low}, median {middle}, max {high}; {self.truncated} longer than "
                f"{self.token_limit} and truncated.")

    def _size_lines(self, resolution: int) -> list[str]:
        images = self.screened.images
        if not images:
            return ["Image sizes: no usable image."]
        widths, heights = spread([i.width for i in images]), spread([i.height for i in images])
        bins = ", ".join(f"{name}: {count}" for name, count in self.aspect_histogram().items())
        return [f"Image sizes: width min {widths[0]}, median {widths[1]}, max {widths[2]}; height min {heights[0]}, "
                f"median {heights[1]}, max {heights[2]}; {self._upscaled_text(resolution)}.",
                f"Aspect ratios (width:height): {bins}."]

    def _upscaled_text(self, resolution: int) -> str:
        images = self.screened.images
        if self.buckets is None:
            small = sum(min(i.width, i.height) < resolution for i in images)
            return f"{small} smaller than --resolution {resolution} on the short side (upscaled)"
        small = sum(width > i.width or height > i.height for i, (width, height) in zip(images, self.buckets))
        return f"{small} smaller than their bucket on a side (upscaled)"

    def _duplicate_line(self) -> str:
        if not self.duplicates:
            return "Duplicate images (same pixels): none."
        repeats = sum(len(group) - 1 for group in self.duplicates)
        groups = "; ".join(" = ".join(group[:EXAMPLE_NAMES]) + (" = ..." if len(group) > EXAMPLE_NAMES else "")
                           for group in self.duplicates[:EXAMPLE_NAMES])
        return (f"Duplicate images (same pixels): {repeats} repeat another, in {len(self.duplicates)} group(s), "
                f"e.g. {groups}")

    def _shared_caption_line(self) -> str:
        distinct = f"Distinct captions: {len(self.caption_counts)}; shared by several images: "
        if not self.shared_captions:
            return distinct + "none."
        return distinct + "; ".join(f"{count} x {shorten(caption)!r}" for caption, count in self.shared_captions)


def spread(values: list[int]) -> tuple[int, int, int]:
    """Min, median (an actual value: the lower middle) and max."""
    return min(values), median_low(values), max(values)


def shorten(caption: str) -> str:
    return caption if len(caption) <= SHOWN_CAPTION_CHARS else caption[:SHOWN_CAPTION_CHARS - 3] + "..."


def build_report(rows, screened: ScreenResult, args, tokenizer) -> DataReport:
    """The report of the screened rows: token lengths need the tokenizer; the rest comes from the screening."""
    caption_values = rows.select(screened.usable)[args.caption_column] if screened.usable else []
    captions = [caption for value in caption_values for caption in usable_captions(value)]
    lengths = [len(ids) for ids in tokenizer(captions).input_ids] if captions else []
    repeats = repeat_counts(rows.select(screened.usable)) if screened.usable else []
    counts = Counter()  # rows per caption, a kohya repeat counting as a row: what training draws
    for value, times in zip(caption_values, repeats):
        counts.update(dict.fromkeys(set(usable_captions(value)), times))
    # with --max_train_samples the rows left out on purpose would count as unlisted
    unlisted = (unlisted_images(rows[args.image_column], args.train_data_dir)
                if args.train_data_dir is not None and args.max_train_samples is None else [])
    buckets = (assign_buckets([(image.width, image.height) for image in screened.images], BucketSpec.from_args(args))
               if args.enable_bucket else None)
    sources = (caption_sources(args.train_data_dir) if args.train_data_dir is not None
               else (f"Captions from: the dataset's '{args.caption_column}' column.",))
    return DataReport(screened, lengths, tokenizer.model_max_length, duplicate_groups(screened), counts, unlisted,
                      buckets, sources)


def unlisted_images(image_values, folder: str) -> list[str]:
    """The images under `folder` that no row comes from: imagefolder leaves out, without a word, every image its
    metadata file does not name."""
    listed = {os.path.realpath(value["path"]) for value in image_values if value.get("path")}
    return [image.key for image in list_images(folder) if os.path.realpath(image.path) not in listed]


def duplicate_groups(screened: ScreenResult) -> list[list[str]]:
    by_digest = defaultdict(dict)  # digest -> names, each once: kohya's repeated rows are one file, not duplicates
    for image in screened.images:
        by_digest[image.digest][image.name] = None
    return sorted((list(names) for names in by_digest.values() if len(names) > 1), key=len, reverse=True)


def load_tokenizer(args):
    """The pipeline's tokenizer only: a few hundred kilobytes, where the models are gigabytes."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer",
                                             revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise SdtuneError(f"Cannot load the tokenizer of '{args.pretrained_model_name_or_path}' (its tokenizer/ "
                          f"folder): {error}. Give a local pipeline folder or a hub id you can reach.") from error


def main(args) -> DataReport:
    """--check_data: read and screen the dataset, print the report; an SdtuneError when no row is usable."""
    rows = load_rows(args)
    screened = inspect_rows(rows, args.image_column, args.caption_column)
    report = build_report(rows, screened, args, load_tokenizer(args))
    print("\n".join(report.lines(args.resolution)))
    screened.require_usable()
    training, held_out = split_validation_rows(args, rows.select(screened.usable))  # its errors, before training
    if held_out is not None:
        print(f"Validation loss: {len(held_out)} held-out rows; {len(training)} rows to train on.")
    return report
