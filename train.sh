#!/usr/bin/env bash
# Fine-tune Stable Diffusion v1-4's UNet on pokemon-blip-captions: the single-24-GB-GPU recipe of
# configs/pokemon.yaml, launched with accelerate. Extra arguments pass through to train_text_to_image.py:
#   bash train.sh --max_train_steps 1000
#   bash train.sh --config configs/pokemon-lowmem.yaml          # 12 GB GPUs
#   bash train.sh --config configs/tiny.yaml                    # offline, CPU, tiny model (make demo)
#   ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml bash train.sh
set -euo pipefail
cd "$(dirname "$0")"
accelerate_config=${ACCELERATE_CONFIG:-configs/accelerate/single_gpu.yaml}
exec accelerate launch --config_file "$accelerate_config" train_text_to_image.py --config configs/pokemon.yaml "$@"
