# `make demo` and `make test` bootstrap .venv on first use: torch's CPU build first, then the package.
# On a TPU VM: make install EXTRAS=tpu (PYTHON=python3.12 to pick an interpreter; 3.11 to 3.14 work)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test
# torch only traces the model code here, so its CPU build is all a TPU host needs: PyPI's default Linux wheel
# is the CUDA one (several GB). Elsewhere the default index (or a local wheel) serves torch.
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(findstring tpu,$(EXTRAS)),$(CPU_TORCH_INDEX))
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced 2.13.0')"
	touch $@

demo: install
	$(PY) stages/stage1_text_encoder.py --model_id tiny-random --prompt "A cat playing piano in a jazz club"
	$(PY) stages/stage2_transformer.py --overwrite    # the tiny model's preset: 96x64, 9 frames, 10 steps
	$(PY) stages/stage3_vae_decoder.py --preview
	$(PY) -m tpu_wan.core.report stage_outputs/metrics.json --output stage_outputs/report.md
	$(PY) generate_flax.py --model_id tiny-random --prompt "A cat playing piano in a jazz club" \
		--output_video stage_outputs/one_process/video.mp4 --num_iterations 2
	$(PY) generate_flax.py --model_id tiny-random --topology v6e-8 --compile_only \
		--compile_stages text_encoder transformer --metrics stage_outputs/compile_v6e-8.json    # no TPU needed

# Two workers, each test file on one worker (its module fixtures load models once).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) stage_outputs/*
