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
# CIFAR-10 benchmark inputs (see BENCHMARKS.md); override for your own copies:
#   make bench DATA=/path/to/cifar10-imagefolder TEACHER=/path/to/resnet56.pt2
SHARED ?= ../shared
DATA ?= $(SHARED)/datasets/cifar10
TEACHER ?= $(SHARED)/teachers/resnet56_cifar10.pt2
BENCH_RUN ?= runs/cifar10-bench

.PHONY: setup setup-bench setup-text pipeline test test-gpu gpu-check bench bench-shapes bench-frontier bench-detection bench-sweep bench-unlabeled bench-text bench-data bench-students bench-run report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	touch $@

# The benchmark also needs NNCF (post-training quantization baselines).
setup-bench: $(VENV)/.installed-bench

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -e '.[bench]'
	touch $@

setup-text: $(VENV)/.installed-text

$(VENV)/.installed-text: $(VENV)/.installed-bench
	$(BIN)/pip install -e '.[bench,text]'
	touch $@

pipeline: setup
	$(BIN)/edgepipe run --config $(CONFIG) --target $(TARGET) --run $(RUN)

test: setup
	$(BIN)/python -m pytest -q -rs

# The tests that need a CUDA device (they skip elsewhere), and the whole GPU verification (under 10 minutes on one
# GPU; see README "Training on a GPU").
test-gpu: setup
	$(BIN)/python -m pytest -q -rs -m gpu

gpu-check: setup
	BIN=$(BIN) SHARED=$(SHARED) bash tests/gpu_check.sh

# CIFAR-10: the recipe and its baselines, measured side by side -> BENCHMARKS.md/.json/.png (resumable).
bench: setup-bench
	$(BIN)/edgepipe compare --config configs/cifar10.yaml --target intel-xeon-amx --device jetson \
		--data $(DATA) --teacher $(TEACHER) --run $(BENCH_RUN) --out .

# Which student shape meets the throughput bars on this CPU (before training any): each shape's NNCF INT8 graph against
# the teacher's FP32 and INT8 graphs, OpenVINO, batch 64, alternating rounds -> BENCHMARKS.md's student-shapes section.
SHAPES ?= 20:16,32,64 20:16,32,48 20:12,24,48 20:16,32,32 20:16,16,32 14:16,32,64 14:16,32,48 8:16,32,64
bench-shapes: setup-bench
	$(BIN)/python -m edgepipe.measure.shapes --teacher $(TEACHER) $(foreach s,$(SHAPES),--shape $(s)) \
		--target intel-xeon-amx --out BENCHMARKS.md --json BENCHMARKS-shapes.json

# The recipes tried for the stretch bar (issue 28), accuracy against throughput -> BENCHMARKS.md's frontier section and
# BENCHMARKS-frontier.png, read from their run folders (FRONTIER_RUNS; each recipe run as make bench runs it, e.g.
# `edgepipe compare --config configs/cifar10-e16.yaml ... --run runs/cifar10-e16 --out runs/cifar10-e16/benchmark`),
# their speed from bench-shapes (BENCHMARKS-shapes.json).
FRONTIER_RUNS ?= $(BENCH_RUN)
bench-frontier: setup
	$(BIN)/python -m edgepipe.reporting.frontier $(foreach r,$(FRONTIER_RUNS),--run $(r)) --shapes BENCHMARKS-shapes.json \
		--teacher-metrics $(firstword $(FRONTIER_RUNS))/teacher/metrics.json --out BENCHMARKS.md

# BCCD detection (issue 27): a Faster R-CNN teacher trained here (its time reported apart), an SSD student distilled
# (KD gain over 3 seeds), pruned, INT8, every row in OpenVINO -> the detection section of BENCHMARKS.md and
# BENCHMARKS-detection.json/.png (resumable). Measured 2026-12-06 on a 2-core Intel Xeon with AMX: see BENCHMARKS.md.
DETECTION_DATA ?= $(SHARED)/datasets/bccd
DETECTION_RUN ?= runs/bccd-bench
bench-detection: setup-bench
	$(BIN)/edgepipe compare --config configs/bccd.yaml --target intel-xeon-amx --data $(DETECTION_DATA) \
		--run $(DETECTION_RUN) --seeds 3 --out .

# SST-2 text classification (issue 29): all-MiniLM-L6-v2 fine-tuned here as the teacher, a 3-layer student distilled
# (logits, hidden states, attention), pruned (vocabulary, heads, FFN width, hidden size), INT8 QAT, OpenVINO; rows
# teacher-fp32, teacher-int8 (NNCF PTQ), scratch-same-init, distilled, pruned, final -> the text section of
# BENCHMARKS.md and BENCHMARKS-text.json/.png (resumable). Needs the text extra (transformers, tokenizers).
TEXT_RUN ?= runs/sst2-bench
TEXT_SEEDS ?= 2
bench-text: setup-text
	$(BIN)/edgepipe compare --config configs/sst2.yaml --target intel-xeon-amx --run $(TEXT_RUN) --seeds $(TEXT_SEEDS) \
		--out .

