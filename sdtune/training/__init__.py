"""Training: the flags and recipes, the loop (set-up, step, export in loop.py), the diffusion objective, optimizers,
components, checkpoints and exact resume, LoRA training and export, the latent cache, validation images and loss."""
