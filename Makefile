# One-command set-up on a fresh clone:
#   make demo   installs phenoscope and runs the main job on a generated sample (writes out/demo/)
#   make test   installs phenoscope with the test extra and runs the default test suite
PY ?= python3
# torch: keep an installed one; else prefer a local CPU-only wheel (no CUDA download), else PyPI's.
TORCH_LOCAL ?= torch==2.13.0+cpu

.PHONY: install install-test demo test test-slow bench

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_LOCAL)" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e .

# napari's OpenGL canvas runs headless on a virtual X server (pytest-xvfb starts Xvfb); Qt's xcb
# platform needs these Debian libraries. Installed only where one is missing and apt-get exists (as root).
GUI_DEBS ?= xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 \
	libxcb-randr0 libxcb-shape0 libxcb-xkb1 libxcb-cursor0 libxkbcommon-x11-0 libgl1-mesa-dri libegl1

install-test: install
	@dpkg -s $(GUI_DEBS) >/dev/null 2>&1 || ! command -v apt-get >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GUI_DEBS) >/dev/null; }
	$(PY) -m pip install -q -e ".[test,napari,bioimageio]"
	# dinov2 (parity reference for checkpoint import) pins torch==2.0.0; its forward runs on ours.
	$(PY) -m pip install -q --no-deps "dinov2==0.0.1.dev2"

demo: install
	$(PY) -m phenoscope demo --out out/demo

test: install-test
	$(PY) -m pytest -q

test-slow: install-test
	$(PY) -m pytest -q -m slow

bench: install-test
	$(PY) benchmarks/bench_dynamics.py
