"""The trainer's per-step metrics (rl/run/train.py::step_metrics): what a step without an update logs.

A step whose groups were all zero-signal (and filtered) trains nothing: the learner's numbers were
never measured, so they must be absent from the store (a gap on the dashboard), not placeholder 0s.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rl.learners.ar_learner import LearnerMetrics
from rl.learners.diffusion_learner import DiffusionLearnerMetrics
from rl.run.fleet import Versions
from rl.run.train import progress_line, step_metrics
from rl.scoring.service import SampleReward

LEARNER_KEYS = {"policy/kl", "policy/entropy", "policy/clip_fraction", "policy/clip_low", "policy/clip_high",
                "policy/loss", "policy/grad_norm", "policy/ratio_max", "policy/lr"}
TIMINGS = {"rollout": 1.0, "decode": 0.5, "reward": 2.0, "collect": 3.0, "update": 0.2, "sync": 0.1, "step": 4.0}


def scored(rewards: list[float]) -> SimpleNamespace:
    """The two things step_metrics reads from a ScoredStep."""
    samples = [SampleReward(r, "ocr") for r in rewards]
    return SimpleNamespace(rewards=samples, reward_tensor=lambda: torch.tensor(rewards))


def test_a_step_without_an_update_logs_no_learner_numbers():
    nothing = LearnerMetrics(policy_version=0, sampler_version=0, optimizer_steps=0, rows=0, zero_signal_share=1.0)
    metrics = step_metrics(scored([0.0, 0.0, 0.0, 0.0]), nothing, None, Versions(0), staleness=0, timings=TIMINGS)
    assert not LEARNER_KEYS & set(metrics)
    assert metrics["groups/zero_signal_share"] == 1.0 and metrics["policy/version"] == 0.0
    assert metrics["ocr/exact"] == 0.0 and metrics["time/decode"] == 0.5
    assert "| kl - (no update) |" in progress_line(2, 10, metrics)


def test_a_step_with_an_update_logs_them():
    trained = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4, zero_signal_share=0.5,
                             kl=0.002, entropy=3.1, clip_low_frac=0.01, clip_high_frac=0.02, loss=-0.1, lr=2e-3)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), trained, None, Versions(1), staleness=0, timings=TIMINGS)
    assert LEARNER_KEYS <= set(metrics)
    assert metrics["policy/clip_fraction"] == pytest.approx(0.03) and metrics["policy/entropy"] == 3.1
    assert metrics["ocr/exact"] == 0.5
    assert "| kl 0.0020 |" in progress_line(3, 10, metrics)


def test_without_a_reference_the_kl_is_absent_not_zero():
    no_reference = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4,
                                  zero_signal_share=0.5, kl=float("nan"), entropy=3.1, loss=-0.1, lr=2e-3)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), no_reference, None, Versions(1), staleness=0,
                           timings=TIMINGS)
    assert "policy/kl" not in metrics and metrics["policy/entropy"] == 3.1
    assert "| kl - (beta 0) |" in progress_line(3, 10, metrics)


DIFFUSION_KEYS = {"diffusion/kl", "diffusion/logprob_diff", "diffusion/clip_fraction", "diffusion/loss",
                  "diffusion/policy_loss", "diffusion/grad_norm", "diffusion/ratio_max", "diffusion/ratio_min",
                  "diffusion/lr"}


def test_a_diffusion_only_step_logs_the_decoders_numbers_and_no_ar_learner_numbers():
    """train: [diffusion]: the AR policy is frozen at its version; the decoder's numbers and its
    own version are logged under diffusion/*, and the progress line shows them."""
    decoder = DiffusionLearnerMetrics(policy_version=3, sampler_version=2, optimizer_steps=2, rows=4,
                                      zero_signal_share=0.5, kl=2e-5, clip_fraction=0.25, loss=-0.01, lr=1e-3,
                                      ratio_max=1.001, ratio_min=0.999, logprob_max_abs_diff=3e-7)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), None, decoder, Versions(0, 3), staleness=0, timings=TIMINGS)
    assert DIFFUSION_KEYS <= set(metrics) and not LEARNER_KEYS & set(metrics)
    assert metrics["diffusion/version"] == 3.0 and metrics["policy/version"] == 0.0
    assert metrics["diffusion/clip_fraction"] == 0.25 and metrics["diffusion/logprob_diff"] == 3e-7
    assert metrics["groups/zero_signal_share"] == 0.5
    line = progress_line(4, 10, metrics)
    assert "| kl - (no update) |" in line and "| decoder kl 2.00e-05 | decoder v3 |" in line


def test_a_joint_step_logs_both_and_a_frozen_step_of_the_decoder_only_its_version():
    trained = LearnerMetrics(policy_version=2, sampler_version=1, optimizer_steps=1, rows=4, zero_signal_share=0.5,
                             kl=0.002, entropy=3.1, loss=-0.1, lr=2e-3)
    decoder = DiffusionLearnerMetrics(policy_version=2, sampler_version=1, optimizer_steps=1, rows=4,
                                      zero_signal_share=0.5, kl=float("nan"), logprob_max_abs_diff=float("nan"))
    joint = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), trained, decoder, Versions(2, 2), staleness=0, timings=TIMINGS)
    assert LEARNER_KEYS <= set(joint)
    assert DIFFUSION_KEYS - {"diffusion/kl", "diffusion/logprob_diff"} <= set(joint)
    assert "diffusion/kl" not in joint and "diffusion/logprob_diff" not in joint  # NaN: never measured
    assert "| decoder kl - (beta 0) | decoder v2 |" in progress_line(2, 10, joint)
    # schedule.alternate: a step that updated only the AR policy still shows the decoder's version
    ar_turn = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), trained, None, Versions(2, 2), staleness=0, timings=TIMINGS)
    assert not DIFFUSION_KEYS & set(ar_turn) and ar_turn["diffusion/version"] == 2.0
