"""Aspect-ratio buckets (--enable_bucket): training sizes of about resolution² pixels in many shapes, the bucket each
image goes to, and batches that each come from one bucket (a batch's examples must share a shape).

The flags are kohya sd-scripts'. Every bucket's sides are multiples of the step, within [min, max], and its area is
at most resolution². An image goes to the bucket nearest its aspect ratio (in log space, where 1:2 and 2:1 are
equally far from 1:1) among those it covers with at most one step cropped, and is resized to cover it; an image more
extreme than every bucket goes to the most extreme one.
"""

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from sdtune.seeds import batch_order_generator

VAE_FACTOR = 8  # the VAE halves a side three times: a bucket side must be a multiple of 8 pixels


@dataclass(frozen=True)
class BucketSpec:
    resolution: int  # every bucket's area is at most resolution²
    min_side: int  # --min_bucket_reso
    max_side: int  # --max_bucket_reso
    step: int  # --bucket_reso_steps: sides are multiples of this
    no_upscale: bool = False  # --bucket_no_upscale

    @classmethod
    def from_args(cls, args) -> "BucketSpec":
        return cls(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                   args.bucket_no_upscale)


def default_bucket_settings(resolution: int) -> tuple[int, int, int]:
    """(min side, max side, step) for a resolution: kohya's 256, 1024 and 64 at 512, in proportion elsewhere (32, 128
    and 8 at the tiny world's 64), the step a multiple of 8 and both sides multiples of the step."""
    step = max(VAE_FACTOR, resolution // 64 * VAE_FACTOR)
    return max(step, resolution // 2 // step * step), resolution * 2 // step * step, step


def bucket_sizes(spec: BucketSpec) -> list[tuple[int, int]]:
    """Every (width, height) within the area that would pass it if both sides grew by a step (so none is much
    smaller than resolution²), the largest of each aspect ratio, from the tallest to the widest."""
    area, sides = spec.resolution ** 2, range(spec.min_side, spec.max_side + 1, spec.step)
    largest = {}
    for width in sides:
        for height in sides:
            if width * height <= area < (width + spec.step) * (height + spec.step):
                ratio = width / height
                if ratio not in largest or width * height > math.prod(largest[ratio]):
                    largest[ratio] = (width, height)
    return [largest[ratio] for ratio in sorted(largest)]


def cover_size(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to, its aspect ratio kept, so that it covers `bucket` exactly on one side."""
    width, height = image_size
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def crop_of(image_size: tuple[int, int], bucket: tuple[int, int]) -> int:
    """Pixels the crop cuts from the resized image (on its one longer side)."""
    covered = cover_size(image_size, bucket)
    return max(covered[0] - bucket[0], covered[1] - bucket[1])


def nearest_bucket(image_size: tuple[int, int], buckets: list[tuple[int, int]], step: int) -> tuple[int, int]:
    """The bucket nearest the image's aspect ratio among those cropping at most one step; the larger on a tie."""
    ratio = math.log(image_size[0] / image_size[1])
    return min(buckets, key=lambda bucket: (crop_of(image_size, bucket) > step,
                                            abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def own_bucket(image_size: tuple[int, int], spec: BucketSpec) -> tuple[int, int]:
    """--bucket_no_upscale: the image's own size, shrunk (ratio kept) to the area and to --max_bucket_reso, rounded
    down to the step; at least one step a side, so only an image thinner than a step is enlarged."""
    width, height = image_size
    shrink = min(1.0, spec.resolution / math.sqrt(width * height), spec.max_side / max(width, height))
    return tuple(max(spec.step, int(side * shrink) // spec.step * spec.step) for side in (width, height))


def bucket_for(image_size: tuple[int, int], buckets: list[tuple[int, int]], spec: BucketSpec) -> tuple[int, int]:
    bucket = nearest_bucket(image_size, buckets, spec.step)
    upscaled = bucket[0] > image_size[0] or bucket[1] > image_size[1]
    return own_bucket(image_size, spec) if spec.no_upscale and upscaled else bucket


def assign_buckets(image_sizes: list[tuple[int, int]], spec: BucketSpec) -> list[tuple[int, int]]:
    """The bucket (width, height) of each image, in their order."""
    buckets, chosen = bucket_sizes(spec), {}
    for size in set(image_sizes):
        chosen[size] = bucket_for(size, buckets, spec)
    return [chosen[size] for size in image_sizes]


def bucket_table(assigned: list[tuple[int, int]]) -> list[str]:
    """The log's lines: each bucket in use with its image count, from the tallest to the widest."""
    counts = Counter(assigned)
    lines = [f"Aspect-ratio buckets: {len(counts)} in use (width x height: images)"]
    return lines + [f"  {width}x{height}: {counts[(width, height)]}"
                    for width, height in sorted(counts, key=lambda size: (size[0] / size[1], size[0]))]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, position) keys, each from one bucket: the rows in `row_sampler`'s order for the epoch,
    grouped by bucket and cut into batches (a bucket's last one may be short: no image is left out), the batches then
    shuffled by (seed, epoch). Deterministic per epoch, so a resumed run skips into the same order.

    No `batch_size` attribute, on purpose: accelerate's BatchSamplerShard then takes batches of any length and gives
    process i batches i, i+n, ..., repeating the first ones to make the count a multiple of n; it reaches
    `row_sampler.set_epoch` as `.sampler`."""

    def __init__(self, row_sampler, buckets: list[tuple[int, int]], rows_per_batch: int, seed: int):
        self.sampler, self.buckets, self.rows_per_batch, self.seed = row_sampler, buckets, rows_per_batch, seed
        self.num_batches = sum(math.ceil(count / rows_per_batch) for count in Counter(buckets).values())

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        by_bucket = defaultdict(list)
        for key in self.sampler:
            by_bucket[self.buckets[key[1]]].append(key)
        size = self.rows_per_batch
        batches = [keys[start:start + size] for keys in by_bucket.values() for start in range(0, len(keys), size)]
        order = torch.randperm(len(batches), generator=batch_order_generator(self.seed, self.sampler.epoch))
        return iter([batches[index] for index in order])
