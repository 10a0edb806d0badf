# edgepipe: two commands on a fresh machine.
#   make pipeline TARGET=jetson   set up .venv (first time) and run the embedded digits pipeline
#   make test                     set up .venv (first time) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TARGET ?= jetson
CONFIG ?= digits
RUN    ?= runs/$(CONFIG)-$(TARGET)
# torch/torchvision are pinned here (not in pyproject) to the CPU-usable release this project is tested with.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# CIFAR-10 benchmark inputs (see BENCHMARKS.md); override for your own copies.
SHARED ?= ../shared

.PHONY: setup pipeline test bench report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	touch $@

pipeline: setup
	$(BIN)/edgepipe run --config $(CONFIG) --target $(TARGET) --run $(RUN)

test: setup
	$(BIN)/python -m pytest -q -rs

bench: setup
	$(BIN)/edgepipe bench --run $(RUN)

report: setup
	$(BIN)/edgepipe report --run $(RUN)

clean:
	rm -rf runs build dist *.egg-info
