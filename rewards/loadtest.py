"""Load test of the reward REST API: many concurrent clients, a seeded mix of good and bad requests.

What it checks, the service's reliability bar: no 5xx, no transport errors, no lost answers, no
mixed-up answers, every bad request refused with the 4xx status and error code we expect, and the
server's memory stable.
"Mixed-up" is checked against references: a fixed pool of distinct items is built up front, each
item is scored once on its own before the load, and every answer under load must equal the
reference of exactly the item sent at that position. This needs a deterministic server, so serve
with the OCR cache off (`ocr.cache_size` 0, the default) or a cache hit would hide the work.

`blip3o-rl rewards loadtest --url URL --clients 32 --seconds 60 [--token T] [--server-pid PID]`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards.client import encode_png

OCR, GENEVAL = "/v1/rewards/ocr", "/v1/rewards/geneval"
MIB = 1024 * 1024


class LoadTestError(RuntimeError):
    """The server cannot be load-tested (not ready, no OCR scorer, a reference request failed)."""


@dataclass(frozen=True)
class BadRequest:
    """A request the server must refuse, and how: status, error code and item index."""

    name: str
    path: str
    body: bytes
    status: int
    code: str
    item: int | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Workload:
    """Good items per endpoint (one request item each), their reference answers, and bad requests."""

    items: dict[str, list[dict]]
    bad: list[BadRequest]
    max_items: int
    """The server's per-request limit; good requests carry 1..min(8, max_items) items."""
    references: dict[str, list[dict]] = field(default_factory=dict)
    """Answer of each item scored alone, before the load (filled by `measure_references`)."""


