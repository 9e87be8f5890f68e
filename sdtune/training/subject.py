"""Subject training's (DreamBooth) set-up, for the training loop: the class images drawn before training, the
instance-and-class examples, and the text encoder made trainable (--train_text_encoder)."""

import logging

import torch

from sdtune.data.subject import class_images, instance_images
from sdtune.data.subject_dataset import SubjectImages
from sdtune.training.class_images import class_image_settings, fill_class_folder, missing_indices
from sdtune.training.lora import add_text_encoder_adapter
from sdtune.training.validation_images import validation_pipeline

logger = logging.getLogger(__name__)


def draw_class_images(args, parts, accelerator) -> None:
    """--with_prior_preservation: the class images --class_data_dir lacks, drawn by the base model (call it before any
    adapter is added), each process a share; every process waits until the folder is complete."""
    indices = missing_indices(args.class_data_dir, args.num_class_images)
    accelerator.wait_for_everyone()  # every process has listed the folder before any image is added to it
    if indices:
        pipeline = validation_pipeline(parts, parts.unet, accelerator.device)
        with accelerator.autocast():
            fill_class_folder(pipeline, args.class_data_dir, args.class_prompt, indices,
                              class_image_settings(args.resolution), args.sample_batch_size,
                              args.pretrained_model_name_or_path, accelerator.process_index,
                              accelerator.num_processes)
    accelerator.wait_for_everyone()


def make_subject_dataset(args, tokenizer) -> SubjectImages:
    """The instance images with --instance_prompt and, with prior preservation, the (now complete) class images."""
    instances = instance_images(args.instance_data_dir)
    classes = class_images(args.class_data_dir, args.num_class_images) if args.with_prior_preservation else None
    logger.info("Subject training: %d instance images ('%s')%s", len(instances), args.instance_prompt,
                f", {len(classes)} class images ('{args.class_prompt}')" if classes else "")
    return SubjectImages(instances, classes, args, tokenizer)


def make_text_encoder_trainable(text_encoder, args) -> list[torch.nn.Parameter]:
    """--train_text_encoder: every weight in fp32 (the full run), or a LoRA adapter of --lora_rank on its attention;
    returns the parameters to train."""
    if args.lora_rank:
        add_text_encoder_adapter(text_encoder, args)
    else:
        text_encoder.to(torch.float32)  # fp32 master weights: it was loaded in the mixed-precision dtype
        text_encoder.requires_grad_(True)
    if args.gradient_checkpointing:
        text_encoder.gradient_checkpointing_enable()
    text_encoder.train()
    return [parameter for parameter in text_encoder.parameters() if parameter.requires_grad]
