"""What the run checks about its reward service before the first step (rl/scoring/service.py): every
reward its prompts need is served, and a decoded image fits one request. With service "serve"
at config load (`python -m rl.run.train` exits 2 before Ray starts), with "url" against the running
service's /readyz."""

from __future__ import annotations

import pytest

from rewards.app.main import create_app
from rewards.app.settings import Settings
from rl.run.config import ConfigError, load_config
from rl.run.reward_checks import check_reward_service, check_rows_fit_config
from rl.run.train import main
from rl.scoring.service import RewardEndpoint, max_item_bytes
from tests.rewards_support import StubOcr, serve_in_thread
from tests.train_support import small_config

GENEVAL_AND_OCR = [{"kind": "geneval"}, {"kind": "words", "words": ["cat"]}]


def test_the_demo_config_fits_its_reward_service(tmp_path, glyph_model_dir):
    check_rows_fit_config(load_config(small_config(tmp_path, glyph_model_dir)))


def test_prompts_whose_reward_the_configured_server_does_not_run_stop_the_run_at_load(
        tmp_path, glyph_model_dir, capsys):
    config = small_config(tmp_path, glyph_model_dir, **{"data.sources": GENEVAL_AND_OCR})  # server: ocr only
    assert main(["--config", str(config)]) == 2
    assert ("the prompts need the geneval reward, but the reward service (rewards.server.scorers) runs only: ocr"
            in capsys.readouterr().err)


@pytest.mark.parametrize("limit, value, words", [
    ("max_image_pixels", 10_000,
     "the decoder makes 256x64 images, more than the reward service's max_image_pixels (10000"),
    ("max_body_bytes", 100_000, "more than the reward service's max_body_bytes (100000"),
])
def test_images_that_cannot_fit_one_request_are_a_config_error(tmp_path, glyph_model_dir, limit, value, words):
    config = load_config(small_config(tmp_path, glyph_model_dir, **{f"rewards.server.{limit}": value}))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        check_rows_fit_config(config)


def test_the_size_bound_holds_for_incompressible_images():
    import numpy as np

    from rewards.client import encode_png
    from rl.scoring.service import TEXT_ALLOWANCE_BYTES

    noise = np.random.default_rng(0).integers(0, 256, (64, 256, 3), dtype=np.uint8)
    encoded = len(encode_png(noise))  # the worst case: nothing to compress
    assert encoded < max_item_bytes(64, 256) - TEXT_ALLOWANCE_BYTES < 1.05 * encoded  # a bound, and a tight one


def test_the_start_check_asks_the_running_service_and_keeps_its_limits(tmp_path, glyph_model_dir):
    app = create_app(Settings(scorers=["ocr"], max_items=5), scorers={"ocr": StubOcr()})
    with serve_in_thread(app) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=10, outage_budget_s=10, backoff_s=0.05)
        rewards = {"service": "url", "url": url}
        ocr_only = load_config(small_config(tmp_path, glyph_model_dir, rewards=rewards))
        assert check_reward_service(endpoint, ocr_only).limits.max_items == 5  # scoring never asks again
        both = load_config(small_config(tmp_path, glyph_model_dir, rewards=rewards,
                                        **{"data.sources": GENEVAL_AND_OCR}))
        with pytest.raises(ConfigError, match=f"geneval reward, but the reward service \\({url}\\) runs only: ocr"):
            check_reward_service(endpoint, both)