@dataclass
class LoadReport:
    """What happened under load; `problems()` lists every failed expectation."""

    clients: int
    seconds: float
    duration_s: float = 0.0
    requests_sent: int = 0
    requests_served: int = 0
    """Answered 2xx."""
    by_status: dict[str, int] = field(default_factory=dict)
    http_5xx: int = 0
    transport_errors: int = 0
    """Connection failures and timeouts (good and bad requests)."""
    lost: int = 0
    """Good requests without a complete answer: transport error, or a wrong number of results."""
    good_requests: int = 0
    items_scored: int = 0
    mismatched: int = 0
    """Items whose answer differs from the reference of the item sent at that position."""
    bad_requests: int = 0
    bad_unexpected: int = 0
    """Requests (good or bad) answered with another status or error code than expected."""
    examples: list[str] = field(default_factory=list)
    """The first few failures, for a human."""
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    """Latency of good requests answered 2xx."""
    rss_start_mib: float | None = None
    rss_mid_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_growth_second_half_mib: float | None = None
    """Server RSS at the end minus at half time (None without a server pid)."""
    max_rss_growth_mib: float = 64.0

    def problems(self) -> list[str]:
        found = [f"{self.http_5xx} answers were 5xx"] if self.http_5xx else []
        found += [f"{self.transport_errors} transport errors"] if self.transport_errors else []
        found += [f"{self.lost} good requests lost"] if self.lost else []
        found += [f"{self.mismatched} answers differ from their item's reference"] if self.mismatched else []
        found += [f"{self.bad_unexpected} unexpected statuses or error codes"] if self.bad_unexpected else []
        found += ["no request was served"] if not self.requests_served else []
        growth = self.rss_growth_second_half_mib
        if growth is not None and growth > self.max_rss_growth_mib:
            found.append(f"server RSS grew {growth:.0f} MiB over the second half (limit {self.max_rss_growth_mib:.0f})")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def to_dict(self) -> dict:
        """Every field, plus `ok` and `problems` (what bench/bench_reliability.py stores)."""
        return {**asdict(self), "ok": self.ok, "problems": self.problems()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def render_word(word: str, size: tuple[int, int] = (256, 64)) -> np.ndarray:
    """Black bold text on white: uint8 RGB [H, W, 3]."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 32)
    except OSError:
        font = ImageFont.load_default(32)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text(((size[0] - right - left) / 2, (size[1] - bottom - top) / 2), word, fill="black", font=font)
    return np.asarray(image)


def _geneval_metadata(index: int) -> dict:
    """A valid GenEval metadata line, varied by index over tags, counts, colours and positions."""
    colours = ["red", "blue", "green", "brown", "white"]
    count = 1 + index % 4
    shapes = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"tag": "counting", "include": [{"class": "dog", "count": count}], "exclude": [{"class": "dog", "count": count + 1}]},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": colours[index % 5]}]},
        {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
        {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]},
    ]
    return {**shapes[index % len(shapes)], "prompt": f"item {index}"}


def build_workload(
    seed: int = 0, ocr_items: int = 32, geneval_items: int = 16, *, max_items: int = 64, token: str | None = None
) -> Workload:
    """Distinct OCR items (random words; every 4th targets another word, for partial rewards),
    GenEval items (noise images; `geneval_items` 0 = none) and one bad request of each kind.
    Expects the server's `max_items` and an image limit under 8192x8192 pixels (default 4096x4096)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < ocr_items:  # distinct, so a swapped answer cannot look right
        word = "".join(rng.choice(list(string.ascii_uppercase), int(rng.integers(3, 7))))
        words += [word] if word not in words else []
    ocr = [
        {"image": encode_png(render_word(word)), "target": words[(i + 1) % ocr_items] if i % 4 == 3 else word}
        for i, word in enumerate(words)
    ]
    geneval = [
        {"image": encode_png(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)), "metadata": _geneval_metadata(i)}
        for i in range(geneval_items)
    ]
    huge = io.BytesIO()
    Image.new("1", (8192, 8192)).save(huge, format="PNG")  # 67 Mpx announced, ~10 KB sent
    good = ocr[0]

    def ocr_body(bad_item: dict) -> bytes:  # a good item first: the error must name item 1
        return json.dumps({"items": [good, bad_item]}).encode()

    bad = [
        BadRequest("invalid JSON", OCR, b'{"items": [', 400, "invalid_json", None),
        BadRequest("bad base64", OCR, ocr_body({"image": "not base64!!", "target": "x"}), 422, "bad_base64", 1),
        BadRequest("not an image", OCR, ocr_body({"image": base64.b64encode(b"hello").decode(), "target": "x"}), 422, "bad_image", 1),
        BadRequest("image too large", OCR, ocr_body({"image": base64.b64encode(huge.getvalue()).decode(), "target": "x"}), 413, "image_too_large", 1),
        BadRequest("missing image", OCR, ocr_body({"target": "x"}), 422, "invalid_request", 1),
        BadRequest("missing quotes", OCR, ocr_body({"image": good["image"], "prompt": "no quotes"}), 422, "missing_quotes", 1),
        BadRequest("too many items", OCR, json.dumps({"items": [good] * (max_items + 1)}).encode(), 413, "too_many_items", max_items),
    ]
    if geneval:
        unicorn = {"tag": "single_object", "include": [{"class": "unicorn", "count": 1}]}
        body = json.dumps({"items": [geneval[0], {"image": geneval[0]["image"], "metadata": unicorn}]}).encode()
        bad.append(BadRequest("bad GenEval metadata", GENEVAL, body, 422, "invalid_request", 1))
    if token is not None:
        bad.append(BadRequest("wrong token", OCR, ocr_body(good), 401, "unauthorized", None, {"Authorization": "Bearer not-" + token}))
    return Workload({OCR: ocr, GENEVAL: geneval}, bad, max_items)


