# intrain: make demo | make test | make bench | make install
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean table-classification table-detection table-segmentation table-ablation tables

# Paper tables: SCALE=mini (this CPU, embedded data) or SCALE=paper (real datasets, GPUs; see README).
SCALE ?= mini
# JOBS: runs trained at once, the cores split between them.
JOBS ?= 1
TABLES := classification detection segmentation ablation

# The main job: ResNet-18 on the embedded digits (16x16: the 8x8 originals lose nothing), fp32
# and int8 with the same seed and data order, then both curves in one plot. Each call starts a
# new experiment directory.
DEMO_EPOCHS ?= 3
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)

install: $(STAMP)

# torch and torchvision first: pip takes these pinned releases from the machine's local
# wheels, so no later dependency can pull another torch. OpenMMLab last: mmcv's compiled ops
# are built once (about 20 minutes) into ~/.cache/intrain/wheels and reused after that.
$(STAMP): pyproject.toml scripts/install_openmmlab.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27"
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	bash scripts/install_openmmlab.sh $(PY)
	touch $(STAMP)

demo: install
	$(PY) train.py -m task=resnet18 dataset=digits dataset.image_size=16 numerics=fp32,int8 \
		trainer.max_epochs=$(DEMO_EPOCHS) runs_dir=runs experiment_name=$(notdir $(DEMO))
	$(PY) scripts/compare_curves.py $(DEMO)/fp32 $(DEMO)/int8
	@echo "curves: $(DEMO)/comparison.png"

test: install
	$(PY) -m pytest -q -n 2 tests

$(addprefix table-,$(TABLES)): install
	$(PY) scripts/run_table.py $(@:table-%=%) --scale $(SCALE) --jobs $(JOBS)

tables: $(addprefix table-,$(TABLES))

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
