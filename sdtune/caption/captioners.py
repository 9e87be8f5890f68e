"""The captioners, each a transformers model loaded by hub id or local folder, with one method: caption(images) ->
one caption per PIL image, batched as given."""

import torch
import torch.nn.functional as F

from sdtune.caption.spec import CaptionerSpec
from sdtune.errors import SdtuneError

MODEL_TYPES = {"blip": "blip", "florence2": "florence2", "clip": "clip"}  # captioner -> its config's model_type
TEXT_BATCH = 256  # candidate captions embedded per call


def check_model_type(spec: CaptionerSpec) -> None:
    """Refuse, before loading any weight, a model that is missing or is not the captioner's kind."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(spec.model).model_type
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SdtuneError(f"Cannot load the {spec.name} captioner's model '{spec.model}': {first_line}\n"
                          "Give a local model folder or a hub id you can reach (--model_name_or_path).") from error
    if model_type != MODEL_TYPES[spec.name]:
        raise SdtuneError(f"'{spec.model}' is a {model_type} model, not a {MODEL_TYPES[spec.name]} one: give "
                          f"--captioner the kind of model it is, or --model_name_or_path a {spec.name} model.")


def load_pretrained(spec: CaptionerSpec, model_class, processor_class):
    """The model (in eval mode, on the spec's device) and its processor; SdtuneError when either cannot load."""
    check_model_type(spec)
    try:
        model = model_class.from_pretrained(spec.model).eval().to(spec.device)
        processor = processor_class.from_pretrained(spec.model)
    except (OSError, ValueError) as error:
        raise SdtuneError(f"Cannot load the {spec.name} captioner from '{spec.model}': {error}") from error
    return model, processor


def embedding(output) -> torch.Tensor:
    """A CLIP's projected embeddings: transformers 5 returns them in a model output's pooler_output, 4 as a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipRanker:
    """The candidate caption with the highest CLIP similarity to each image (CLIP Interrogator's approach)."""

    def __init__(self, spec: CaptionerSpec):
        from transformers import CLIPModel, CLIPProcessor

        self.model, self.processor = load_pretrained(spec, CLIPModel, CLIPProcessor)
        self.device, self.candidates = spec.device, list(spec.candidates)
        self.text = torch.cat([self.embed_text(self.candidates[start:start + TEXT_BATCH])
                               for start in range(0, len(self.candidates), TEXT_BATCH)])

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        # padded to the tokenizer's window, as Stable Diffusion's text encoder sees its prompts
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").to(self.device)
        return F.normalize(embedding(self.model.get_text_features(**tokens)), dim=-1)

    @torch.no_grad()
    def caption(self, images) -> list[str]:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        embedded = F.normalize(embedding(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return [self.candidates[index] for index in (embedded @ self.text.T).argmax(dim=-1).tolist()]


class BlipCaptioner:
    """BLIP's image-to-text head; a --prompt is given as the start of every caption, which BLIP continues."""

    def __init__(self, spec: CaptionerSpec):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.model, self.processor = load_pretrained(spec, BlipForConditionalGeneration, BlipProcessor)
        self.spec = spec

    @torch.no_grad()
    def caption(self, images) -> list[str]:
        text = [self.spec.prompt] * len(images) if self.spec.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.spec.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, num_beams=self.spec.num_beams)
        return [caption.strip() for caption in self.processor.batch_decode(ids, skip_special_tokens=True)]


class Florence2Captioner:
    """Florence-2 on one of its caption tasks; its processor turns the task token into the model's own question."""

    def __init__(self, spec: CaptionerSpec):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.model, self.processor = load_pretrained(spec, Florence2ForConditionalGeneration, AutoProcessor)
        self.spec = spec

    @torch.no_grad()
    def caption(self, images) -> list[str]:
        inputs = self.processor(text=[self.spec.task] * len(images), images=images, return_tensors="pt")
        ids = self.model.generate(**inputs.to(self.spec.device), max_new_tokens=self.spec.max_new_tokens,
                                  num_beams=self.spec.num_beams)
        # caption tasks answer in plain text: decoding without special tokens also drops the padding of a batch's
        # shorter answers, which post_process_generation (it strips <s> and </s> only) would leave in
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


CAPTIONER_CLASSES = {"clip": ClipRanker, "blip": BlipCaptioner, "florence2": Florence2Captioner}


def load_captioner(spec: CaptionerSpec):
    return CAPTIONER_CLASSES[spec.name](spec)
