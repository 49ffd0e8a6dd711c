# intrain: make demo | make test | make bench | make install | make install-openmmlab
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per layer: the core (classification, the demo) and OpenMMLab (detection, segmentation).
STAMP := $(VENV)/.installed
MM_STAMP := $(VENV)/.installed-openmmlab

.PHONY: install install-openmmlab demo test bench clean table-classification table-detection \
	table-segmentation table-ablation tables

# Paper tables: SCALE=mini (this CPU, embedded data) or SCALE=paper (real datasets, GPUs; see README).
SCALE ?= mini
# JOBS: runs trained at once, the cores split between them.
JOBS ?= 1
# LAUNCHER: local (each run one process here), torchrun (one process per GPU of the row) or slurm
# (one Slurm job per run; PARTITION=<name> picks the partition).
LAUNCHER ?= local
PARTITION ?=
TABLES := classification detection segmentation ablation

# The main job: ResNet-18 on the embedded digits (16x16: the 8x8 originals lose nothing), fp32
# and int8 with the same seed and data order, then both curves in one plot. Each call starts a
# new experiment directory.
DEMO_EPOCHS ?= 2
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)

install: $(STAMP)

# torch and torchvision first: pip takes these pinned releases from the machine's local
# wheels, so no later dependency can pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27"
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# mmcv's compiled ops are built once (about 20 minutes on 2 cores) into ~/.cache/intrain/wheels
# and reused after that; the script does nothing when the pinned versions are already installed.
install-openmmlab: $(MM_STAMP)

$(MM_STAMP): $(STAMP) scripts/install_openmmlab.sh scripts/openmmlab-constraints.txt
	bash scripts/install_openmmlab.sh $(PY)
	touch $@

demo: install
	$(PY) train.py -m task=resnet18 dataset=digits dataset.image_size=16 numerics=fp32,int8 \
		trainer.max_epochs=$(DEMO_EPOCHS) runs_dir=runs experiment_name=$(notdir $(DEMO))
	$(PY) scripts/compare_curves.py $(DEMO)/fp32 $(DEMO)/int8
	@echo "curves: $(DEMO)/comparison.png"

# The suite covers detection and segmentation, so it needs OpenMMLab.
test: install-openmmlab
	$(PY) -m pytest -q -n 2 tests

$(addprefix table-,$(TABLES)):
	$(PY) scripts/run_table.py $(@:table-%=%) --scale $(SCALE) --jobs $(JOBS) --launcher $(LAUNCHER) \
		$(if $(PARTITION),--partition $(PARTITION))

table-classification table-ablation: install
table-detection table-segmentation: install-openmmlab

tables: $(addprefix table-,$(TABLES))

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
