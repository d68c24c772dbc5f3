"""Where the PP-OCRv6 ONNX model folders live (installed by scripts/install_ocr_models.py)."""

import os
import sys
from pathlib import Path

OCR_MODELS_ENV = "BLIP3O_RL_OCR_MODELS"


def default_ocr_models_dir() -> Path:
    """`$BLIP3O_RL_OCR_MODELS`, else `<venv>/share/blip3o-rl/ocr-models` (one copy per environment)."""
    override = os.environ.get(OCR_MODELS_ENV)
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "blip3o-rl" / "ocr-models"
