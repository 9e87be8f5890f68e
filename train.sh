#!/usr/bin/env bash
# Fine-tune Stable Diffusion v1-4's UNet on pokemon-blip-captions: the single-24-GB-GPU recipe of
# configs/pokemon.yaml, launched with accelerate. Extra arguments pass through to train_text_to_image.py:
#   bash train.sh --max_train_steps 1000
#   bash train.sh --config configs/pokemon-lowmem.yaml          # 12 GB GPUs
#   bash train.sh --config configs/tiny.yaml                    # offline, CPU, tiny model (make demo)
#   ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml bash train.sh
set -euo pipefail
cd "$(dirname "$0")"
# The repository's .venv (made by `make setup`) unless another environment is active (a venv, or a conda env other
# than base): then that one is the user's choice.
if [ -z "${VIRTUAL_ENV:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" = base ] && [ -x .venv/bin/python ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
if ! command -v accelerate >/dev/null; then
  echo "train.sh: accelerate is not installed in $(command -v python3 || echo 'this environment'):" \
    "run make setup (it creates .venv/), or pip install -r requirements.txt in your environment." >&2
  exit 1
fi
echo "train.sh: using $(command -v python) ($(python --version 2>&1))" >&2
accelerate_config=${ACCELERATE_CONFIG:-configs/accelerate/single_gpu.yaml}
exec accelerate launch --config_file "$accelerate_config" train_text_to_image.py --config configs/pokemon.yaml "$@"
