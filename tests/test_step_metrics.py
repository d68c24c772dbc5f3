"""The trainer's per-step metrics (rl/train.py::step_metrics): what a step without an update logs.

A step whose groups were all zero-signal (and filtered) trains nothing: the learner's numbers were
never measured, so they must be absent from the store (a gap on the dashboard), not placeholder 0s.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rl.learner import LearnerMetrics
from rl.scoring import SampleReward
from rl.train import progress_line, step_metrics

LEARNER_KEYS = {"policy/kl", "policy/entropy", "policy/clip_fraction", "policy/clip_low", "policy/clip_high",
                "policy/loss", "policy/grad_norm", "policy/ratio_max", "policy/lr"}
TIMINGS = {"rollout": 1.0, "decode": 0.5, "reward": 2.0, "collect": 3.0, "update": 0.2, "sync": 0.1, "step": 4.0}


def scored(rewards: list[float]) -> SimpleNamespace:
    """The two things step_metrics reads from a ScoredStep."""
    samples = [SampleReward(r, "ocr") for r in rewards]
    return SimpleNamespace(rewards=samples, reward_tensor=lambda: torch.tensor(rewards))


def test_a_step_without_an_update_logs_no_learner_numbers():
    nothing = LearnerMetrics(policy_version=0, sampler_version=0, optimizer_steps=0, rows=0, zero_signal_share=1.0)
    metrics = step_metrics(scored([0.0, 0.0, 0.0, 0.0]), nothing, staleness=0, timings=TIMINGS)
    assert not LEARNER_KEYS & set(metrics)
    assert metrics["groups/zero_signal_share"] == 1.0 and metrics["policy/version"] == 0.0
    assert metrics["ocr/exact"] == 0.0 and metrics["time/decode"] == 0.5
    assert "| kl - (no update) |" in progress_line(2, 10, metrics)


def test_a_step_with_an_update_logs_them():
    trained = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4, zero_signal_share=0.5,
                             kl=0.002, entropy=3.1, clip_low_frac=0.01, clip_high_frac=0.02, loss=-0.1, lr=2e-3)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), trained, staleness=0, timings=TIMINGS)
    assert LEARNER_KEYS <= set(metrics)
    assert metrics["policy/clip_fraction"] == pytest.approx(0.03) and metrics["policy/entropy"] == 3.1
    assert metrics["ocr/exact"] == 0.5
    assert "| kl 0.0020 |" in progress_line(3, 10, metrics)


def test_without_a_reference_the_kl_is_absent_not_zero():
    no_reference = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4,
                                  zero_signal_share=0.5, kl=float("nan"), entropy=3.1, loss=-0.1, lr=2e-3)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), no_reference, staleness=0, timings=TIMINGS)
    assert "policy/kl" not in metrics and metrics["policy/entropy"] == 3.1
    assert "| kl - (beta 0) |" in progress_line(3, 10, metrics)
