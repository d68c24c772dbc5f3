"""Dashboard: the JSON API over a real socket (the `blip3o-rl dashboard` command in a subprocess),
its 404/422 errors, the TensorBoard export, and the page in headless Debian chromium (Playwright).

The store is written by a short simulated run (metric names as rl/run_store.py documents them).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from rl.run_store import RunStore, SampleRecord

STEPS = 12
SAMPLES_PER_STEP = 4
SAMPLE_EVERY = 2
EVAL_EVERY = 4
EVAL_SAMPLES = 3
NO_UPDATE_STEPS = {0, 1}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def mean_reward(step: int, offset: float = 0.0) -> float:
    return 0.2 + 0.6 * (1 - math.exp(-step / 8)) + offset


def pixels(step: int, index: int) -> np.ndarray:
    image = np.full((48, 64, 3), 30, np.uint8)  # [H, W, 3]
    image[..., index % 3] = 80 + 40 * index
    image[12:36, 16:48] = 255 if step % 4 == 0 else 0
    return image


def step_metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    """What the trainer logs at a step. Learner numbers only at steps with an update (none at
    NO_UPDATE_STEPS, as when every group is zero-signal); eval results every EVAL_EVERY steps;
    values in the ranges the live page got wrong (ocr/exact stuck at 0, a small KL, a policy
    version next to a row count); guard statistics in different units."""
    reward = mean_reward(step, offset)
    metrics = {
        "reward/mean": reward, "reward/std": 0.1, "reward/ocr": reward, "reward/geneval": 0.8 * reward,
        "geneval/counting": 0.7 * reward, "geneval/position": 0.5 * reward, "ocr/exact": 0.0,
        "policy/version": float(max(0, step - 1)), "policy/staleness": 0.0, "groups/zero_signal_share": 0.5,
        "rollout/rows": 64.0,
        "time/rollout": 1.0, "time/decode": 0.5, "time/reward": 0.3, "time/update": 0.8, "time/sync": 0.1,
        "throughput/images_per_s": 8.0, "loss": 0.1,
        "guard/dark_share": 0.3 + 0.01 * step, "guard/brightness": 120.0 + step,
        "images/dark_share": 0.45 + 0.04 * step, "images/colour_entropy": 2.0 + 0.1 * step,
    }
    if step not in NO_UPDATE_STEPS:
        metrics.update({"policy/kl": 0.001 * step, "policy/entropy": 3.0 - 0.1 * step, "policy/clip_fraction": 0.05})
    if step % EVAL_EVERY == 0:
        metrics.update({"eval/ocr/score": 0.5 * reward, "eval/ocr/exact": 0.25 * reward, "time/eval": 2.0})
    return metrics


ALL_KEYS = sorted(set().union(*(step_metrics(step) for step in range(STEPS))))


def simulate_step(store: RunStore, run_id: str, step: int, offset: float = 0.0) -> None:
    """Metrics every step, samples every SAMPLE_EVERY steps, eval images every EVAL_EVERY steps."""
    reward = mean_reward(step, offset)
    store.log_metrics(run_id, step, step_metrics(step, offset))
    if step % SAMPLE_EVERY == 0:
        store.log_samples(run_id, step, [
            SampleRecord(f'a sign that says "cat {i}"', pixels(step, i), reward, {"ocr": reward, "format": 1.0})
            for i in range(SAMPLES_PER_STEP)
        ])
    if step % EVAL_EVERY == 0:
        store.log_samples(run_id, step, [
            SampleRecord(f'eval prompt {i}', pixels(step + 1, i), 0.5 * reward, {"ocr": 0.5 * reward})
            for i in range(EVAL_SAMPLES)
        ], kind="eval")


def make_runs(runs_dir: Path) -> tuple[RunStore, str, str]:
    """A running run of STEPS steps (the one the page shows first) and a finished baseline."""
    store = RunStore(runs_dir)
    baseline = store.create_run("ocr-baseline", {"lr": 1e-3})
    for step in range(STEPS - 2):
        simulate_step(store, baseline, step, offset=-0.1)
    store.finish_run(baseline, "finished")
    time.sleep(0.01)  # distinct start times: the newest run is listed (and shown) first
    live = store.create_run("ocr-live", {"lr": 2e-3, "group_size": 8})
    for step in range(STEPS):
        simulate_step(store, live, step)
    store.log_event(live, "restart", "reward worker 1 restarted")
    return store, live, baseline


@contextlib.contextmanager
def dashboard_server(runs_dir: Path, token: str | None = None):
    """`blip3o-rl dashboard` on a free port, as a user starts it (a token from its environment
    variable, as the KubeRay manifest passes it); yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("BLIP3O_RL_DASHBOARD_")}
    if token is not None:
        env["BLIP3O_RL_DASHBOARD_TOKEN"] = token
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "dashboard", "--runs-dir", str(runs_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/api/runs", timeout=2, headers=headers).raise_for_status()
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "dashboard did not start in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def server(runs):
    with dashboard_server(runs[0].runs_dir) as url:
        yield url


def test_api_lists_runs_and_serves_metrics(server, runs):
    _, live, baseline = runs
    listed = httpx.get(f"{server}/api/runs").json()
    assert [(r["id"], r["status"], r["last_step"]) for r in listed] == [
        (live, "running", STEPS - 1), (baseline, "finished", STEPS - 3)]

    detail = httpx.get(f"{server}/api/runs/{live}").json()
    assert detail["config"] == {"lr": 2e-3, "group_size": 8}
    assert detail["sample_steps"] == list(range(0, STEPS, SAMPLE_EVERY))
    assert [(e["kind"], e["message"]) for e in detail["events"]] == [("restart", "reward worker 1 restarted")]
    assert detail["metric_keys"] == ALL_KEYS
    assert detail["eval_sample_steps"] == list(range(0, STEPS, EVAL_EVERY))

    everything = httpx.get(f"{server}/api/runs/{live}/metrics").json()
    assert everything["steps"] == list(range(STEPS))
    assert everything["values"]["reward/mean"] == pytest.approx([mean_reward(s) for s in range(STEPS)], abs=1e-12)

    tail = httpx.get(f"{server}/api/runs/{live}/metrics", params={"keys": "reward/mean,policy/kl", "since": 8}).json()
    assert tail["steps"] == [9, 10, 11]
    assert tail["values"] == {
        "policy/kl": pytest.approx([0.009, 0.010, 0.011], abs=1e-12),
        "reward/mean": pytest.approx([mean_reward(s) for s in (9, 10, 11)], abs=1e-12),
    }


def test_api_serves_samples_and_their_images(server, runs):
    _, live, _ = runs
    latest = httpx.get(f"{server}/api/runs/{live}/samples").json()
    assert latest["step"] == 10  # no step given: the latest step with samples
    chosen = httpx.get(f"{server}/api/runs/{live}/samples", params={"step": 4}).json()
    assert chosen["step"] == 4 and len(chosen["samples"]) == SAMPLES_PER_STEP
    sample = chosen["samples"][2]
    assert sample["prompt"] == 'a sign that says "cat 2"'
    assert sample["reward"] == pytest.approx(mean_reward(4), abs=1e-12)
    assert sample["components"] == {"ocr": pytest.approx(mean_reward(4), abs=1e-12), "format": 1.0}
    image = httpx.get(f"{server}{sample['image_url']}")
    assert image.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.content))), pixels(4, 2))

    # in-run eval images are their own kind: same step numbers, other samples, other files
    evaluated = httpx.get(f"{server}/api/runs/{live}/samples", params={"step": 4, "kind": "eval"}).json()
    assert [s["prompt"] for s in evaluated["samples"]] == [f"eval prompt {i}" for i in range(EVAL_SAMPLES)]
    image = httpx.get(f"{server}{evaluated['samples'][1]['image_url']}")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.content))), pixels(5, 1))
    assert httpx.get(f"{server}/api/runs/{live}/samples", params={"kind": "eval"}).json()["step"] == 8


