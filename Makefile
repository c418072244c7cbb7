# Two commands do everything (see README.md):
#   make run    set-up if needed -> download CIFAR-100 -> write .beton files -> train rn18.yaml
#               (make run DATASET=cifar10 CONFIG=rn18_cifar10.yaml; make run IMAGE_FOLDER=~/photos SIZE=64)
#   make test   set-up if needed -> pytest (fast tests; `make test-slow` runs the slow ones)
# More: make check (re-measure the acceptance figures), make benchmark, make speedrun, make app,
#       make export, make publish HUB_REPO=USER/NAME (the Hugging Face Hub).
# Variables: CIFAR_SOURCE=path/to/the official archive (no download), CONFIG=rn18.yaml,
#            DATASET=cifar10 (a built-in; default: the config's data.dataset),
#            IMAGE_FOLDER=DIR (your images: DIR/<class>/* or DIR/{train,val}/<class>/*) with SIZE=32
#            and NAME=<folder name>, TRAIN_ARGS='--training.epochs 2', PYTEST_ARGS='-k loader', VENV=.venv
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= rn18.yaml
CIFAR_SOURCE ?=
IMAGE_FOLDER ?=
SIZE ?= 32
NAME ?=
# the dataset to convert and train: an image folder's NAME (default: the converter's own name for
# the folder, asked once the set-up ran), else DATASET, else the config's data.dataset (read once;
# a config that does not exist leaves it to train.py to say so)
CONFIG_FILE := $(firstword $(wildcard $(CONFIG) configs/$(CONFIG) configs/$(CONFIG).yaml))
CONFIG_DATASET := $(if $(CONFIG_FILE),$(shell awk '/^data:/{d=1;next} /^[^ \#]/{d=0} d && $$1=="dataset:"{print $$2; exit}' $(CONFIG_FILE) </dev/null 2>/dev/null))
FOLDER_NAME = $(or $(NAME),$(shell $(PY) -c 'import sys; from pathlib import Path; from ffcv_pipeline.folder import default_name; print(default_name(Path(sys.argv[1])))' "$(IMAGE_FOLDER)"))
DATASET ?= $(if $(IMAGE_FOLDER),$(FOLDER_NAME),$(CONFIG_DATASET))
TRAIN_ARGS ?=
PYTEST_ARGS ?=
export VENV

.PHONY: run setup data train test test-slow check benchmark speedrun app clean-venv
run: train

setup:
	@bash scripts/setup.sh

data: setup
ifneq ($(IMAGE_FOLDER),)
	$(PY) scripts/write_datasets.py --image-folder "$(IMAGE_FOLDER)" $(if $(NAME),--name "$(NAME)") --size $(SIZE)
else
	$(PY) scripts/write_datasets.py $(if $(DATASET),--dataset $(DATASET)) $(if $(CIFAR_SOURCE),--source "$(CIFAR_SOURCE)")
endif

train: data
	$(PY) scripts/train.py --config $(CONFIG) $(if $(DATASET),--data.dataset $(DATASET)) $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

check: data
	$(PY) scripts/check_figures.py

benchmark: data
	$(PY) scripts/benchmark.py

app: setup
	$(PY) app/app.py

clean-venv:
	rm -rf $(VENV)

# make export: the newest runs/*/best.pt (or CHECKPOINT=...) -> a torch-free Space folder in
# dist/space (EXPORT_DIR=...); EXPORT_ARGS='--onnx' for model.pt + model.onnx only.
.PHONY: export
CHECKPOINT ?= $(shell ls -t runs/*/best.pt 2>/dev/null | head -n 1)
EXPORT_DIR ?= dist/space
EXPORT_ARGS ?= --onnx --space
export: setup
	@test -n "$(CHECKPOINT)" || { echo "error: no runs/*/best.pt; train one (make run) or give CHECKPOINT=path" >&2; exit 2; }
	$(PY) scripts/export.py "$(CHECKPOINT)" --out "$(EXPORT_DIR)" $(EXPORT_ARGS)

# make speedrun: rn18.yaml three times (seeds 0-2): time to 73% as a mean over runs
SPEEDRUN_ARGS ?= --runs 3
speedrun: data
	$(PY) scripts/speedrun.py --config $(CONFIG) $(SPEEDRUN_ARGS)

# make publish HUB_REPO=USER/NAME: the newest runs/*/best.pt (or CHECKPOINT=...) as a Gradio Space
# (the torch-free ONNX app) and a model repository (model.safetensors, config.json, model.onnx,
# the model card), both USER/NAME on the Hugging Face Hub; HUB_MODEL=OTHER/NAME names the model
# repository apart, HUB_MODEL= (empty) skips it. Written first to dist/hub/; log in before
# (`$(VENV)/bin/hf auth login`, or HF_TOKEN). PUBLISH_ARGS='--private' and the like go to export.py.
.PHONY: publish
HUB_REPO ?=
HUB_MODEL ?= $(HUB_REPO)
PUBLISH_ARGS ?=
publish: setup
	@test -n "$(HUB_REPO)" || { echo "error: give HUB_REPO=USER/NAME (the Space to create or update)" >&2; exit 2; }
	@test -n "$(CHECKPOINT)" || { echo "error: no runs/*/best.pt; train one (make run) or give CHECKPOINT=path" >&2; exit 2; }
	$(PY) scripts/export.py "$(CHECKPOINT)" --push-to-hub "$(HUB_REPO)" $(if $(HUB_MODEL),--hub-model "$(HUB_MODEL)") $(PUBLISH_ARGS)
