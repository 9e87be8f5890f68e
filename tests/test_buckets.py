"""Aspect-ratio buckets: the bucket list, which image goes where, the batch sampler (alone and sharded as accelerate
shards it for several processes), and the dataset's examples at bucket sizes with flip and the latent cache."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import MIXED_ASPECTS
from PIL import Image
from test_data import data_args
from transformers import CLIPTokenizer

from sdtune.data.buckets import (
    BucketBatchSampler,
    BucketSpec,
    assign_buckets,
    bucket_sizes,
    bucket_table,
    cover_size,
    crop_of,
    default_bucket_settings,
)
from sdtune.data.dataset import CaptionedImages, EpochShuffleSampler, load_rows, resize_and_crop, screen_rows
from sdtune.errors import SdtuneError
from sdtune.training.config import parse_args
from sdtune.training.latent_cache import build_latent_cache

SD = BucketSpec(512, 256, 1024, 64)  # kohya's defaults at --resolution 512


def test_defaults_scale_with_the_resolution():
    assert default_bucket_settings(512) == (256, 1024, 64)
    assert default_bucket_settings(64) == (32, 128, 8)
    assert default_bucket_settings(768) == (384, 1536, 96)


def test_every_bucket_fits_the_area_the_step_and_the_side_limits():
    buckets = bucket_sizes(SD)
    assert all(w * h <= 512 ** 2 and w % 64 == 0 == h % 64 and 256 <= min(w, h) and max(w, h) <= 1024
               for w, h in buckets)
    assert {(512, 512), (256, 1024), (1024, 256), (640, 384), (768, 256)} <= set(buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}  # as many tall shapes as wide ones
    assert len({w / h for w, h in buckets}) == len(buckets)  # one size per aspect ratio, the largest


def test_an_image_goes_to_the_nearest_ratio_that_crops_at_most_one_step():
    assert assign_buckets([(1920, 1080), (1080, 1920), (700, 700)], SD) == [(640, 384), (384, 640), (512, 512)]
    # 2.68:1 is a hair nearer 768x320 (2.4) than 768x256 (3.0) in log space, but 768x320 would crop 90 pixels
    assert crop_of((2680, 1000), (768, 320)) == 90
    assert assign_buckets([(2680, 1000)], SD) == [(768, 256)]
    buckets = bucket_sizes(SD)
    low, high = math.log(256 / 1024), math.log(1024 / 256)
    for index in range(401):
        ratio = math.exp(low + (high - low) * index / 400)
        size = (round(4000 * min(ratio, 1)), round(4000 / max(ratio, 1)))
        bucket, = assign_buckets([size], SD)
        assert bucket in buckets and crop_of(size, bucket) <= 64, size


def test_tiny_and_extreme_images_get_a_bucket():
    # beyond the widest and tallest bucket: the most extreme one, cropped by more than a step
    assert assign_buckets([(1, 1), (4000, 300), (300, 4000)], SD) == [(512, 512), (1024, 256), (256, 1024)]
    assert assign_buckets([(4000, 300)], BucketSpec(64, *default_bucket_settings(64))) == [(128, 32)]


def test_no_upscale_gives_a_small_image_a_bucket_of_its_own_size():
    spec = BucketSpec(512, 256, 1024, 64, no_upscale=True)
    # 300x200 would be enlarged into 576x384: it gets 256x192 (its size rounded down to the step), below the minimum
    assert assign_buckets([(300, 200), (2000, 1000), (4000, 300), (1, 1)], spec) == \
        [(256, 192), (640, 320), (1024, 256), (64, 64)]
    assert crop_of((300, 200), (256, 192)) <= 64


def test_the_table_counts_images_per_bucket_from_tallest_to_widest():
    assert bucket_table([(64, 64), (80, 40), (48, 72), (80, 40)]) == [
        "Aspect-ratio buckets: 3 in use (width x height: images)", "  48x72: 1", "  64x64: 1", "  80x40: 2"]


BUCKETS = [(64, 64)] * 5 + [(80, 40)] * 3 + [(48, 72)]


def sampler(seed=3):
    return BucketBatchSampler(EpochShuffleSampler(len(BUCKETS), seed), BUCKETS, 2, seed)


def epoch_batches(batch_sampler, epoch):
    batch_sampler.set_epoch(epoch)
    return list(batch_sampler)


def test_every_batch_holds_one_bucket_and_every_row_comes_once_an_epoch():
    batches = epoch_batches(sampler(), 0)
    assert len(batches) == len(sampler()) == 3 + 2 + 1  # a bucket's last batch is kept, short
    assert all(len({BUCKETS[position] for _, position in batch}) == 1 for batch in batches)
    assert sorted(position for batch in batches for _, position in batch) == list(range(len(BUCKETS)))
    assert all(epoch == 0 for batch in batches for epoch, _ in batch)


def test_the_order_is_fixed_by_seed_and_epoch():
    assert epoch_batches(sampler(), 1) == epoch_batches(sampler(), 1)
    assert epoch_batches(sampler(), 1) != epoch_batches(sampler(), 2)
    assert epoch_batches(sampler(), 1) != epoch_batches(sampler(seed=4), 1)


def test_two_processes_share_out_the_one_process_batches():
    # what accelerate.prepare makes of the batch sampler on 2 processes; set_epoch reaches it through `.sampler`
    whole = epoch_batches(sampler(), 5)
    shards = [BatchSamplerShard(sampler(), num_processes=2, process_index=index) for index in (0, 1)]
    for shard in shards:
        shard.batch_sampler.sampler.set_epoch(5)
    assert [len(shard) for shard in shards] == [3, 3]
    assert [list(shard) for shard in shards] == [whole[0::2], whole[1::2]]


@pytest.mark.parametrize("flags, message", [
    (["--min_bucket_reso", "32"], "--min_bucket_reso: bucket settings, but buckets are off"),
    (["--bucket_no_upscale"], "--bucket_no_upscale: bucket settings"),
    (["--enable_bucket", "--bucket_reso_steps", "0"], "--bucket_reso_steps 0 must be a positive multiple of 8"),
    (["--enable_bucket", "--bucket_reso_steps", "12"], "--bucket_reso_steps 12"),
    (["--enable_bucket", "--min_bucket_reso", "36"], "must be multiples of --bucket_reso_steps 8"),
    (["--enable_bucket", "--min_bucket_reso", "128", "--max_bucket_reso", "256"], "--resolution 64 must lie within"),
    (["--enable_bucket", "--max_bucket_reso", "48"], "--resolution 64 must lie within"),
])
def test_bad_bucket_flags_are_refused_naming_the_flag(tmp_path, flags, message):
    with pytest.raises(SdtuneError, match=message):
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path), "--resolution", "64",
                    *flags])


def test_bucket_defaults_are_filled_and_kept_when_given(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path), "--enable_bucket"]
    args = parse_args([*base, "--resolution", "64"])
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (32, 128, 8)
    args = parse_args([*base, "--min_bucket_reso", "320", "--bucket_reso_steps", "32"])
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (320, 1024, 32)


def bucketed_dataset(folder, tiny_pipeline):
    """The folder's rows at --resolution 64 with --center_crop and --random_flip, each in its bucket."""
    args = data_args(folder, resolution=64, center_crop=True)
    rows = load_rows(args)
    screened = screen_rows(rows, "image", "text")
    buckets = assign_buckets([(i.width, i.height) for i in screened.images], BucketSpec(64, 32, 128, 8))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    return CaptionedImages(rows.select(screened.usable), args, tokenizer, buckets=buckets)


