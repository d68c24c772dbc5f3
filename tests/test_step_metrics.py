"""The trainer's per-step metrics (rl/run/step_report.py::step_metrics): what a step without an update logs;
the run alarms on them (rl/run/alarms.py).

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
from rl.run.step_report import StepSchedule, progress_line, step_metrics
from rl.scoring.service import SampleReward

LEARNER_KEYS = {"policy/kl", "policy/entropy", "policy/clip_fraction", "policy/clip_low", "policy/clip_high",
                "policy/loss", "policy/grad_norm", "policy/ratio_max", "policy/lr"}
TIMINGS = {"rollout": 1.0, "decode": 0.5, "reward": 2.0, "collect": 3.0, "update": 0.2, "sync": 0.1, "step": 4.0}


def scored(rewards: list[float], reward_latency: dict[str, list[float]] | None = None) -> SimpleNamespace:
    """The three things step_metrics reads from a ScoredStep."""
    samples = [SampleReward(r, "ocr") for r in rewards]
    return SimpleNamespace(rewards=samples, reward_tensor=lambda: torch.tensor(rewards),
                           reward_latency=reward_latency or {})


def test_a_step_without_an_update_logs_no_learner_numbers():
    nothing = LearnerMetrics(policy_version=0, sampler_version=0, optimizer_steps=0, rows=0, zero_signal_share=1.0)
    metrics = step_metrics(scored([0.0, 0.0, 0.0, 0.0]), nothing, None, Versions(0), staleness=0, timings=TIMINGS)
    assert not LEARNER_KEYS & set(metrics)
    assert metrics["groups/zero_signal_share"] == 1.0 and metrics["policy/version"] == 0.0
    assert metrics["ocr/exact"] == 0.0 and metrics["time/decode"] == 0.5
    assert "| kl - (no update) |" in progress_line(2, 10, metrics)


def test_a_step_with_an_update_logs_them():
    trained = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4, zero_signal_share=0.5,
                             kl=0.002, entropy=3.1, clip_low_frac=0.01, clip_high_frac=0.02, loss=-0.1, lr=2e-3,
                             logprob_max_abs_diff=2e-5)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), trained, None, Versions(1), staleness=0, timings=TIMINGS)
    assert LEARNER_KEYS <= set(metrics) and metrics["policy/logprob_diff"] == 2e-5
    assert metrics["policy/clip_fraction"] == pytest.approx(0.03) and metrics["policy/entropy"] == 3.1
    assert metrics["ocr/exact"] == 0.5
    assert "| kl 0.0020 |" in progress_line(3, 10, metrics)


def test_with_steps_in_flight_the_line_says_how_long_the_collect_held_the_step_up():
    nothing = LearnerMetrics(policy_version=0, sampler_version=0, optimizer_steps=0, rows=0, zero_signal_share=1.0)
    timings = {**TIMINGS, "collect_wait": 0.4}
    in_flight = step_metrics(scored([0.0, 1.0]), nothing, None, Versions(0), staleness=1, timings=timings,
                             schedule=StepSchedule(in_flight_steps=2, staleness=[1, 1]))
    assert "| collect 3.00s (waited 0.40s) update 0.20s sync 0.10s (busy:" in progress_line(3, 10, in_flight)
    alone = step_metrics(scored([0.0, 1.0]), nothing, None, Versions(0), staleness=0, timings=timings,
                         schedule=StepSchedule(in_flight_steps=0, staleness=[0, 0]))
    assert "| collect 3.00s update 0.20s sync 0.10s (busy:" in progress_line(3, 10, alone)


def test_without_a_reference_the_kl_is_absent_not_zero():
    no_reference = LearnerMetrics(policy_version=1, sampler_version=0, optimizer_steps=1, rows=4,
                                  zero_signal_share=0.5, kl=float("nan"), entropy=3.1, loss=-0.1, lr=2e-3)
    metrics = step_metrics(scored([0.0, 1.0, 0.5, 1.0]), no_reference, None, Versions(1), staleness=0,
                           timings=TIMINGS)
    assert "policy/kl" not in metrics and metrics["policy/entropy"] == 3.1
    assert "policy/logprob_diff" not in metrics  # NaN (the default): rollouts of older weights, not measured
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


def test_an_alarm_fires_once_per_crossing_of_its_threshold(tmp_path, capsys):
    """Thresholds 0.05 (AR gap) and 1e-4 (diffusion gap), hand values: the AR gap crosses at step 2,
    stays above at 3 (no second alarm), falls back to the threshold at 4 (equal is not above: re-armed),
    crosses again at 5; a step without the metric (6) changes nothing, NaN neither. The diffusion gap
    alarms at step 3 only. Each alarm is an `alarm` event and an `alarm:` console line."""
    from rl.run.alarms import Alarms
    from rl.run.config import LoggingSection
    from rl.run_store import RunStore

    assert LoggingSection().alarms == {"policy/logprob_diff": 0.05, "diffusion/logprob_diff": 1e-4}
    store = RunStore(tmp_path)
    run_id = store.create_run("joint", {})
    store.add_metrics_listener(Alarms(run_id, LoggingSection().alarms, lambda kind, message:
                                      store.log_event(run_id, kind, message)))
    series = {1: (0.02, 1e-5), 2: (0.075, 1e-5), 3: (0.09, 2e-4), 4: (0.05, 2e-4), 5: (0.06, float("nan")),
              6: (None, 5e-5), 7: (0.07, 2e-4)}
    for step, (ar, diffusion) in series.items():
        metrics = {"reward/mean": 0.5, "diffusion/logprob_diff": diffusion}
        store.log_metrics(run_id, step, metrics if ar is None else {**metrics, "policy/logprob_diff": ar})
    store.log_metrics(run_id, 7, {"policy/logprob_diff": 0.07, "eval/ocr/score": 0.4})  # the step again, with its eval
    alarms = [e.message for e in store.events(run_id) if e.kind == "alarm"]
    ar = ": the AR learner and vLLM disagree on the log-probs of the tokens vLLM sampled, at the same weights"
    sana = (": the diffusion learner and the decoder disagree on the SDE log-probs of the decoder's own steps, "
            "at the same weights")
    assert alarms == [f"step 2: policy/logprob_diff = 0.075 is above 0.05 (logging.alarms){ar}",
                      f"step 3: diffusion/logprob_diff = 0.0002 is above 0.0001 (logging.alarms){sana}",
                      f"step 5: policy/logprob_diff = 0.06 is above 0.05 (logging.alarms){ar}",
                      f"step 7: diffusion/logprob_diff = 0.0002 is above 0.0001 (logging.alarms){sana}"]
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("alarm: ")]
    assert console == [f"alarm: {message}" for message in alarms]


def test_the_trainer_listens_for_its_configured_alarms(tmp_path):
    from rl.run.config import load_config
    from rl.run.trainer import Trainer
    from tests.train_support import small_config

    config = small_config(tmp_path, tmp_path / "no-model", **{"logging.alarms": {"reward/std": 0.3}})
    trainer = Trainer(load_config(config))
    trainer.store.log_metrics(trainer.run_id, 1, {"reward/std": 0.4, "policy/logprob_diff": 9.0})  # unwatched
    [alarm] = [e.message for e in trainer.store.events(trainer.run_id) if e.kind == "alarm"]
    assert alarm == "step 1: reward/std = 0.4 is above 0.3 (logging.alarms)"
