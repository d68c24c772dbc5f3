"""The example scorer answers the protocol: rewards in item order, its version, its limits, and
JSON 4xx errors naming the bad item (so the trainer never retries them)."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from brightness_scorer import MAX_ITEMS, app


def png(value: int, size: tuple[int, int] = (8, 4)) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


client = TestClient(app)


def test_rewards_in_item_order_with_the_version():
    answer = client.post("/score", json={"items": [{"image": png(255)}, {"image": png(0), "prompt": "a cat"},
                                                   {"image": png(51), "metadata": {"task": "ocr"}}]})
    assert answer.status_code == 200, answer.text
    assert [r["reward"] for r in answer.json()["results"]] == [1.0, 0.0, 0.2]
    assert answer.json()["version"] == "mean-brightness-1"


def test_readyz_declares_the_limits():
    limits = client.get("/readyz").json()["limits"]
    assert limits["max_items"] == MAX_ITEMS and limits["max_body_bytes"] > 0


def test_bad_requests_are_4xx_json_naming_the_item():
    bad = client.post("/score", json={"items": [{"image": png(1)}, {"image": "not base64!"}]})
    assert bad.status_code == 422 and bad.json()["error"] == "bad_image" and bad.json()["item"] == 1
    too_many = client.post("/score", json={"items": [{"image": png(1)}] * (MAX_ITEMS + 1)})
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_items"
    assert client.post("/score", json={"items": []}).status_code == 422