# Distillation studies on CIFAR-10 (issue 28), each `edgepipe sweep` on a ResNet-8 from the shipped ResNet-56, choices on
# 2,000 held-out training images, 3 seeds, written as sections of BENCHMARKS.md (resumable: finished trials are reused):
# temperature x alpha; DKD vs KD; a teacher assistant (ResNet-20) vs direct; direct at more epochs (the chain's compute);
# feature hints vs KD; then the table of every method against its reference (edgepipe.reporting.methods: paired by
# seed, compute per trial, a verdict only beyond the seed spread). bench-unlabeled: 4,000 labelled images with and
# without the other 46,000 unlabeled, 2 seeds.
SWEEP_RUN ?= runs/cifar10-sweep
TA_CHAIN = assistant-vs-direct:distill.assistants=[{arch: cifar_resnet, kwargs: {depth: 20, width: 16, num_classes: 10}}]
SWEEP = $(BIN)/edgepipe sweep --config configs/cifar10-sweep.yaml --target intel-xeon-amx --run $(SWEEP_RUN) --seeds 3 \
	--into BENCHMARKS.md
bench-sweep: setup
	$(SWEEP) --set distill.temperature=1,2,4,8 --set distill.alpha=0.5,0.9,1.0 --study temperature-alpha \
		--title "temperature x alpha, ResNet-8 student"
	$(SWEEP) --set distill.loss=kd,dkd --study dkd-vs-kd --title "decoupled KD (DKD, alpha 1, beta 8) vs KD at equal epochs"
	$(SWEEP) --set 'distill.assistants=[],[{arch: cifar_resnet, kwargs: {depth: 20, width: 16, num_classes: 10}}]' \
		--study assistant-vs-direct --title "teacher assistant (ResNet-56 -> ResNet-20 -> ResNet-8) vs direct"
	$(SWEEP) --set distill.optim.epochs=4,12,14 --study direct-epochs \
		--title "direct distillation at 4, 12 and 14 epochs (the assistant chain's compute spent on student epochs instead)"
	$(BIN)/edgepipe sweep --config configs/cifar10-sweep-features.yaml --target intel-xeon-amx \
		--run $(SWEEP_RUN)-features --seeds 3 --into BENCHMARKS.md --set distill.beta=0,1 --study features-vs-kd \
		--title "feature hints (FitNets on layer3, beta 1) vs KD at equal epochs"
	$(BIN)/python -m edgepipe.reporting.methods --run $(SWEEP_RUN) --run $(SWEEP_RUN)-features --out BENCHMARKS.md \
		--compare "feature hints vs KD, equal epochs=features-vs-kd:distill.beta=1|features-vs-kd:distill.beta=0" \
		--compare "DKD vs KD, equal epochs=dkd-vs-kd:distill.loss=dkd|dkd-vs-kd:distill.loss=kd" \
		--compare "teacher assistant vs direct, equal student epochs=$(TA_CHAIN)|assistant-vs-direct:distill.assistants=[]" \
		--compare "teacher assistant vs direct at 12 epochs (no more compute)=$(TA_CHAIN)|direct-epochs:distill.optim.epochs=12" \
		--compare "teacher assistant vs direct at 14 epochs (no more compute)=$(TA_CHAIN)|direct-epochs:distill.optim.epochs=14" \
		--compare "direct 14 vs 4 epochs=direct-epochs:distill.optim.epochs=14|direct-epochs:distill.optim.epochs=4"

bench-unlabeled: setup
	$(BIN)/edgepipe sweep --config configs/cifar10-unlabeled.yaml --target intel-xeon-amx --run runs/cifar10-unlabeled \
		--set data.unlabeled=null,rest --seeds 2 --study unlabeled --into BENCHMARKS.md \
		--title "4,000 labelled images, without and with the other 46,000 unlabeled (the shipped teacher was trained on all 50,000 labels)"

# Data loading: peak memory and images/s of one distillation epoch on synthetic ImageFolders of 10k, 50k and
# 200k 64x64 images, streamed and in memory -> the data-loading section of BENCHMARKS.md (folders in runs/).
bench-data: setup
	$(BIN)/python -m edgepipe.data.bench --workdir runs/data-bench --out BENCHMARKS.md

# The small-input students (issue 12): MobileNetV2, ShuffleNetV2 and MobileNetV3-Small distilled from the same teacher, INT8 on
# OpenVINO, one run each under runs/ (resumable: a rerun reuses finished stages and resumes from the last
# epoch), each with its report (top-1, MACs, OpenVINO latency/throughput and the conditions they were measured
# under); then their rows go into BENCHMARKS.md's students section, beside the ResNet-20 recipe's (BENCH_RUN).
# Not part of CI: measured 2026-11-24 on a 2-core AMD EPYC (AVX-512 VNNI/BF16), ~97 min end to end for the three
# (stage wall times 31.4 + 28.5 + 28.7 min, BENCHMARKS.md). The recipes read ../shared (data.path, teacher.model.program).
STUDENTS ?= cifar10-mobilenetv2 cifar10-shufflenetv2 cifar10-mobilenetv3
bench-students: setup
	for recipe in $(STUDENTS); do \
		$(BIN)/edgepipe run --config configs/$$recipe.yaml --target intel-xeon-amx --run runs/$$recipe || exit 1; \
	done
	$(BIN)/python -m edgepipe.reporting.benchmarks students $(foreach r,$(STUDENTS),--run runs/$(r)) --reference $(BENCH_RUN) \
		--out BENCHMARKS.md

# Every stage artifact of one run across runtimes, dtypes and batch sizes -> $(RUN)/bench/.
bench-run: setup
	$(BIN)/edgepipe bench --run $(RUN)

report: setup
	$(BIN)/edgepipe report --run $(RUN)

clean:
	rm -rf runs build dist *.egg-info