@pytest.mark.parametrize("path, params, detail", [
    ("/api/runs/nope", {}, "unknown run id 'nope'"),
    ("/api/runs/nope/metrics", {}, "unknown run id 'nope'"),
    ("/api/runs/nope/samples", {}, "unknown run id 'nope'"),
    ("/api/runs/{live}/samples", {"step": 3}, "has no train samples at step 3"),
    ("/api/runs/{live}/samples", {"step": 2, "kind": "eval"}, "has no eval samples at step 2"),
    ("/api/runs/{live}/samples/4/9.png", {}, "has no train sample 9 at step 4"),
])
def test_api_unknown_things_are_404_json(server, runs, path, params, detail):
    response = httpx.get(server + path.format(live=runs[1]), params=params)
    assert response.status_code == 404
    assert detail in response.json()["detail"]


@pytest.mark.parametrize("path, params, detail", [
    ("metrics", {"since": "abc"}, "valid integer"),
    ("metrics", {"since": -5}, "greater than or equal to -1"),
    ("metrics", {"keys": "reward/mean,"}, "bad metric key ''"),
    ("metrics", {"keys": "reward/meen"}, "unknown metric key 'reward/meen'"),
    ("samples", {"step": "latest"}, "valid integer"),
    ("samples", {"step": -1}, "greater than or equal to 0"),
    ("samples", {"kind": "test"}, "'train' or 'eval'"),
])
def test_api_bad_query_parameters_are_422_json(server, runs, path, params, detail):
    response = httpx.get(f"{server}/api/runs/{runs[1]}/{path}", params=params)
    assert response.status_code == 422
    assert detail in str(response.json()["detail"])


TOKEN = "dashboard-secret-0123"


@pytest.fixture(scope="module")
def locked(runs):
    """The dashboard app over the same store with a token (in process: FastAPI's TestClient)."""
    from fastapi.testclient import TestClient

    from deploy.dashboard.app import create_app

    with TestClient(create_app(runs[0].runs_dir, token=TOKEN)) as client:
        yield client


