"""Shared, session-scoped fixtures: tiny model directories and one Ray cluster of our own.

Expensive things (model dirs, a Ray cluster, a vLLM engine) are built once per test session.
The Ray cluster lives in a temp dir of its own (`address="local"`), so tests never attach to, or
stop, another cluster on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny BLIP3o-NEXT-shaped model (Qwen3 AR + connector + SANA + DC-AE), random weights."""
    from policy.tiny import PRESETS, make_tiny

    directory = tmp_path_factory.mktemp("tiny-sana")
    make_tiny(directory, PRESETS["sana"])
    return directory


@pytest.fixture(scope="session")
def glyph_model_dir(tmp_path_factory) -> Path:
    """The tiny AR model of the CPU learning demo (64 image tokens, 8 per image, glyph decoder)."""
    from policy.tiny import PRESETS, make_tiny

    directory = tmp_path_factory.mktemp("tiny-glyph")
    make_tiny(directory, PRESETS["glyph"])
    return directory


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, in a short temp dir (socket paths are capped)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


# In-process vLLM engines live for the whole session, one per model, and are the only ones a test may
# start in this process: when an engine is garbage collected, vLLM's shutdown tears down the process's
# distributed state (`cleanup_dist_env_and_memory`), which every other in-process engine still uses
# ("pipeline model parallel group is not initialized" on its next generate). Tests that update an
# engine's weights restore the original weights before they return.

@pytest.fixture(scope="session")
def vllm_rollout_worker(tiny_model_dir):
    """The tiny SANA model's AR policy served by vLLM in this process."""
    from rollout.ar_worker import ARRolloutWorker
    from rollout.config import RolloutConfig

    return ARRolloutWorker(RolloutConfig(model=str(tiny_model_dir), kv_cache_gib=1, max_model_len=256))


@pytest.fixture(scope="session")
def glyph_rollout_worker(glyph_model_dir):
    """The glyph model's AR policy served by vLLM in this process (`blip3o-rl eval`'s configuration)."""
    from rollout.ar_worker import ARRolloutWorker
    from rollout.config import RolloutConfig

    return ARRolloutWorker(RolloutConfig(model=str(glyph_model_dir), kv_cache_gib=1))


@pytest.fixture(scope="session")
def tiny_geneval_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random Mask2Former (80 COCO labels, every query a confident dog) and tiny CLIP dirs."""
    from rewards.tiny import make_tiny_geneval_models

    return make_tiny_geneval_models(tmp_path_factory.mktemp("tiny-geneval"))
