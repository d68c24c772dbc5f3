"""A slow judge for blip3o-rl: an http scorer (the generic scorer protocol) that asks a vision-language
model served by vLLM's OpenAI-compatible server for a 0-5 score of each image against its prompt.

Edit-R1's judge recipe (PKU-YuanGroup/Edit-R1, reward_server/reward_server.py, `_vllm_evaluate`):
the judge reads the image and a prompt template asking for one digit; the reward is the expected
digit under the judge's first generated token, divided by 5:

    p_d    = exp(logprob(d)) / sum_{d' in D} exp(logprob(d')),   D = the digits "0".."5" found
    reward = sum_{d in D} d * p_d / 5                                                  in [0, 1]

Edit-R1 softmaxes the six digits' raw logits; through the OpenAI API we get the first token's top
`top_logprobs` (20, vLLM's default cap) and renormalise over the digits among them. Both share one
log-normaliser, so the two agree exactly when all six digits are in the top 20; a digit outside it
carries less mass than each of the 20 above it and is left out. When none of the six is in the top
20 (the judge answered off-format) the reward is `no_digit_reward` (0.0, as Edit-R1 answers 0.0 when
it gets no logits) and `details.digits_found` is 0, so such rows can be counted. An edit item's
`source_image` goes to the judge before `image` (Edit-R1's order; serve the judge with
`--limit-mm-per-prompt '{"image": 2}'` and give it a template that speaks of two images).

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --max-model-len 4096 --limit-mm-per-prompt '{"image": 1}'
    cd examples/vlm_judge && VLM_JUDGE_URL=http://127.0.0.1:8000 uvicorn vlm_judge:app --port 9100

and in a run config: `{name: judge, scorer: http, url: "http://127.0.0.1:9100/score", max_items: 32}`
(README.md beside this file). Standalone: FastAPI, httpx and Pillow only, no blip3o-rl.

Protocol (docs/rewards.md, "Your own scorer over HTTP"): POST /score answers one result per item,
in item order, with `details.judge_latency_s` (the judge's own wall time for that item), the digit
probabilities and the expected digit; 4xx for a bad request (never retried), 503 when the judge
is unreachable or failing (the trainer retries for the reward's outage budget). GET /readyz gives
the limits and checks the judge answers; GET /stats the judge's latency percentiles so far.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import math
import os
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

DIGITS = ("0", "1", "2", "3", "4", "5")
MAX_SCORE = 5
PROMPT_FILE = Path(__file__).with_name("prompt.txt")


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how to ask it; `from_env` reads them from VLM_JUDGE_<FIELD>."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the vLLM OpenAI server (POST {url}/v1/chat/completions)."""
    model: str = ""
    """The served model name; empty: the first model the server lists at /v1/models."""
    api_key: str = ""
    """Bearer token of the vLLM server (`vllm serve --api-key`); empty: none."""
    prompt_file: Path = PROMPT_FILE
    """The prompt template; `{prompt}` is replaced by the item's prompt."""
    top_logprobs: int = 20
    """Top logprobs asked for the first token (vLLM's --max-logprobs caps it, 20 by default)."""
    no_digit_reward: float = 0.0
    """The reward when no digit "0".."5" is among the first token's top logprobs."""
    timeout_s: float = 120.0
    """Per judge request."""
    max_concurrency: int = 64
    """Judge requests in flight at once (vLLM batches them)."""
    max_items: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> JudgeSettings:
        environ = os.environ if environ is None else environ
        values = {name: type(getattr(cls, name))(environ[f"VLM_JUDGE_{name.upper()}"])  # the default's type
                  for name in cls.__dataclass_fields__ if f"VLM_JUDGE_{name.upper()}" in environ}
        return cls(**values)


@dataclass(frozen=True)
class DigitScore:
    """The judge's answer for one image, reduced to Edit-R1's expected digit."""

    reward: float
    """Expected digit / 5, in [0, 1]; `no_digit_reward` when no digit was found."""
    expected_digit: float | None
    """sum_d d * p_d over the digits found (None when none was)."""
    digit_probs: dict[str, float]
    """p_d renormalised over the digits found, by digit."""
    digit_mass: float
    """sum_d exp(logprob(d)): the share of the judge's first-token probability on the digits found."""


