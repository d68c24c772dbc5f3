#!/usr/bin/env bash
# The README's main job. Until the trainer lands this runs the parts that exist.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/blip3o-rl make-tiny runs/models/tiny-glyph --preset glyph
.venv/bin/blip3o-rl make-tiny runs/models/tiny-sana --preset sana