def protected_paths(live: str) -> list[str]:
    return ["/api/runs", f"/api/runs/{live}", f"/api/runs/{live}/metrics", f"/api/runs/{live}/samples",
            f"/api/runs/{live}/samples/4/2.png"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_with_a_token_the_api_answers_the_reward_apis_401_without_it(locked, runs, headers):
    from fastapi.testclient import TestClient

    from rewards.app.main import create_app as rewards_app
    from rewards.app.settings import Settings

    with TestClient(rewards_app(Settings(scorers=[], token=TOKEN))) as rewards:
        reference = rewards.post("/v1/rewards/ocr", json={"items": []}, headers=headers)
    assert reference.status_code == 401
    for path in protected_paths(runs[1]):
        answer = locked.get(path, headers=headers)
        assert answer.status_code == 401 and answer.json() == reference.json(), path
        assert answer.headers["www-authenticate"] == "Bearer"
    # the token in the URL is never read (access logs, history and Referer headers keep URLs)
    assert locked.get("/api/runs", params={"token": TOKEN}).status_code == 401


def test_with_a_token_the_api_answers_200_to_it_and_a_browser_opens_a_session(locked, runs):
    from deploy.dashboard.auth import COOKIE

    _, live, _ = runs
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in protected_paths(live):
        assert locked.get(path, headers=bearer).status_code == 200, path
    # the page: a 401 login form without the token, then the session cookie, then the dashboard
    locked.cookies.clear()
    login = locked.get("/")
    assert login.status_code == 401 and 'type="password"' in login.text and "/api/session" in login.text
    assert locked.post("/api/session").status_code == 401
    assert locked.post("/api/session", headers={"Authorization": "Bearer wrong"}).status_code == 401
    opened = locked.post("/api/session", headers=bearer)
    assert opened.status_code == 204
    cookie = opened.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert TOKEN not in cookie  # derived from the token, not the token
    assert locked.get("/").status_code == 200 and "<title>blip3o-rl dashboard</title>" in locked.get("/").text
    for path in protected_paths(live):
        assert locked.get(path).status_code == 200, path  # the cookie alone
    assert locked.get("/static/dashboard.js").status_code == 200  # the page's code is public
    locked.cookies.clear()
    locked.cookies.set(COOKIE, "0" * 64)  # a forged session
    assert locked.get("/api/runs").status_code == 401 and locked.get("/").status_code == 401
    locked.cookies.clear()


def test_without_a_token_everything_is_open(runs):
    from fastapi.testclient import TestClient

    from deploy.dashboard.app import create_app

    with TestClient(create_app(runs[0].runs_dir)) as client:
        for path in [*protected_paths(runs[1]), "/"]:
            assert client.get(path).status_code == 200, path
        assert client.get("/api/runs", headers={"Authorization": "Bearer anything"}).status_code == 200
        opened = client.post("/api/session")
        assert opened.status_code == 204 and "set-cookie" not in opened.headers


def test_the_command_takes_the_token_from_its_flag_or_environment(runs, monkeypatch):
    """`blip3o-rl dashboard`: a flag wins over BLIP3O_RL_DASHBOARD_*, which wins over the defaults."""
    from deploy import cli
    from deploy.dashboard import app

    served = []
    monkeypatch.setattr(app, "serve", served.append)
    monkeypatch.setenv("BLIP3O_RL_DASHBOARD_TOKEN", "from-env")
    monkeypatch.setenv("BLIP3O_RL_DASHBOARD_PORT", "9001")
    cli.main(["dashboard", "--runs-dir", str(runs[0].runs_dir)])
    cli.main(["dashboard", "--token", "from-flag", "--host", "0.0.0.0"])
    first, second = served
    assert (first.token.get_secret_value(), first.port, first.host, first.runs_dir) == (
        "from-env", 9001, "127.0.0.1", str(runs[0].runs_dir))
    assert (second.token.get_secret_value(), second.host, second.runs_dir) == ("from-flag", "0.0.0.0", "runs")
    monkeypatch.delenv("BLIP3O_RL_DASHBOARD_TOKEN")
    cli.main(["dashboard"])
    assert served[2].token is None


def test_tensorboard_export_matches_the_store(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deploy.dashboard.tensorboard_export import export_tensorboard

    store, live, _ = runs
    command = [sys.executable, "-m", "deploy.cli", "export-tensorboard", "--runs-dir", str(store.runs_dir), "--out", str(tmp_path)]
    written = subprocess.run(command + ["--run", live], check=True, capture_output=True, text=True)
    assert written.stdout.strip() == f"wrote TensorBoard events for {live} to {tmp_path / live}"
    export_tensorboard(store, live, tmp_path)  # a second export replaces the first, never doubles it
    assert len(list((tmp_path / live).glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / live))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ALL_KEYS
    points = events.Scalars("reward/mean")
    assert [p.step for p in points] == list(range(STEPS))
    assert [p.value for p in points] == pytest.approx([mean_reward(s) for s in range(STEPS)], rel=1e-6)

    missing = subprocess.run(command + ["--run", "nope"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"blip3o-rl: error: unknown run id 'nope' in {store.runs_dir}"


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased EMA, the page's smoothing: s_n = (w s_{n-1} + (1-w) v_n) / (1 - w^n)."""
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def wide_page(playwright):
    """Headless chromium with a 1400 x 1000 page; returns (browser, page, the page's script errors)."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return browser, page, errors


def require_chromium() -> None:
    """Skip without the browser, except in CI (BLIP3O_RL_REQUIRE_BROWSER=1, set by .ci/run): there a
    setup that did not install it is a failure, not a silently skipped test."""
    if CHROMIUM.exists():
        return
    message = f"needs Debian chromium at {CHROMIUM}: run scripts/install_browser.sh"
    if os.environ.get("BLIP3O_RL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (BLIP3O_RL_REQUIRE_BROWSER=1: setup must have installed it)")
    pytest.skip(message)


def test_page_shows_live_curves_gallery_and_comparison(tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    store, live, baseline = make_runs(tmp_path)  # its own store: this test writes more steps
    ARTIFACTS.mkdir(exist_ok=True)
    with dashboard_server(store.runs_dir) as server, sync_playwright() as playwright:
        browser, page, errors = wide_page(playwright)
        page.goto(f"{server}/?poll=300")

        # The reward chart has one point per step in the store.
        chart = page.locator("#chart-reward-mean")
        expect(chart).to_have_attribute("data-points", str(len(store.metrics(live).steps)), timeout=15_000)
        drawn = page.evaluate("window.dashboard.charts['reward-mean'].plot.data")
        assert drawn[0] == list(range(STEPS))
        assert drawn[1] == pytest.approx([mean_reward(s) for s in range(STEPS)], abs=1e-12)
        assert list(read_panels(page)) == list(PANELS)  # panels, their order and series: see PANELS
        expect(page.locator("#runs li")).to_have_count(2)
        expect(page.locator(f'#runs li[data-run-id="{live}"] .status')).to_have_text("running")

        # The gallery shows the latest step's images, decoded by the browser.
        expect(page.locator("#gallery-step")).to_have_text("step 10")
        expect(page.locator("#gallery .card img")).to_have_count(SAMPLES_PER_STEP)
        page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 64)")
        expect(page.locator("#gallery .card").nth(1).locator(".prompt")).to_have_text('a sign that says "cat 1"')

        # A step written now shows up without a reload (chart and gallery).
        simulate_step(store, live, STEPS)
        expect(chart).to_have_attribute("data-points", str(STEPS + 1), timeout=15_000)
        expect(page.locator("#gallery-step")).to_have_text(f"step {STEPS}")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # Smoothing is TensorBoard's EMA; comparison overlays the baseline as a second series.
        page.locator("#smooth").fill("0.6")
        raw = [mean_reward(s) for s in range(STEPS + 1)]
        page.wait_for_function("window.dashboard.smooth === 0.6")
        drawn = page.evaluate("window.dashboard.charts['reward-mean'].plot.data[1]")
        assert drawn == pytest.approx(smoothed(raw, 0.6), abs=1e-9)
        page.locator("#compare").select_option(baseline)
        page.wait_for_function("window.dashboard.charts['reward-mean'].plot.series.length === 3", timeout=15_000)
        overlay = page.evaluate("window.dashboard.charts['reward-mean'].plot.data")
        assert overlay[0] == list(range(STEPS + 1))
        baseline_raw = [mean_reward(s, -0.1) for s in range(STEPS - 2)]
        assert overlay[2][: STEPS - 2] == pytest.approx(smoothed(baseline_raw, 0.6), abs=1e-9)
        assert all(v is None for v in overlay[2][STEPS - 2:])  # the baseline stopped earlier
        page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)

        # A resume from a checkpoint drops the later steps; the page follows without a reload.
        store.resume_run(live, checkpoint_step=5)
        expect(chart).to_have_attribute("data-points", "6", timeout=15_000)
        simulate_step(store, live, 6)
        expect(chart).to_have_attribute("data-points", "7", timeout=15_000)
        expect(page.locator("#events li").first.locator(".kind")).to_have_text("resume")
        browser.close()
    assert errors == []


def test_page_with_a_token_asks_for_it_once_then_shows_curves_and_images(tmp_path):
    """The dashboard started with BLIP3O_RL_DASHBOARD_TOKEN: the page asks for the token, refuses a
    wrong one, then shows the runs, the curves and the gallery's images (sent with the session cookie)."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    store, live, _ = make_runs(tmp_path)
    with dashboard_server(store.runs_dir, token=TOKEN) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server}/?poll=300")
        page.locator("#token").fill("wrong")
        page.locator("button[type=submit]").click()
        expect(page.locator("#error")).to_have_text("wrong token")
        page.locator("#token").fill(TOKEN)
        page.locator("button[type=submit]").click()
        expect(page.locator("#runs li")).to_have_count(2, timeout=15_000)
        expect(page.locator("#chart-reward-mean")).to_have_attribute("data-points", str(STEPS), timeout=15_000)
        expect(page.locator("#gallery .card img")).to_have_count(SAMPLES_PER_STEP)
        page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 64)")
        assert page.url == f"{server}/?poll=300"  # the token never went into the URL
        [cookie] = page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
        browser.close()
    assert errors == []


# Panel id -> the keys it draws. Unrelated metrics never share an axis: the policy version, the row
# count and each guard statistic have panels of their own; eval results one per benchmark.
PANELS = {
    "reward-mean": ["reward/mean"], "reward-functions": ["reward/geneval", "reward/ocr"],
    "reward-std": ["reward/std"], "geneval": ["geneval/counting", "geneval/position"], "ocr": ["ocr/exact"],
    "kl": ["policy/kl"], "entropy": ["policy/entropy"], "clip-fraction": ["policy/clip_fraction"],
    "version": ["policy/version"], "staleness": ["policy/staleness"], "zero-signal": ["groups/zero_signal_share"],
    "eval-time": ["time/eval"], "time": ["time/decode", "time/reward", "time/rollout", "time/sync", "time/update"],
    "throughput": ["throughput/images_per_s"],
    "images-dark_share": ["images/dark_share"], "images-colour_entropy": ["images/colour_entropy"],
    "eval-ocr": ["eval/ocr/exact", "eval/ocr/score"],
    "guard-brightness": ["guard/brightness"], "guard-dark_share": ["guard/dark_share"],
    "metric-loss": ["loss"], "metric-rollout-rows": ["rollout/rows"],
}

READ_PANELS = """() => Object.fromEntries([...document.querySelectorAll('#charts .chart')].map((element) => {
    const plot = window.dashboard.charts[element.id.replace(/^chart-/, '')].plot;
    return [element.id.replace(/^chart-/, ''), {
        title: element.querySelector('h3').textContent,
        labels: plot.series.slice(1).map((s) => s.label),
        scale: element.dataset.scale,
        spanGaps: plot.series.slice(1).map((s) => Boolean(s.spanGaps)),
        y: [plot.scales.y.min, plot.scales.y.max],
        ticks: plot.axes[1]._values,
        data: plot.data,
    }];
}))"""


def read_panels(page) -> dict[str, dict]:
    """What the page draws, in page order: per panel its title, scale, series, y-axis range and tick
    labels (uPlot's `_values`: the labels it drew) and data."""
    return page.evaluate(READ_PANELS)


def test_page_panels_have_sensible_scales_gaps_and_their_own_axes(server, runs):
    """The live page's bugs: 0-100 axes for 0-1 or absent values, placeholder zeros at steps without
    an update, rows, versions and fractions on one axis, no place for eval results and guard stats."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    _, live, _ = runs
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser, page, errors = wide_page(playwright)
        page.goto(f"{server}/?run={live}&poll=300")
        expect(page.locator("#chart-metric-rollout-rows")).to_have_attribute("data-points", str(STEPS), timeout=15_000)
        panels = read_panels(page)
        assert {panel: shown["labels"] for panel, shown in panels.items()} == PANELS
        assert panels["ocr"]["title"] == "OCR exact-match share" and panels["eval-ocr"]["title"] == "Eval: ocr"

        # scales: fractions 0..1 (also when constant at 0), a small KL from 0 to just above its
        # largest value, a statistic outside 0..1 on its own data range, a constant on a padded range
        for fraction in ("ocr", "geneval", "zero-signal", "eval-ocr", "guard-dark_share", "images-dark_share"):
            assert panels[fraction]["y"] == [0, 1], fraction
        kl = [v for v in panels["kl"]["data"][1] if v is not None]
        assert panels["kl"]["y"] == pytest.approx([0, 1.15 * max(kl)])
        assert panels["clip-fraction"]["y"] == pytest.approx([0, 1.15 * 0.05])
        assert panels["staleness"]["y"] == [0, 1]  # all 0: not 0..100
        assert panels["images-colour_entropy"]["y"] == pytest.approx([0, 1.15 * (2.0 + 0.1 * (STEPS - 1))])  # bits
        low, high = panels["guard-brightness"]["y"]
        assert 110 < low < 120 and 120 + STEPS - 1 < high < 140  # brightness 120..131
        low, high = panels["metric-rollout-rows"]["y"]
        assert low < 64 < high and high - low < 20
        rewards = panels["reward-mean"]
        assert rewards["y"][0] == 0 and rewards["y"][1] > max(rewards["data"][1])
        for shown in panels.values():
            assert shown["y"][0] < shown["y"][1] and shown["y"] != [0, 100]

        # absent values are gaps (null, lines not joined across them), never zeros
        for panel in ("kl", "entropy", "clip-fraction"):
            values = panels[panel]["data"][1]
            assert values[:2] == [None, None] and None not in values[2:], panel
            assert panels[panel]["spanGaps"] == [False]
        assert None not in panels["reward-mean"]["data"][1]
        # eval results exist every EVAL_EVERY steps: points joined across the steps in between
        evals = panels["eval-ocr"]
        assert evals["spanGaps"] == [True, True] and panels["eval-time"]["spanGaps"] == [True]
        assert [step for step, v in zip(evals["data"][0], evals["data"][2]) if v is not None] == \
               list(range(0, STEPS, EVAL_EVERY))

        # the eval gallery shows the latest eval step's images
        expect(page.locator("#eval-gallery-box")).to_be_visible()
        expect(page.locator("#eval-gallery-step")).to_have_text("step 8")
        expect(page.locator("#eval-gallery .card img")).to_have_count(EVAL_SAMPLES)
        expect(page.locator("#eval-gallery .card").nth(2).locator(".prompt")).to_have_text("eval prompt 2")
        page.wait_for_function("[...document.querySelectorAll('#eval-gallery img')].every(i => i.naturalWidth === 64)")
        page.screenshot(path=str(ARTIFACTS / "dashboard-panels.png"), full_page=True)
        browser.close()
    assert errors == []


# The twins' magnitudes differ as in a real joint run (a per-SDE-step KL far above a per-token one, a
# larger gradient norm, a larger learning rate): on one axis the AR line would lie flat on 0.
AR_LEARNER = {"policy/kl": 0.001, "policy/clip_fraction": 0.05, "policy/loss": 0.02, "policy/grad_norm": 0.5,
              "policy/ratio_max": 1.2, "policy/lr": 1e-6}
DIFFUSION_LEARNER = {"diffusion/kl": 0.2, "diffusion/clip_fraction": 0.3, "diffusion/loss": -0.05,
                     "diffusion/policy_loss": -0.06, "diffusion/grad_norm": 40.0, "diffusion/ratio_max": 1.3,
                     "diffusion/ratio_min": 0.85, "diffusion/lr": 1e-4, "diffusion/logprob_diff": 0.002}


def diffusion_run_metrics(step: int, joint: bool) -> dict[str, float]:
    """What a run training the diffusion decoder logs: diffusion/* learner numbers at
    steps with an update (none at NO_UPDATE_STEPS), and in a joint run the AR policy's twins. A
    diffusion-only run logs policy/version (constant: the AR policy is frozen) and no other policy/*."""
    trained = max(0, step - 1)
    metrics = {
        "reward/mean": mean_reward(step), "policy/version": float(trained if joint else 0),
        "diffusion/version": float(trained), "diffusion/zero_signal_share": 0.25,
        "time/rollout": 1.0, "time/update_diffusion": 2.0, "time/sync_diffusion": 0.4,
    }
    if joint:
        metrics.update({"groups/zero_signal_share": 0.5, "time/update": 0.8, "time/sync": 0.1})
    if step not in NO_UPDATE_STEPS:
        metrics.update({key: drift(key, value, step) for key, value in DIFFUSION_LEARNER.items()})
        if joint:
            metrics.update({key: drift(key, value, step) for key, value in AR_LEARNER.items()})
    return metrics


def drift(key: str, value: float, step: int) -> float:
    """A learner number at a step: +10% per step; importance ratios stay near 1 (+1% per step)."""
    return value * (1 + (0.01 if "/ratio_" in key else 0.1) * step)


# Diffusion panels: (title, scale). Each sits right after its AR twin's panel.
DIFFUSION_PANELS = {
    "diffusion-kl": ("Diffusion: KL to the frozen decoder (per SDE step)", "nonneg"),
    "diffusion-clip-fraction": ("Diffusion: clipped (image, SDE step) share", "share"),
    "diffusion-loss": ("Diffusion: loss and clipped surrogate", "data"),
    "diffusion-grad-norm": ("Diffusion: gradient norm", "nonneg"),
    "diffusion-ratio": ("Diffusion: smallest and largest importance ratio (per SDE step)", "data"),
    "diffusion-logprob-diff": ("Diffusion: largest |learner - sampler| log-prob (per SDE step)", "nonneg"),
    "diffusion-lr": ("Diffusion: learning rate", "nonneg"),
}
# Panel id -> keys of the joint run, in page order. Twins in different units (per token vs per SDE
# step, another model's gradients and optimizer) have panels of their own; the weight versions and
# the zero-signal group shares (same count of the same thing) share one.
JOINT_PANELS = {
    "reward-mean": ["reward/mean"],
    "kl": ["policy/kl"], "diffusion-kl": ["diffusion/kl"],
    "clip-fraction": ["policy/clip_fraction"], "diffusion-clip-fraction": ["diffusion/clip_fraction"],
    "loss": ["policy/loss"], "diffusion-loss": ["diffusion/loss", "diffusion/policy_loss"],
    "grad-norm": ["policy/grad_norm"], "diffusion-grad-norm": ["diffusion/grad_norm"],
    "ratio-max": ["policy/ratio_max"], "diffusion-ratio": ["diffusion/ratio_max", "diffusion/ratio_min"],
    "diffusion-logprob-diff": ["diffusion/logprob_diff"],
    "lr": ["policy/lr"], "diffusion-lr": ["diffusion/lr"],
    "version": ["diffusion/version", "policy/version"],
    "zero-signal": ["diffusion/zero_signal_share", "groups/zero_signal_share"],
    "time": ["time/rollout", "time/sync", "time/sync_diffusion", "time/update", "time/update_diffusion"],
}
DIFFUSION_ONLY_PANELS = {
    "reward-mean": ["reward/mean"], "diffusion-kl": ["diffusion/kl"],
    "diffusion-clip-fraction": ["diffusion/clip_fraction"], "diffusion-loss": ["diffusion/loss", "diffusion/policy_loss"],
    "diffusion-grad-norm": ["diffusion/grad_norm"], "diffusion-ratio": ["diffusion/ratio_max", "diffusion/ratio_min"],
    "diffusion-logprob-diff": ["diffusion/logprob_diff"], "diffusion-lr": ["diffusion/lr"],
    "version": ["diffusion/version", "policy/version"], "zero-signal": ["diffusion/zero_signal_share"],
    "time": ["time/rollout", "time/sync_diffusion", "time/update_diffusion"],
}


def measured(panel: dict, key: str) -> list[float]:
    """The values a panel draws for one of its keys, gaps left out."""
    return [v for v in panel["data"][1 + panel["labels"].index(key)] if v is not None]


def test_page_draws_diffusion_learner_panels_beside_their_ar_twins(tmp_path):
    """A joint AR + diffusion run and a diffusion-only run: each diffusion number gets a
    titled panel on the right scale next to its AR twin, and never an axis with a twin in another unit."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    store = RunStore(tmp_path)
    runs = {}
    for name, joint in (("diffusion-only", False), ("joint", True)):
        runs[name] = store.create_run(name, {})
        for step in range(STEPS):
            store.log_metrics(runs[name], step, diffusion_run_metrics(step, joint))
    with dashboard_server(tmp_path) as server, sync_playwright() as playwright:
        browser, page, errors = wide_page(playwright)
        shown = {}
        for name in runs:
            page.goto(f"{server}/?run={runs[name]}&poll=300")
            expect(page.locator("#chart-diffusion-kl")).to_have_attribute("data-points", str(STEPS), timeout=15_000)
            shown[name] = read_panels(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-diffusion.png"), full_page=True)  # the joint run
        browser.close()
    assert errors == []

    joint, alone = shown["joint"], shown["diffusion-only"]
    # panels, their page order (each diffusion panel right after its AR twin) and series
    assert [(panel, drawn["labels"]) for panel, drawn in joint.items()] == list(JOINT_PANELS.items())
    assert [(panel, drawn["labels"]) for panel, drawn in alone.items()] == list(DIFFUSION_ONLY_PANELS.items())
    for panels in (joint, alone):
        assert {panel: (panels[panel]["title"], panels[panel]["scale"]) for panel in DIFFUSION_PANELS} == DIFFUSION_PANELS
        assert panels["version"]["title"] == "Policy version" and panels["version"]["scale"] == "nonneg"
        assert panels["zero-signal"]["y"] == [0, 1]
        for panel, drawn in panels.items():  # a learning rate of 1e-6 used to read 0, 0, 0
            assert len(drawn["ticks"]) > 1 and len(set(drawn["ticks"])) == len(drawn["ticks"]), (panel, drawn["ticks"])
    assert "1e-4" in joint["diffusion-lr"]["ticks"] and "1e-6" in joint["lr"]["ticks"]

    # twins in different units are on different axes, each scaled to its own data
    panel_of = {key: panel for panel, drawn in joint.items() for key in drawn["labels"]}
    for ar_key in AR_LEARNER:
        twin = ar_key.replace("policy/", "diffusion/")
        assert panel_of[ar_key] != panel_of[twin], ar_key
    assert panel_of["policy/version"] == panel_of["diffusion/version"] == "version"
    for panel, key in (("kl", "policy/kl"), ("diffusion-kl", "diffusion/kl"), ("grad-norm", "policy/grad_norm"),
                       ("diffusion-grad-norm", "diffusion/grad_norm"), ("lr", "policy/lr"), ("diffusion-lr", "diffusion/lr"),
                       ("diffusion-logprob-diff", "diffusion/logprob_diff")):
        assert joint[panel]["y"] == pytest.approx([0, 1.15 * max(measured(joint[panel], key))]), panel
    assert joint["diffusion-clip-fraction"]["y"] == pytest.approx([0, 1.15 * drift("diffusion/clip_fraction", 0.3, STEPS - 1)])
    # ratios around 1: the data's range, padded, not from 0
    low, high = joint["diffusion-ratio"]["y"]
    ratio_min, ratio_max = measured(joint["diffusion-ratio"], "diffusion/ratio_min"), measured(joint["diffusion-ratio"], "diffusion/ratio_max")
    assert 0 < low < min(ratio_min) and max(ratio_max) < high < 1.15 * max(ratio_max)

    # no update at NO_UPDATE_STEPS: gaps in the diffusion learner's lines, never zeros
    for panel in DIFFUSION_PANELS:
        for values in joint[panel]["data"][1:]:
            assert values[:2] == [None, None] and None not in values[2:], panel
        assert joint[panel]["spanGaps"] == [False] * len(joint[panel]["labels"])

    # diffusion-only: the frozen AR policy's version is a flat line under the decoder's rising one
    assert measured(alone["version"], "policy/version") == [0.0] * STEPS
    assert measured(alone["version"], "diffusion/version") == [float(max(0, s - 1)) for s in range(STEPS)]
    assert alone["version"]["y"] == pytest.approx([0, 1.15 * (STEPS - 2)])


# An async run with two steps in flight behind a slow judge: the schedule's numbers and each reward
# component's request latency percentiles, by hand (one panel per component, after the step times).
LATENCY_STATS = {"max": 1.4, "p50": 1.0, "p90": 1.2, "p99": 1.3}
ASYNC_PANELS = {
    "reward-mean": ["reward/mean"], "staleness": ["policy/staleness"],
    "schedule-in-flight": ["schedule/in_flight_steps"],
    "schedule-staleness": ["schedule/staleness_max", "schedule/staleness_mean", "schedule/staleness_min"],
    "schedule-resampled": ["schedule/stale_rows_resampled"], "time": ["time/reward"],
    "reward-latency-judge": [f"reward_latency/judge/{stat}" for stat in LATENCY_STATS],
    "reward-latency-ocr": [f"reward_latency/ocr/{stat}" for stat in LATENCY_STATS],
    "throughput": ["throughput/images_per_s"], "metric-rollout-rows": ["rollout/rows"],
}


def async_run_metrics(step: int) -> dict[str, float]:
    in_flight = float(min(step, 2))
    metrics = {
        "reward/mean": mean_reward(step), "policy/staleness": in_flight, "time/reward": 3.0 + 0.1 * step,
        "throughput/images_per_s": 8.0, "rollout/rows": 64.0,
        "schedule/in_flight_steps": in_flight, "schedule/staleness_max": in_flight,
        "schedule/staleness_min": max(0.0, in_flight - 1), "schedule/staleness_mean": max(0.0, in_flight - 0.25),
        "schedule/stale_rows_resampled": 16.0 if step == 5 else 0.0,
    }
    for component, seconds in (("judge", 1.5), ("ocr", 0.05)):
        metrics.update({f"reward_latency/{component}/{stat}": seconds * factor + 0.01 * step
                        for stat, factor in LATENCY_STATS.items()})
    return metrics


def test_page_draws_the_schedule_and_each_reward_components_latency(tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    store = RunStore(tmp_path)
    run = store.create_run("async-judge", {})
    logged = {step: async_run_metrics(step) for step in range(STEPS)}
    for step, metrics in logged.items():
        store.log_metrics(run, step, metrics)
    with dashboard_server(tmp_path) as server, sync_playwright() as playwright:
        browser, page, errors = wide_page(playwright)
        page.goto(f"{server}/?run={run}&poll=300")
        expect(page.locator("#chart-reward-latency-judge")).to_have_attribute("data-points", str(STEPS), timeout=15_000)
        panels = read_panels(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-async.png"), full_page=True)
        browser.close()
    assert errors == []
    assert [(panel, drawn["labels"]) for panel, drawn in panels.items()] == list(ASYNC_PANELS.items())  # page order
    new_panels = [panel for panel in ASYNC_PANELS if panel.startswith(("schedule", "reward-latency"))]
    assert {panel: panels[panel]["title"] for panel in new_panels} == {
        "schedule-in-flight": "Steps in flight (launched, not yet trained)",
        "schedule-staleness": "Staleness of the step's rows (versions behind): min, mean, max",
        "schedule-resampled": "Stale rows sampled again",
        "reward-latency-judge": "Reward latency: judge (s per request)",
        "reward-latency-ocr": "Reward latency: ocr (s per request)",
    }
    for panel, keys in ASYNC_PANELS.items():  # the numbers of the store, step by step
        assert panels[panel]["data"][0] == list(range(STEPS)), panel
        for key in keys:
            assert measured(panels[panel], key) == pytest.approx([logged[s][key] for s in range(STEPS)], abs=1e-12), key
    for panel in new_panels:  # seconds, versions and counts: from 0 to just above the largest value
        top = max(max(measured(panels[panel], key)) for key in ASYNC_PANELS[panel])
        assert panels[panel]["scale"] == "nonneg" and panels[panel]["y"] == pytest.approx([0, 1.15 * top]), panel


def test_page_hides_the_eval_gallery_of_a_run_without_eval(tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    store = RunStore(tmp_path)
    run = store.create_run("no-eval", {})
    for step in range(3):
        store.log_metrics(run, step, {"reward/mean": 0.1 * step})
    with dashboard_server(tmp_path) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{server}/?poll=300")
        expect(page.locator("#chart-reward-mean")).to_have_attribute("data-points", "3", timeout=15_000)
        expect(page.locator("#eval-gallery-box")).to_be_hidden()
        assert list(read_panels(page)) == ["reward-mean"]
        browser.close()


def test_deploy_files_are_valid_and_consistent():
    """cluster.yaml passes Ray's own validation; the KubeRay manifest's groups, resources,
    selectors and env names agree with each other and with the code they start."""
    import json

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    from rewards.app.settings import Settings

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    roles = {"rollout", "decoder", "learner", "reward"}
    cluster = yaml.safe_load((deploy / "cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    for role in roles:
        resources = cluster["available_node_types"][role]["resources"]
        assert resources[role] >= 1 and resources["GPU"] >= 1, role

    job, dashboard_service, rewards_deployment, rewards_service = yaml.safe_load_all(
        (deploy / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert "python -m rl.run.train --config" in job["spec"]["entrypoint"]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == roles
    for role, group in groups.items():
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert set(advertised) == {role} and advertised[role] == gpus, role
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert dashboard_service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    dashboard = next(c for c in head["spec"]["containers"] if c["name"] == "blip3o-rl-dashboard")
    assert dashboard["command"][:2] == ["blip3o-rl", "dashboard"]
    assert dashboard["ports"][0]["containerPort"] == dashboard_service["spec"]["ports"][0]["targetPort"]
    # the dashboard listens on the pod's address: its token comes from a Secret, under the name the
    # settings read (and the VM cluster starts it on the head with the token file it mounts there)
    from deploy.dashboard.settings import DashboardSettings

    [token_env] = dashboard["env"]
    assert token_env["name"] == DashboardSettings.model_config["env_prefix"] + "TOKEN"
    assert token_env["valueFrom"]["secretKeyRef"]["name"] == "blip3o-rl-dashboard"
    [start] = [c for c in cluster["head_start_ray_commands"] if "blip3o-rl dashboard" in c]
    mounted = [path for path in cluster["file_mounts"] if path.endswith("dashboard_token")]
    assert f"{token_env['name']}=$(cat ~/.blip3o-rl/dashboard_token)" in start
    assert mounted == ["/home/ray/.blip3o-rl/dashboard_token"] and "--host 127.0.0.1" in start
    pod = rewards_deployment["spec"]["template"]
    assert rewards_service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [env] = pod["spec"]["containers"][0]["env"]
    assert env["name"] == Settings.model_config["env_prefix"] + "TOKEN"