def digit_score(top_logprobs: list[tuple[str, float]], no_digit_reward: float = 0.0) -> DigitScore:
    """Edit-R1's expected score from the first token's top logprobs [(token text, logprob), ...].

    p_d = exp(lp_d - m) / sum_d' exp(lp_d' - m) over the digit tokens found (m = max lp_d, for
    stability); reward = sum_d d * p_d / 5. A token counts only if its text is exactly the digit
    (Edit-R1 reads the six digits' token ids; " 3" is another token)."""
    found = [(token, logprob) for token, logprob in top_logprobs if token in DIGITS and math.isfinite(logprob)]
    if not found:
        return DigitScore(reward=no_digit_reward, expected_digit=None, digit_probs={}, digit_mass=0.0)
    top = max(logprob for _, logprob in found)
    weights = dict.fromkeys(sorted({token for token, _ in found}), 0.0)
    for token, logprob in found:  # two tokens with the same text (a tokenizer's duplicates) add up
        weights[token] += math.exp(logprob - top)
    total = sum(weights.values())
    probs = {digit: weight / total for digit, weight in weights.items()}
    expected = sum(int(digit) * p for digit, p in probs.items())
    return DigitScore(reward=expected / MAX_SCORE, expected_digit=expected, digit_probs=probs,
                      digit_mass=sum(math.exp(logprob) for _, logprob in found))


