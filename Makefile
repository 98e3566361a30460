# kprune — set-up, tests, benchmarks and experiments.
# Every target creates the virtual environment with pinned packages if it is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_USE_LEGACY_KERAS := 1

.PHONY: install test test-distributed test-fast bench demo data-synth baseline prune-yolov2-coco5 prune-yolov4-tiny-coco5 prune-yolov2-kitti clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	# MediaPipe's metadata writer for phone-ready exports; its own pins clash with TensorFlow's (kprune/export/metadata.py)
	$(PY) -m pip install --quiet --no-deps mediapipe==0.10.21
	touch $@

# two test processes: most of a tiny test's time is single-threaded Python (tracing, building)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not distributed"

# the Ray dispatch of experiments on a local two-worker cluster (its own target: about 80 s)
test-distributed: $(STAMP)
	$(PY) -m pytest -q -m distributed

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not distributed"

bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench-results.json

# The synthetic dataset, written in the official COCO layout, then converted like real COCO.
SYNTH_RAW ?= data/synth-coco
SYNTH ?= data/synth
data-synth: $(STAMP)
	$(PY) -m data_tools synth --out $(SYNTH_RAW)
	$(PY) -m data_tools coco --coco-dir $(SYNTH_RAW) --classes all --out $(SYNTH)

# YOLOv2 (width 0.25, trained at 320 px, run at 384) on the synthetic data, under 10 minutes; runs/synth-baseline/metrics.json
baseline: data-synth
	$(PY) -m kprune.retrain --config experiments/synth_baseline.yaml --dataset $(SYNTH)

# synthetic data -> baseline -> pruning sweep -> retraining -> int8 export -> runs/demo/report.md
demo: data-synth
	$(VENV)/bin/kprune experiment experiments/demo.yaml

# The real experiments: Darknet's COCO weights, COCO 2017 or KITTI in their official layouts.
COCO_DIR ?= data/coco
KITTI_DIR ?= data/kitti-object
YOLOV2_WEIGHTS := weights/yolov2.weights

$(YOLOV2_WEIGHTS):
	@echo "error: $@ is missing: YOLOv2's COCO weights in Darknet format (about 204 MB) come from" >&2
	@echo "  https://pjreddie.com/media/files/yolov2.weights  -- e.g. mkdir -p weights && curl -L -o $@ <that URL>" >&2
	@exit 1

data/coco5/dataset.json: | $(STAMP)
	$(PY) -m data_tools coco --coco-dir $(COCO_DIR) --out data/coco5

data/kitti/dataset.json: | $(STAMP)
	$(PY) -m data_tools kitti --kitti-dir $(KITTI_DIR) --out data/kitti

# L1 filter pruning of YOLOv2 on horse, bear, zebra, cow, giraffe -> runs/yolov2-coco5/report.md
prune-yolov2-coco5: $(STAMP) $(YOLOV2_WEIGHTS) data/coco5/dataset.json
	$(VENV)/bin/kprune experiment experiments/yolov2_coco5.yaml

YOLOV4_TINY_WEIGHTS := weights/yolov4-tiny.weights

$(YOLOV4_TINY_WEIGHTS):
	@echo "error: $@ is missing: YOLOv4-tiny's COCO weights from the AlexeyAB fork (about 24 MB) come from" >&2
	@echo "  https://github.com/AlexeyAB/darknet/releases/download/darknet_yolo_v4_pre/yolov4-tiny.weights" >&2
	@echo "  -- e.g. mkdir -p weights && curl -L -o $@ <that URL>" >&2
	@exit 1

# the same for YOLOv4-tiny (the fork's COCO weights) -> runs/yolov4-tiny-coco5/report.md
prune-yolov4-tiny-coco5: $(STAMP) $(YOLOV4_TINY_WEIGHTS) data/coco5/dataset.json
	$(VENV)/bin/kprune experiment experiments/yolov4_tiny_coco5.yaml

# the three retraining modes on KITTI, then iterative pruning -> runs/yolov2-kitti/report.md
prune-yolov2-kitti: $(STAMP) $(YOLOV2_WEIGHTS) data/kitti/dataset.json
	$(VENV)/bin/kprune experiment experiments/yolov2_kitti.yaml

clean:
	rm -rf runs build dist *.egg-info .pytest_cache bench-results.json bench-results.md
