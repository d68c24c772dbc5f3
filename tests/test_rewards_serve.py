"""The same reward app as a Ray Serve application on the session's Ray cluster (real OCR, tiny)."""

from __future__ import annotations

import re
import socket

import httpx
import pytest

from rewards.app.settings import Settings
from rewards.client import encode_png
from rewards.ocr import OcrConfig
from rewards.serve import build_serve_app
from tests.rewards_support import render_text


@pytest.mark.slow
def test_reward_app_runs_as_ray_serve_application(ray_cluster):
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_serve_app(Settings(scorers=["ocr"], ocr=OcrConfig(size="tiny")), num_cpus=1)
        serve.run(app, name="rewards", route_prefix="/", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            limits = {"max_items": 64, "max_body_bytes": 64 * 2**20, "max_image_pixels": 4096 * 4096}
            ready = http.get("/readyz").json()
            ocr_version = ready.pop("versions")["ocr"]  # the models' names and a hash of their weights
            assert ready == {"status": "ready", "scorers": ["ocr"], "limits": limits}
            assert re.fullmatch(r"PP-OCRv6_tiny_det\+PP-OCRv6_tiny_rec#[0-9a-f]{12}", ocr_version)
            body = {"items": [{"image": encode_png(render_text("Fresh Bread")), "prompt": 'a bakery sign "Fresh Bread"'}]}
            response = http.post("/v1/rewards/ocr", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["reward"] == 1.0 and response.json()["version"] == ocr_version
            bad = http.post("/v1/rewards/ocr", json={"items": [{"image": "!!", "target": "x"}]})
            assert bad.status_code == 422 and bad.json()["error"] == "bad_base64" and bad.json()["item"] == 0
    finally:
        serve.shutdown()
