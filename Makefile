# Set-up and the two everyday commands. Everything runs inside .venv/ at the repository root.
#   make demo   set up, write the tiny world's data, fine-tune its shipped stock model, score stock against
#               fine-tuned with metrics.py, then serve both in gradio_app.py (CPU, no network; docs/tinyworld.md)
#   make test   set up and run the whole test suite (offline; CI's, after make lint)
#               (586 tests in 17 min 59 s on a fresh clone of the 2-core build machine, 2026-12-08)
#   make test-quick   the suite without the tests marked slow, for the edit loop
#               (552 tests, 4 min 34 s of the same run's per-test times, 2026-12-08; README's Tests)
#   make lint   ruff (style, unused names, import order) and lint-imports (the rooms' import direction)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build on machines that ship it; on a GPU machine: make TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo lint test test-quick clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-serve.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

TINY_DATA := data/tinyworld/pokemon/heldout/metadata.jsonl  # the last split written
TINY_MODEL := outputs/tiny-finetuned/README.md
TINY_REPORT := outputs/tiny-metrics/report.json

$(TINY_DATA): | setup
	$(BIN)/python -m tinyworld.datasets data/tinyworld

# the model card is the trainer's last file: an interrupted run is resumed (resume_from_checkpoint: latest), not skipped
# accelerate launch gives a process one thread unless told otherwise (right for one process per GPU); the CPU demo is
# one process, which trains about 1.5x faster with every core
$(TINY_MODEL): $(TINY_DATA)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(getconf _NPROCESSORS_ONLN)} \
	  bash train.sh --config configs/tiny.yaml

# metrics.py writes its report under a temporary name and renames it when complete
$(TINY_REPORT): $(TINY_MODEL)
	$(BIN)/python metrics.py --models configs/models-tiny.yaml --prompts configs/tiny_prompts.txt \
	  --clip_model_name_or_path tinyworld/clip --num_images_per_prompt 12 --output_dir outputs/tiny-metrics \
	  --reference_images data/tinyworld/pokemon/heldout

demo: setup $(TINY_REPORT)
	$(BIN)/python gradio_app.py --models configs/models-tiny.yaml

# one process on every core: pytest-xdist with two one-thread workers was measured slower on the 2-core build
# machine (639 s with the tiny world's fine-tune first, 609 s with it last on both cores, against 555-619 s),
# as two processes there do little more work than one with two threads, and the fine-tune alone takes half the suite
test: setup
	$(BIN)/python -m pytest -q tests

# `slow` (pyproject.toml): training processes, a Ray cluster, an inductor compile, the tiny world's fine-tune and
# quality checks. What is left covers every module in seconds a test.
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean-demo:
	rm -rf data/tinyworld outputs/tiny-finetuned outputs/tiny-metrics
