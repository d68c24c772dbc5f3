#!/usr/bin/env bash
# One-time setup of BLIP3o-NEXT's own GRPO trainer for bench/bench_vs_upstream.py, outside our tree:
#   $UPSTREAM_DIR/blip3o-next  its source (branch BLIP3o-NEXT at $BLIP3O_NEXT_COMMIT), patched with
#                              bench/upstream/blip3o-next-cpu.patch (each change says why in the patch);
#   $UPSTREAM_DIR/venv         its own environment from bench/upstream/requirements.txt (its pins where
#                              they can be had here; ours stay untouched).
# The source comes from a git clone of github.com/JiuhaiChen/BLIP3o (any clone holding the commit):
#   git clone --bare https://github.com/JiuhaiChen/BLIP3o blip3o.git
#   BLIP3O_GIT_DIR=blip3o.git bash bench/upstream/setup.sh
# Idempotent: a stamp of the inputs' hash makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
UPSTREAM_DIR=${UPSTREAM_DIR:-/work/upstream}
GIT_DIR=${BLIP3O_GIT_DIR:-/work/.mirror/JiuhaiChen+BLIP3o/repo}
BLIP3O_NEXT_COMMIT=6ced364eeee8b2d53e9491ffae48b00a0271cda2  # branch BLIP3o-NEXT, 2025-08-19
PY=${PYTHON:-python3.11}
SRC="$UPSTREAM_DIR/blip3o-next"
VENV="$UPSTREAM_DIR/venv"
STAMP="$UPSTREAM_DIR/.setup-stamp"
want=$({ cat requirements.txt blip3o-next-cpu.patch setup.sh; echo "$BLIP3O_NEXT_COMMIT"; } | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "upstream setup: $UPSTREAM_DIR is up to date"
  exit 0
fi
git --git-dir="$GIT_DIR" cat-file -e "$BLIP3O_NEXT_COMMIT^{commit}" 2>/dev/null || {
  echo "upstream setup: commit $BLIP3O_NEXT_COMMIT not in $GIT_DIR" \
       "(set BLIP3O_GIT_DIR to a clone of JiuhaiChen/BLIP3o)" >&2
  exit 2
}
mkdir -p "$UPSTREAM_DIR"
rm -rf "$SRC.tmp"
mkdir -p "$SRC.tmp"
# File by file, not `git archive`: a partial mirror may lack large binaries (figures, the OCR prompt
# list trl/ocr_train.txt); none of them is code the trainer runs. Those missing are listed.
git --git-dir="$GIT_DIR" ls-tree -r "$BLIP3O_NEXT_COMMIT" | while read -r _mode _type sha path; do
  if git --git-dir="$GIT_DIR" cat-file -e "$sha" 2>/dev/null; then
    mkdir -p "$SRC.tmp/$(dirname "$path")"
    git --git-dir="$GIT_DIR" cat-file blob "$sha" > "$SRC.tmp/$path"
  else
    echo "upstream setup: $path is not in $GIT_DIR (left out)"
  fi
done
patch -d "$SRC.tmp" -p1 --quiet < blip3o-next-cpu.patch
rm -rf "$SRC"
mv "$SRC.tmp" "$SRC"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools==78.1.1"
# torch from the find-links scripts/setup.sh uses (the CPU build); everything else from the registries
"$VENV/bin/python" -m pip install -q -r requirements.txt
# PyPI's torchvision builds need the CUDA torch; something may have pulled one in: the stub stands in
"$VENV/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
echo "$want" > "$STAMP"
echo "upstream setup: done ($SRC, $VENV)"
