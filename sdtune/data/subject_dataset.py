"""Subject training's examples (DreamBooth): each instance image with --instance_prompt and, with prior preservation,
a class image with --class_prompt beside it; a batch is the instance half followed by the class half (as in diffusers'
train_dreambooth.py), so the objective splits the loss in two.

The epoch runs over max(instance images, class images) positions: position p pairs instance p mod n with class
image p mod m, so every class image is seen once an epoch and the few instance images many times. Under
--enable_bucket a position's size is its instance image's bucket, and its class image is cropped to that size, so the
two halves of a batch share one shape. Random choices come from (seed, epoch, position), as in dataset.py.
"""

from pathlib import Path

import torch

from sdtune.data.buckets import BucketSpec, assign_buckets
from sdtune.data.dataset import resize_and_crop, to_tensor, uniform
from sdtune.data.images import open_image, to_rgb
from sdtune.data.subject import SubjectImage
from sdtune.seeds import example_generator


class ImageSet(torch.utils.data.Dataset):
    """Images with one prompt, each at a fixed training size; read by build_latent_cache (training/latent_cache.py)
    like CaptionedImages: `cache` is set there under --cache_latents."""

    def __init__(self, items: list[tuple[Path, tuple[int, int]]], prompt: str, tokenizer, random_flip: bool,
                 proportion_empty_prompts: float = 0.0):
        self.items, self.prompt, self.tokenizer, self.random_flip = items, prompt, tokenizer, random_flip
        self.proportion_empty_prompts, self.cache = proportion_empty_prompts, None

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index: int, center_crop: bool, generator: torch.Generator) -> dict:
        caption = "" if uniform(generator) < self.proportion_empty_prompts else self.prompt
        flip = self.random_flip and uniform(generator) < 0.5
        if self.cache is not None:
            mean, std = self.cache.image_distribution(index, flip)
            return {"latent_mean": mean, "latent_std": std, "encoder_hidden_states": self.cache.text_embedding(caption)}
        path, size = self.items[index]
        image = resize_and_crop(to_rgb(open_image(path)), size, center_crop, generator)
        return {"pixel_values": to_tensor(image, flip), "input_ids": self.tokenize(caption)}

    def image_at(self, index: int, flip: bool) -> torch.Tensor:
        """The centre-cropped pixels of one item, as cached by --cache_latents."""
        path, size = self.items[index]
        return to_tensor(resize_and_crop(to_rgb(open_image(path)), size, True, None), flip)

    def target_size(self, index: int) -> tuple[int, int]:
        return self.items[index][1]

    def all_captions(self) -> list[str]:
        return [self.prompt, ""] if self.proportion_empty_prompts > 0 else [self.prompt]

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids[0]


class SubjectImages(torch.utils.data.Dataset):
    """(epoch, position) keys to {'instance': example, 'class': example} (no 'class' without prior preservation);
    `collate` makes the batch the training step reads."""

    def __init__(self, instances: list[SubjectImage], classes: list[SubjectImage] | None, args, tokenizer):
        """`instances`, `classes`: the screened folders (sdtune.data.subject); `classes` None without prior
        preservation."""
        self.seed, self.center_crop = args.seed, args.center_crop
        length = max(len(instances), len(classes)) if classes else len(instances)
        instance_sizes = ([(args.resolution, args.resolution)] * len(instances) if not args.enable_bucket else
                          assign_buckets([image.size for image in instances], BucketSpec.from_args(args)))
        self.buckets = ([instance_sizes[p % len(instances)] for p in range(length)] if args.enable_bucket else None)
        self.instance = ImageSet([(image.path, size) for image, size in zip(instances, instance_sizes)],
                                 args.instance_prompt, tokenizer, args.random_flip, args.proportion_empty_prompts)
        self.classes = None if not classes else ImageSet(
            [(classes[p % len(classes)].path, instance_sizes[p % len(instances)]) for p in range(length)],
            args.class_prompt, tokenizer, args.random_flip)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> dict:
        epoch, position = key
        generator = example_generator(self.seed, epoch, position)
        example = {"instance": self.instance.example(position % len(self.instance), self.center_crop, generator)}
        if self.classes is not None:
            example["class"] = self.classes.example(position, self.center_crop, generator)
        return example

    def image_sets(self) -> list[ImageSet]:
        """What --cache_latents encodes: the instance images, and the class images at their positions' sizes."""
        return [self.instance] + ([self.classes] if self.classes is not None else [])

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        """One batch: the instance examples, then (with prior preservation) the class examples, in one tensor per
        key, so the UNet runs once on both halves."""
        halves = [example["instance"] for example in examples]
        halves += [example["class"] for example in examples if "class" in example]
        return {key: torch.stack([half[key] for half in halves]) for key in halves[0]}
