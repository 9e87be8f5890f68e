# Set-up and the two everyday commands. Everything runs inside .venv/ at the repository root.
#   make demo   set up, build the offline tiny model and data, fine-tune it (CPU, no network)
#   make test   set up and run the test suite (offline)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build on machines that ship it; on a GPU machine: make TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

data/tiny/pipeline/model_index.json: | setup
	$(BIN)/python -m sdtune.tiny pipeline data/tiny/pipeline

data/tiny/shapes/metadata.jsonl: | setup
	$(BIN)/python -m sdtune.tiny dataset data/tiny/shapes --count 64

demo: setup data/tiny/pipeline/model_index.json data/tiny/shapes/metadata.jsonl
	PATH="$(CURDIR)/$(BIN):$$PATH" bash train.sh --config configs/tiny.yaml

test: setup
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf data/tiny outputs/tiny-finetuned