def same_answer(got, want, rel: float = 1e-5) -> bool:
    """Equal JSON values; floats within `rel` (batched model calls may round differently)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same_answer(got[k], want[k], rel) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same_answer(g, w, rel) for g, w in zip(got, want))
    if isinstance(want, float) and not isinstance(got, bool) and isinstance(got, int | float):
        return math.isclose(got, want, rel_tol=rel, abs_tol=rel)
    return type(got) is type(want) and got == want


async def measure_references(http: httpx.AsyncClient, workload: Workload) -> None:
    """Score each item alone, one request at a time: the answers the load must reproduce."""
    for path, items in workload.items.items():
        workload.references[path] = []
        for item in items:
            response = await http.post(path, json={"items": [item]})
            if response.status_code != 200:
                raise LoadTestError(f"reference request to {path} failed: {response.status_code} {response.text[:200]}")
            workload.references[path].append(response.json()["results"][0])


class _Driver:
    """Runs the clients against one workload and tallies into one report (one event loop: no locks)."""

    def __init__(self, url: str, workload: Workload, report: LoadReport, token: str | None, timeout_s: float) -> None:
        self.url, self.workload, self.report, self.timeout_s = url, workload, report, timeout_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []

    def _fail(self, counter: str, message: str) -> None:
        setattr(self.report, counter, getattr(self.report, counter) + 1)
        if len(self.report.examples) < 10:
            self.report.examples.append(message)

    async def client(self, index: int, seed: int, deadline: float, bad_fraction: float) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        paths = [path for path, items in self.workload.items.items() if items]
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout_s) as http:
            while time.monotonic() < deadline:
                if rng.random() < bad_fraction:
                    await self._bad(http, rng.choice(self.workload.bad))
                else:
                    path = rng.choice(paths)
                    pool = len(self.workload.items[path])
                    picks = rng.sample(range(pool), rng.randint(1, min(8, pool, self.workload.max_items)))
                    await self._good(http, path, picks)

    async def _post(self, http: httpx.AsyncClient, path: str, body: bytes, headers: dict) -> httpx.Response | None:
        self.report.requests_sent += 1
        try:
            response = await http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        except httpx.TransportError as error:
            self._fail("transport_errors", f"{path}: {type(error).__name__}: {error}")
            return None
        self.statuses[response.status_code] += 1
        self.report.requests_served += response.status_code < 300
        self.report.http_5xx += response.status_code >= 500
        return response

    async def _good(self, http: httpx.AsyncClient, path: str, picks: list[int]) -> None:
        self.report.good_requests += 1
        body = json.dumps({"items": [self.workload.items[path][i] for i in picks]}).encode()
        started = time.monotonic()
        response = await self._post(http, path, body, {})
        if response is None:
            self.report.lost += 1
            return
        if response.status_code != 200:
            self._fail("bad_unexpected", f"good {path} request answered {response.status_code}: {response.text[:200]}")
            return
        self.latencies.append(time.monotonic() - started)
        try:
            results = response.json()["results"]
        except (ValueError, KeyError, TypeError):
            results = None
        if not isinstance(results, list) or len(results) != len(picks):
            self._fail("lost", f"{path}: {len(picks)} items sent, answer {response.text[:200]}")
            return
        self.report.items_scored += len(picks)
        references = self.workload.references[path]
        for position, (item, answer) in enumerate(zip(picks, results)):
            if not same_answer(answer, references[item]):
                self._fail("mismatched", f"{path} item {item} at position {position}: {answer} != {references[item]}")

    async def _bad(self, http: httpx.AsyncClient, bad: BadRequest) -> None:
        self.report.bad_requests += 1
        response = await self._post(http, bad.path, bad.body, bad.headers)
        if response is None:
            return
        try:
            error = response.json()
            got = (response.status_code, error.get("error"), error.get("item"))
        except (ValueError, AttributeError):
            got = (response.status_code, None, None)
        if got != (bad.status, bad.code, bad.item):
            self._fail("bad_unexpected", f"{bad.name}: expected {(bad.status, bad.code, bad.item)}, got {got}")

    def finish(self, started: float) -> None:
        self.report.duration_s = round(time.monotonic() - started, 2)
        self.report.by_status = {str(status): count for status, count in sorted(self.statuses.items())}
        if self.latencies:
            self.report.latency_p50_s = round(float(np.percentile(self.latencies, 50)), 4)
            self.report.latency_p99_s = round(float(np.percentile(self.latencies, 99)), 4)


async def _sample_memory(pid: int, samples: list[tuple[float, int]], started: float) -> None:
    """Server RSS about once a second, until cancelled."""
    import psutil

    process = psutil.Process(pid)
    while True:
        samples.append((time.monotonic() - started, process.memory_info().rss))
        await asyncio.sleep(1.0)


def _memory_figures(report: LoadReport, samples: list[tuple[float, int]]) -> None:
    if not samples:
        return
    mid = min(samples, key=lambda sample: abs(sample[0] - samples[-1][0] / 2))[1]
    report.rss_start_mib, report.rss_mid_mib, report.rss_end_mib = (round(s / MIB, 1) for s in (samples[0][1], mid, samples[-1][1]))
    report.rss_peak_mib = round(max(rss for _, rss in samples) / MIB, 1)
    report.rss_growth_second_half_mib = round((samples[-1][1] - mid) / MIB, 1)


async def drive(
    url: str,
    workload: Workload,
    clients: int,
    seconds: float,
    *,
    token: str | None = None,
    server_pid: int | None = None,
    seed: int = 0,
    bad_fraction: float = 0.25,
    timeout_s: float = 120.0,
    max_rss_growth_mib: float = 64.0,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    """`clients` concurrent clients for `seconds` against a workload whose references are measured."""
    report = LoadReport(clients, seconds, max_rss_growth_mib=max_rss_growth_mib)
    driver = _Driver(url, workload, report, token, timeout_s)
    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(_sample_memory(server_pid, samples, started)) if server_pid else None
    tasks = [asyncio.create_task(driver.client(i, seed, started + seconds, bad_fraction)) for i in range(clients)]
    while not all(task.done() for task in tasks):
        await asyncio.wait(tasks, timeout=10.0)
        if progress is not None:
            rss = f", server RSS {samples[-1][1] / MIB:.0f} MiB" if samples else ""
            progress(
                f"load test {time.monotonic() - started:.0f}/{seconds:.0f} s: {report.requests_sent} sent, "
                f"{report.requests_served} served, {report.http_5xx} 5xx, {report.mismatched} mismatched{rss}"
            )
    for task in tasks:
        task.result()  # a bug in the driver itself surfaces here
    if sampler is not None:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    driver.finish(started)
    _memory_figures(report, samples)
    return report


async def prepare_workload(url: str, *, token: str | None = None, seed: int = 0, max_items: int = 64) -> Workload:
    """The workload for this server (GenEval items only if it has that scorer), references measured."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0) as http:
        ready = await http.get("/readyz")
        if ready.status_code != 200:
            raise LoadTestError(f"{url} is not ready: {ready.status_code} {ready.text[:200]}")
        scorers = ready.json()["scorers"]
        if "ocr" not in scorers:
            raise LoadTestError(f"{url} serves {scorers}; the load test needs the ocr scorer")
        workload = build_workload(seed, geneval_items=16 if "geneval" in scorers else 0, max_items=max_items, token=token)
        await measure_references(http, workload)  # also the warm-up
    return workload


def run_load_test(
    url: str,
    clients: int,
    seconds: float,
    *,
    token: str | None = None,
    server_pid: int | None = None,
    seed: int = 0,
    max_items: int = 64,
    bad_fraction: float = 0.25,
    max_rss_growth_mib: float = 64.0,
    progress: Callable[[str], None] | None = lambda line: print(line, file=sys.stderr, flush=True),
) -> LoadReport:
    """Prepare the workload, then load the server. `max_items` must be the server's limit."""

    async def run() -> LoadReport:
        workload = await prepare_workload(url, token=token, seed=seed, max_items=max_items)
        return await drive(url, workload, clients, seconds, token=token, server_pid=server_pid, seed=seed,
                           bad_fraction=bad_fraction, max_rss_growth_mib=max_rss_growth_mib, progress=progress)

    return asyncio.run(run())