def first_token_top_logprobs(completion: dict) -> list[tuple[str, float]]:
    """[(token, logprob), ...] of the first generated token of an OpenAI chat completion."""
    content = ((completion.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
    if not content:
        raise JudgeError(f"the judge answered no logprobs: {str(completion)[:200]}")
    return [(entry["token"], float(entry["logprob"])) for entry in content[0].get("top_logprobs", [])]


def chat_request(model: str, text: str, image_urls: list[str], top_logprobs: int) -> dict:
    """The images (an edit's source first, as Edit-R1 sends them) and the filled template as one user
    turn; one greedy token with its top logprobs."""
    content = [*({"type": "image_url", "image_url": {"url": url}} for url in image_urls), {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
            "temperature": 0.0, "logprobs": True, "top_logprobs": top_logprobs}


def fill_template(template: str, prompt: str) -> str:
    """The template with every `{prompt}` replaced (plain replacement: other braces stay as they are)."""
    return template.replace("{prompt}", prompt)


def load_template(path: Path) -> str:
    template = Path(path).read_text()
    if "{prompt}" not in template:
        raise ValueError(f"the judge prompt template {path} has no {{prompt}} placeholder")
    return template


def percentiles(values: list[float], quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    """Nearest-rank percentiles: p_q = the ceil(q * n)-th smallest value."""
    ordered = sorted(values)
    return {f"p{round(q * 100)}": ordered[max(math.ceil(q * len(ordered)), 1) - 1] for q in quantiles} if ordered else {}


class JudgeError(Exception):
    """The judge failed (unreachable, 5xx, no logprobs): a 503, so the trainer retries."""


class BadRequest(Exception):
    def __init__(self, status: int, error: str, message: str, item: int | None = None):
        self.status, self.error, self.message, self.item = status, error, message, item


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="base64 PNG or JPEG")
    prompt: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    source_image: str | None = Field(None, description="an edit's source image: sent to the judge before `image`")
    mask: str | None = Field(None, description="an edit's mask: accepted and not read (the judge sees whole images)")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[Item], Field(min_length=1)]


def image_data_url(image: str, index: int, max_pixels: int) -> str:
    """A base64 PNG/JPEG (checked: it opens and is within `max_pixels`) as a data URL for the judge."""
    try:
        data = base64.b64decode(image.split(",", 1)[-1], validate=True)
        with Image.open(io.BytesIO(data)) as opened:
            kind, pixels = opened.format, opened.width * opened.height
    except Image.DecompressionBombError as error:
        raise BadRequest(413, "image_too_large", str(error), index) from None
    except (binascii.Error, ValueError, UnidentifiedImageError) as error:
        raise BadRequest(422, "bad_image", f"not a base64 PNG/JPEG: {error}", index) from None
    if kind not in ("PNG", "JPEG"):
        raise BadRequest(422, "bad_image", f"a {kind} image; send PNG or JPEG", index)
    if pixels > max_pixels:
        raise BadRequest(413, "image_too_large", f"{pixels} pixels is over {max_pixels}", index)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(data).decode()}"


@dataclass
class Judge:
    """The client of the vLLM server, the template, and the latency record of every judge request."""

    settings: JudgeSettings
    template: str
    http: httpx.AsyncClient
    model: str = ""
    latencies: deque = field(default_factory=lambda: deque(maxlen=10_000))
    """Seconds per judge request, newest last (the last 10,000)."""

    async def check(self) -> str:
        """Ask the server which models it serves: the configured one must be among them (none
        configured: take the first). A JudgeError (503) while the judge is down or serves another."""
        served = [entry["id"] for entry in (await self._call("GET", "/v1/models"))["data"]]
        if self.model and self.model not in served:
            raise JudgeError(f"the judge at {self.settings.url} serves {served}, not {self.model!r}")
        self.model = self.model or served[0]
        return self.model

    async def resolve_model(self) -> str:
        return self.model or await self.check()

    async def score(self, prompt: str, image_urls: list[str], index: int) -> tuple[DigitScore, float]:
        """One item: its DigitScore and the judge's wall time for it in seconds."""
        body = chat_request(await self.resolve_model(), fill_template(self.template, prompt), image_urls,
                            self.settings.top_logprobs)
        started = time.perf_counter()
        completion = await self._call("POST", "/v1/chat/completions", body, index)
        latency = time.perf_counter() - started
        self.latencies.append(latency)
        return digit_score(first_token_top_logprobs(completion), self.settings.no_digit_reward), latency

    async def _call(self, method: str, path: str, body: dict | None = None, index: int | None = None) -> dict:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.TransportError as error:
            raise JudgeError(f"the judge at {self.settings.url} is unreachable: {error!r}") from None
        if response.status_code >= 500:
            raise JudgeError(f"the judge answered {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:  # the judge refuses this item (too long for its context, ...)
            raise BadRequest(422, "judge_refused", f"the judge answered {response.status_code}: {response.text[:300]}",
                             index)
        return response.json()


def create_app(settings: JudgeSettings | None = None, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The judge scorer as a FastAPI app (`transport`: a test's stand-in for the vLLM server)."""
    settings = settings or JudgeSettings.from_env()
    template = load_template(settings.prompt_file)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    http = httpx.AsyncClient(base_url=settings.url, headers=headers, timeout=settings.timeout_s, transport=transport)
    judge = Judge(settings, template, http, model=settings.model)
    in_flight = asyncio.Semaphore(settings.max_concurrency)
    template_hash = hashlib.sha256(template.encode()).hexdigest()[:12]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await http.aclose()

    app = FastAPI(title="VLM judge scorer", description=__doc__, lifespan=lifespan)
    app.state.judge = judge

    def version() -> str:
        """The model and the template behind the numbers: a changed prompt is a changed reward."""
        return f"vlm-judge:{judge.model or '?'}:prompt-{template_hash}"

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({"error": error.error, "message": error.message, "item": error.item}, error.status)

    @app.exception_handler(JudgeError)
    async def judge_down(request: Request, error: JudgeError) -> JSONResponse:
        return JSONResponse({"error": "judge_unavailable", "message": str(error), "item": None}, 503)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > settings.max_body_bytes:
            message = f"over {settings.max_body_bytes} bytes"
            return JSONResponse({"error": "body_too_large", "message": message, "item": None}, 413)
        return await call_next(request)

    @app.get("/readyz")
    async def readyz() -> dict:
        await judge.check()  # a 503 while the judge is down
        return {"status": "ready", "scorers": ["vlm_judge"], "versions": {"vlm_judge": version()},
                "limits": {"max_items": settings.max_items, "max_body_bytes": settings.max_body_bytes,
                           "max_image_pixels": settings.max_image_pixels}}

    @app.get("/stats")
    def stats() -> dict:
        latencies = list(judge.latencies)
        return {"judge_requests": len(latencies), "judge_latency_s": percentiles(latencies)}

    @app.post("/score")
    async def score_items(body: ScoreRequest) -> dict:
        if len(body.items) > settings.max_items:
            raise BadRequest(413, "too_many_items", f"{len(body.items)} items; the limit is {settings.max_items}")
        urls = [[image_data_url(image, i, settings.max_image_pixels) for image in (item.source_image, item.image) if image]
                for i, item in enumerate(body.items)]

        async def one(index: int) -> dict:
            async with in_flight:
                scored, latency = await judge.score(body.items[index].prompt, urls[index], index)
            details = {"judge_latency_s": latency, "expected_digit": scored.expected_digit,
                       "digit_probs": scored.digit_probs, "digit_mass": scored.digit_mass,
                       "digits_found": len(scored.digit_probs)}
            return {"reward": scored.reward, "details": details}

        results = await asyncio.gather(*(one(i) for i in range(len(body.items))))
        return {"results": results, "scorer": "vlm_judge", "version": version()}

    return app


app = create_app()
"""`uvicorn vlm_judge:app`: settings from VLM_JUDGE_* environment variables (nothing connects until a request)."""