def test_examples_come_at_their_bucket_size_mirrored_or_not(mixed_aspect_dataset, tiny_pipeline):
    dataset = bucketed_dataset(mixed_aspect_dataset, tiny_pipeline)
    expected = {bucket for _, bucket in MIXED_ASPECTS.values()}
    assert set(dataset.buckets) == expected
    flipped = set()
    for position in range(len(dataset)):
        width, height = dataset.target_size(position)
        plain = dataset.image_at(position, flip=False)
        assert plain.shape == (3, height, width)
        assert torch.equal(dataset.image_at(position, flip=True), plain.flip(-1))
        for epoch in range(2):
            pixels = dataset[(epoch, position)]["pixel_values"]
            assert torch.equal(pixels, plain) or torch.equal(pixels, plain.flip(-1))
            flipped.add(torch.equal(pixels, plain.flip(-1)))
    assert flipped == {True, False}


class PoolingVae:
    """A stand-in VAE whose latent mean is the image pooled 8x: its cached value tells which pixels it came from."""
    dtype = torch.float32

    def encode(self, pixels):
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))


def test_the_latent_cache_keeps_each_bucket_shape_and_each_examples_own_latents(mixed_aspect_dataset,
                                                                                 tiny_pipeline):
    dataset = bucketed_dataset(mixed_aspect_dataset, tiny_pipeline)
    text_encoder = lambda ids, return_dict: (ids.float().unsqueeze(-1),)  # noqa: E731
    dataset.cache = build_latent_cache(dataset, PoolingVae(), text_encoder, "cpu", batch_size=5, show_progress=False)
    for position in range(len(dataset)):
        width, height = dataset.target_size(position)
        for flip in (False, True):
            mean, std = dataset.cache.image_distribution(position, flip)
            assert mean.shape == std.shape == (3, height // 8, width // 8)
            expected = torch.nn.functional.avg_pool2d(dataset.image_at(position, flip)[None], 8)[0]
            assert torch.allclose(mean, expected, atol=1e-6)
        example = dataset[(0, position)]
        assert example["latent_mean"].shape == (3, height // 8, width // 8)


@pytest.mark.parametrize("center_crop", [True, False])
def test_an_extreme_image_is_resized_within_its_kept_window_only(center_crop):
    # 1x400, a vertical ramp, into an 8x32 bucket: covering it whole would take 100 times the bucket's pixels (a
    # 1x4000 image in a 256x1024 bucket: 786 MB), so only the window kept is resized; same pixels as the long way
    ramp = Image.fromarray(np.linspace(0, 255, 400).astype(np.uint8)[:, None]).convert("RGB")
    out = resize_and_crop(ramp, (8, 32), center_crop, torch.Generator().manual_seed(3))
    covered = ramp.resize(cover_size(ramp.size, (8, 32)), Image.Resampling.BILINEAR)  # 8x3200
    offsets = torch.Generator().manual_seed(3)  # drawn as resize_and_crop draws them: left, then top
    left = 0 if center_crop else int(torch.randint(1, (), generator=offsets))
    top = (3200 - 32) // 2 if center_crop else int(torch.randint(3200 - 32 + 1, (), generator=offsets))
    expected = covered.crop((left, top, left + 8, top + 32))
    assert out.size == (8, 32)
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
