"""Async client of the reward API (what the trainer uses).

Retries with exponential backoff on connection errors, timeouts and 5xx only; a 4xx means the
request itself is wrong, so it is raised at once as `RewardRequestError` with the server's message.
Retries stop after `retries` attempts or, with `retry_budget_s`, once the service has been failing
for that long (the trainer's outage budget: a replica restart is ridden out, an outage is not).

Work bigger than one request may hold is split: the client learns the server's limits (`/readyz`,
or given by the caller), packs items into requests of at most `max_items` items and
`max_body_bytes` bytes, sends them one after the other and returns the results in item order. An
item that can never fit (an image over `max_image_pixels`, or bigger than a whole request) is a
`RewardRequestError` (413) raised before anything is sent.

Besides the OCR and GenEval routes, `score(name, images, prompts, metadatas)` speaks the generic
scorer protocol (rewards/scorer.py): `POST /v1/rewards/{name}` on the service, or, with `url=`, any
external scorer speaking it (the `http` rewards of a run's mix; its limits from its own /readyz).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from rewards.app.schemas import GenevalItemResult, Limits, OcrItemResult, Readiness, ScoreItemResult
from rewards.geneval_rules import GenevalMetadata
from rewards.scorer import EditSource


class RewardRequestError(Exception):
    """The server refused the request (4xx); `code`, `message` and `item` come from its JSON error."""

    def __init__(self, status: int, code: str, message: str, item: int | None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (item {item})" if item is not None else ""))
        self.status, self.code, self.message, self.item = status, code, message, item


class RewardServerError(Exception):
    """The server kept failing (5xx or unreachable) after every retry."""


UNVERSIONED = "unversioned"
"""The version of an answer that names none (an external scorer need not)."""


@dataclass(frozen=True)
class ScoreAnswer:
    """A generic scorer's rewards, in item order, and the version of the scorer that computed them
    (versions joined with "|" when the parts of a split request were answered by different ones)."""

    results: list[ScoreItemResult]
    version: str


_BODY_START, _BODY_SEP, _BODY_END = b'{"items": [', b", ", b"]}"


def pack_items(items: list[dict], limits: Limits) -> list[tuple[int, bytes]]:
    """JSON bodies `{"items": [...]}` holding every item once, in order, each within the limits;
    returns (index of the body's first item, body). Raises RewardRequestError for an item that
    does not fit in a request on its own."""
    bodies: list[tuple[int, bytes]] = []
    first, encoded = 0, []
    empty = len(_BODY_START) + len(_BODY_END)
    size = empty
    for index, item in enumerate(items):
        raw = json.dumps(item).encode()
        if empty + len(raw) > limits.max_body_bytes:
            raise RewardRequestError(413, "item_too_large", f"item is {empty + len(raw)} bytes as a request; the "
                                     f"server takes at most {limits.max_body_bytes} (max_body_bytes)", index)
        grown = size + len(raw) + (len(_BODY_SEP) if encoded else 0)
        if encoded and (len(encoded) == limits.max_items or grown > limits.max_body_bytes):
            bodies.append((first, _BODY_START + _BODY_SEP.join(encoded) + _BODY_END))
            first, encoded, grown = index, [], empty + len(raw)
        encoded.append(raw)
        size = grown
    if encoded:
        bodies.append((first, _BODY_START + _BODY_SEP.join(encoded) + _BODY_END))
    return bodies


def check_pixels(images: list[np.ndarray], limits: Limits) -> None:
    """The server refuses an image over `max_image_pixels`: say so before encoding anything."""
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        if height * width > limits.max_image_pixels:
            raise RewardRequestError(413, "image_too_large", f"image is {width}x{height}, more than the server's "
                                     f"max_image_pixels ({limits.max_image_pixels})", index)


def encode_png(image: np.ndarray) -> str:
    """uint8 RGB [H, W, 3] -> base64 PNG (lossless, so the server scores exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


class RewardClient:
    """`async with RewardClient(url) as client: await client.ocr(images, prompts=...)`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        retry_budget_s: float | None = None,
        max_backoff_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: Limits | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s, transport=transport)
        self.retries = retries
        self.backoff_s = backoff_s
        self.retry_budget_s = retry_budget_s
        self.max_backoff_s = max_backoff_s
        self._limits = limits
        """The server's request limits; None: asked from /readyz before the first request."""
        self.failures: list[str] = []
        """Every failed attempt (retried or not), oldest first: what the caller logs."""

    async def __aenter__(self) -> "RewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def readiness(self) -> Readiness:
        """The server's /readyz: its scorers and limits (waits, retrying, while it loads)."""
        return Readiness.model_validate(await self._send("GET", "/readyz"))

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = (await self.readiness()).limits
        return self._limits

    async def ocr(
        self, images: list[np.ndarray], *, prompts: list[str] | None = None, targets: list[str] | None = None
    ) -> list[OcrItemResult]:
        """OCR rewards; give the prompts (target in double quotes) or the targets themselves."""
        if (prompts is None) == (targets is None):
            raise ValueError("give exactly one of prompts or targets")
        key, texts = ("prompt", prompts) if prompts is not None else ("target", targets)
        check_pixels(images, await self.limits())
        items = [{"image": encode_png(image), key: text} for image, text in zip(images, texts, strict=True)]
        return [OcrItemResult.model_validate(r) for r in await self.post_items("/v1/rewards/ocr", items)]

    async def geneval(self, images: list[np.ndarray], metadatas: list[GenevalMetadata]) -> list[GenevalItemResult]:
        """GenEval correctness and graded reward of each image for its metadata line."""
        check_pixels(images, await self.limits())
        items = [
            {"image": encode_png(image), "metadata": m.model_dump(by_alias=True, exclude_none=True)}
            for image, m in zip(images, metadatas, strict=True)
        ]
        return [GenevalItemResult.model_validate(r) for r in await self.post_items("/v1/rewards/geneval", items)]

    async def score(self, name: str, images: list[np.ndarray], prompts: list[str], metadatas: list[dict],
                    *, url: str | None = None, sources: list[EditSource | None] | None = None) -> ScoreAnswer:
        """Rewards from a generic scorer (rewards/scorer.py protocol): `POST /v1/rewards/{name}` on
        this client's service, or, with `url`, `POST {url}` itself (an external scorer speaking the
        same protocol). Edits: `sources` gives each image's source image and mask (sent as
        `source_image` and `mask`). Split into requests within the limits, results in item order."""
        check_pixels(images, await self.limits())
        items = [{"image": encode_png(image), "prompt": prompt, "metadata": metadata}
                 for image, prompt, metadata in zip(images, prompts, metadatas, strict=True)]
        for item, source in zip(items, sources or [None] * len(items), strict=True):
            if source is not None:
                item["source_image"] = encode_png(source.image)
                if source.mask is not None:
                    item["mask"] = encode_png(source.mask.astype(np.uint8) * 255)
        answers = await self._post_parts(url or f"/v1/rewards/{name}", items)
        results = [ScoreItemResult.model_validate(r) for answer in answers for r in answer["results"]]
        versions = sorted({str(answer.get("version") or UNVERSIONED) for answer in answers})
        return ScoreAnswer(results, "|".join(versions))

    async def scorer_limits(self, default: Limits) -> Limits:
        """An external scorer's request limits: the `limits` of its `/readyz` (at this client's base
        URL) when it answers one, else `default` (a scorer without /readyz, or without limits in it)."""
        try:
            answer = await self._send("GET", "/readyz")
        except RewardRequestError:  # 404 and friends: it has no /readyz
            return default
        try:
            return Limits.model_validate(answer["limits"])
        except (KeyError, TypeError, ValueError):
            return default

    async def post_items(self, path: str, items: list[dict]) -> list[dict]:
        """POST `{"items": items}` as requests that fit the server's limits; the results in item order."""
        return [result for answer in await self._post_parts(path, items) for result in answer["results"]]

    async def _post_parts(self, path: str, items: list[dict]) -> list[dict]:
        """The answers of the requests `items` were split into, in order; each answer holds exactly
        its part's results (a scorer answering another count is an error, never shifted rows)."""
        parts = pack_items(items, await self.limits())
        ends = [first for first, _ in parts[1:]] + [len(items)]
        answers: list[dict] = []
        for (first, body), end in zip(parts, ends):
            try:
                answer = await self._send("POST", path, body)
            except RewardRequestError as error:  # name the item in the caller's list, not in the part
                item = error.item + first if error.item is not None else None
                raise RewardRequestError(error.status, error.code, error.message, item) from None
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list) or len(results) != end - first:
                raise RewardServerError(f"{path} answered {len(results) if isinstance(results, list) else 'no'} "
                                        f"results for {end - first} items")
            answers.append(answer)
        return answers

    async def post(self, path: str, payload: dict) -> dict:
        """POST one JSON payload as it is (no splitting)."""
        return await self._send("POST", path, json.dumps(payload).encode())

    async def _send(self, method: str, path: str, content: bytes | None = None) -> dict:
        """One request; retry 5xx / connection failures with backoff, raise 4xx at once."""
        headers = {"Content-Type": "application/json"} if content is not None else {}
        first_failure_at = None
        for attempt in itertools.count():
            try:
                response = await self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as error:  # connect, read, timeouts
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code < 500:
                    raise _request_error(response)
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
            self.failures.append(failure)
            first_failure_at = first_failure_at or time.monotonic()
            failing_for = time.monotonic() - first_failure_at
            delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            if self.retry_budget_s is not None and failing_for + delay > self.retry_budget_s:
                raise RewardServerError(
                    f"{path} at {self._http.base_url} kept failing for {failing_for:.0f} s ({attempt + 1} attempts, "
                    f"retry budget {self.retry_budget_s:.0f} s); last: {failure}")
            if self.retry_budget_s is None and attempt >= self.retries:
                raise RewardServerError(f"{path} failed after {attempt + 1} attempts; last: {failure}")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _request_error(response: httpx.Response) -> RewardRequestError:
    try:
        body = response.json()
        return RewardRequestError(response.status_code, body["error"], body["message"], body.get("item"))
    except (ValueError, KeyError, TypeError):
        return RewardRequestError(response.status_code, "http_error", response.text[:200], None)
