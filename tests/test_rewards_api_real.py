"""The reward server with the REAL scorers over a socket: PaddleOCR (PP-OCRv6 small) and the tiny
Mask2Former + CLIP GenEval pipeline, called through the async client; plus the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewards.app.main import create_app
from rewards.app.settings import Settings
from rewards.client import RewardClient, RewardRequestError
from rewards.geneval import GenevalConfig, GenevalScorer
from rewards.geneval_rules import GenevalMetadata
from rewards.local_server import start_reward_server
from rewards.ocr import OcrConfig, OcrScorer, extract_target
from tests.rewards_support import ocr_prompts, render_text, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real(tiny_geneval_dirs):
    detector_dir, clip_dir = tiny_geneval_dirs
    geneval = GenevalScorer.from_config(GenevalConfig(detector=str(detector_dir), clip=str(clip_dir)))
    ocr = OcrScorer(OcrConfig(size="small"))
    app = create_app(Settings(batch_size=8, batch_wait_ms=20), scorers={"ocr": ocr, "geneval": geneval})
    with serve_in_thread(app) as url:
        yield url, geneval


@pytest.mark.slow
def test_real_ocr_through_server_with_concurrent_clients(real):
    url, _ = real
    prompts = ocr_prompts(8)
    images = [render_text(extract_target(p)) for p in prompts]

    async def run():
        async with RewardClient(url) as client:
            batch = await client.ocr(images[:4], prompts=prompts[:4])
            singles = await asyncio.gather(*(client.ocr([im], prompts=[p]) for im, p in zip(images[4:], prompts[4:])))
            with pytest.raises(RewardRequestError) as error:
                await client.ocr([images[0], images[1]], prompts=[prompts[0], "no quotes here"])
            return batch + [r[0] for r in singles], error.value

    results, error = asyncio.run(run())
    assert [r.target for r in results] == [extract_target(p) for p in prompts]
    assert np.mean([r.reward for r in results]) >= 0.95, [(r.target, r.recognized) for r in results]
    assert error.status == 422 and error.code == "missing_quotes" and error.item == 1
    metrics = httpx.get(f"{url}/metrics").text
    # The 4 concurrent single-image requests were grouped: fewer model calls than the 8 images.
    count = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('reward_batch_size_count{scorer="ocr"}'))
    assert count < 8


@pytest.mark.slow
def test_real_geneval_through_server_matches_in_process(real, tiny_geneval_dirs):
    url, geneval = real
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    metadata = GenevalMetadata.model_validate(
        {"tag": "counting", "include": [{"class": "dog", "count": 4}], "exclude": [{"class": "dog", "count": 5}]}
    )

    async def run():
        async with RewardClient(url) as client:
            return await client.geneval([image], [metadata])

    served = asyncio.run(run())[0]
    local = geneval.score([image], [metadata])[0]
    assert served.correct is local.correct is True and served.reward == local.reward == 1.0
    assert [o.score for o in served.details.objects] == pytest.approx([d.score for d in local.objects["dog"]])
    assert served.details.include[0].found == 4
    # both checkpoints are named, with a hash of their files, on /readyz and in every answer
    detector_dir, clip_dir = (re.escape(str(path)) for path in tiny_geneval_dirs)
    assert re.fullmatch(rf"{detector_dir}#[0-9a-f]{{12}} \+ {clip_dir}#[0-9a-f]{{12}}", geneval.version)
    assert httpx.get(f"{url}/readyz").json()["versions"]["geneval"] == geneval.version


def test_cli_refuses_bad_flags_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "rewards", "serve", "--scorers", "ocr,speech"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "invalid setting scorers" in result.stderr and "Traceback" not in result.stderr


def test_a_local_server_that_exits_is_an_error_quoting_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with code 2: .*invalid setting scorers"):
        start_reward_server(["--scorers", "ocr,speech"], log=tmp_path / "server.log")


@pytest.mark.slow
def test_cli_serves_ocr_with_token_from_env(tmp_path):
    env = {**os.environ, "BLIP3O_RL_REWARDS_TOKEN": "tok"}
    with start_reward_server(["--scorers", "ocr", "--ocr-size", "tiny"], env=env, log=tmp_path / "server.log") as server:
        image = render_text("OPEN")

        async def run(token):
            async with RewardClient(server.url, token=token) as client:
                return await client.ocr([image], targets=["open"])

        assert asyncio.run(run("tok"))[0].reward == 1.0
        with pytest.raises(RewardRequestError, match="401 unauthorized"):
            asyncio.run(run("wrong"))
