# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-slow lint bench clean readme-table

$(VENV)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU wheel: plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,onnx]'
	touch $@

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(VENV)/bin/lcs train --regime unstructured --method lcs_l --model cpreresnet20 --data digits --out runs/demo
	$(VENV)/bin/lcs eval runs/demo
	-$(PY) tools/readme_demo_table.py --check runs/demo/eval.json

readme-table: $(VENV)/.installed
	test -f runs/demo/eval.json || $(MAKE) demo
	$(PY) tools/readme_demo_table.py --write runs/demo/eval.json

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
