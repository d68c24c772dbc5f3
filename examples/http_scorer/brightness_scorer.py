"""A minimal external reward scorer for blip3o-rl, speaking its generic scorer protocol: the mean
brightness of each image, in [0, 1]. Standalone: FastAPI, numpy and Pillow only, no blip3o-rl.

    cd examples/http_scorer && uvicorn brightness_scorer:app --port 9000

and in a run config (deploy/configs/*.yaml):

    rewards:
      mix:
        - {name: ocr, scorer: ocr}
        - {name: brightness, scorer: http, url: "http://127.0.0.1:9000/score", weight: 0.5, normalize: group}

The protocol (docs/rewards.md, "Your own scorer over HTTP"):
    POST /score   {"items": [{"image": "<base64 PNG>", "prompt": "...", "metadata": {...}}, ...]}
      200  {"results": [{"reward": <float>, "details": {...}}, ...], "scorer": "...", "version": "..."}
           one result per item, in item order; `version` names the model behind the numbers;
           optional `details.regions`: [{"box": [x0, y0, x1, y1], "reward": r}] with boxes as
           fractions of the image's width and height, saying where the image is right or wrong
           (spatial credit, docs/spatial-credit.md; this example answers none)
      4xx  the request is wrong: {"error": code, "message": text, "item": index or null}; never retried
      5xx  the scorer is failing: the trainer retries with backoff for the reward's outage budget
    GET /readyz   {"status": "ready", "limits": {"max_items", "max_body_bytes", "max_image_pixels"}}
           (optional: without it the trainer sends at most the reward's `max_items` per request)
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

MAX_ITEMS = 64
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096

ScoreFunction = Callable[[list[np.ndarray], list[str], list[dict]], list[float]]
"""f(images uint8 [H, W, 3], prompts, metadatas) -> one reward per image."""


def mean_brightness(images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[float]:
    """Mean pixel value / 255: 0 for black, 1 for white (prompts and metadata are not read)."""
    return [float(image.mean() / 255.0) for image in images]


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="base64 PNG or JPEG")
    prompt: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[Item], Field(min_length=1)]


class ItemResult(BaseModel):
    reward: float
    details: dict[str, Any] = Field(default_factory=dict)


class ScoreResponse(BaseModel):
    results: list[ItemResult]
    scorer: str
    version: str


class BadRequest(Exception):
    def __init__(self, status: int, error: str, message: str, item: int | None = None):
        self.status, self.error, self.message, self.item = status, error, message, item


def decode(image: str, index: int) -> np.ndarray:
    """base64 PNG/JPEG -> uint8 RGB [H, W, 3]; a 422 naming the item otherwise."""
    try:
        data = base64.b64decode(image.split(",", 1)[-1], validate=True)
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                pixels = f"{opened.width}x{opened.height}"
                raise BadRequest(413, "image_too_large", f"{pixels} is over {MAX_IMAGE_PIXELS} pixels", index)
            return np.asarray(opened.convert("RGB"))
    except (binascii.Error, ValueError, UnidentifiedImageError) as error:
        raise BadRequest(422, "bad_image", f"not a base64 PNG/JPEG: {error}", index) from None


def create_app(score: ScoreFunction = mean_brightness, name: str = "brightness",
               version: str = "mean-brightness-1") -> FastAPI:
    """The scorer as a FastAPI app; `score` is any function of the ScoreFunction shape."""
    app = FastAPI(title=f"{name} scorer", description=__doc__)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({"error": error.error, "message": error.message, "item": error.item}, error.status)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body_too_large", "message": f"over {MAX_BODY_BYTES} bytes", "item": None}, 413)
        return await call_next(request)

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "scorers": [name], "versions": {name: version},
                "limits": {"max_items": MAX_ITEMS, "max_body_bytes": MAX_BODY_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS}}

    @app.post("/score", response_model=ScoreResponse)
    def score_items(body: ScoreRequest) -> ScoreResponse:  # a plain def: FastAPI runs it in a worker thread
        if len(body.items) > MAX_ITEMS:
            raise BadRequest(413, "too_many_items", f"{len(body.items)} items; the limit is {MAX_ITEMS}")
        images = [decode(item.image, i) for i, item in enumerate(body.items)]
        rewards = score(images, [item.prompt for item in body.items], [item.metadata for item in body.items])
        if len(rewards) != len(images) or not all(np.isfinite(rewards)):
            raise RuntimeError(f"{name} returned {rewards!r} for {len(images)} images")  # a 500: a scorer bug
        return ScoreResponse(results=[ItemResult(reward=float(r)) for r in rewards], scorer=name, version=version)

    return app


app = create_app()
