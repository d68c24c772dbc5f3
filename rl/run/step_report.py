"""What a finished step reports: its numbers under the run store's keys, a few of its samples, its
console progress line, and its reward notes. Pure functions of the step's records (no Ray, no I/O
but the notes' store events), so the trainer's loop only calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rl.run_store import RunStore, SampleRecord
from rl.scoring.latency import reward_latency_metrics
from rl.scoring.reward_mix import RewardComponentConfig, reward_notes

if TYPE_CHECKING:
    from rl.learners.ar_learner import LearnerMetrics
    from rl.learners.diffusion_learner import DiffusionLearnerMetrics
    from rl.run.fleet import Versions
    from rl.run.pipeline import ScoredStep


@dataclass(frozen=True)
class StepSchedule:
    """Where a step stood in the schedule when it was trained (rl/run/in_flight.py)."""

    in_flight_steps: int
    """Steps launched and not yet trained when this step's update started, this one excluded."""
    staleness: list[int]
    """Per row: the learner's version at the update minus the version that sampled the row."""
    stale_rows_resampled: int = 0
    """Rows sampled again for lagging the learner by more than `schedule.max_staleness` versions."""

    @property
    def staleness_max(self) -> int:
        return max(self.staleness, default=0)


def schedule_metrics(schedule: StepSchedule) -> dict[str, float]:
    """schedule/*: the steps in flight and the step's staleness distribution over its rows."""
    staleness = np.asarray(schedule.staleness or [0], dtype=np.float64)  # [R]
    return {
        "schedule/in_flight_steps": float(schedule.in_flight_steps),
        "schedule/staleness_mean": float(staleness.mean()),
        "schedule/staleness_min": float(staleness.min()),
        "schedule/staleness_max": float(staleness.max()),
        "schedule/stale_rows_resampled": float(schedule.stale_rows_resampled),
    }


def step_metrics(scored: ScoredStep, learner: LearnerMetrics | None, diffusion: DiffusionLearnerMetrics | None,
                 versions: Versions, staleness: int, timings: dict[str, float],
                 schedule: StepSchedule | None = None) -> dict[str, float]:
    """The step's numbers under the run store's key scheme (see rl/run_store.py). `learner` /
    `diffusion`: the AR / diffusion learner's metrics of this step (None: that policy was not updated);
    `staleness`: the oldest row's (policy/staleness); `schedule`: the schedule/* metrics (None: none)."""
    rewards = scored.reward_tensor()
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0}
    per_component: dict[str, list[float]] = {}  # reward/<name>: each component's raw mean over the rows it scored
    for r in scored.rewards:
        for name, value in r.component_rewards().items():
            per_component.setdefault(name, []).append(value)
    for name in sorted(per_component):
        metrics[f"reward/{name}"] = float(np.mean(per_component[name]))
    ocr = [r.reward for r in scored.rewards if r.task == "ocr" and not math.isnan(r.reward)]  # NaN: no OCR in the mix
    if ocr:
        metrics["ocr/exact"] = float(np.mean([value == 1.0 for value in ocr]))
    tags = sorted({r.geneval_tag for r in scored.rewards if r.task == "geneval" and r.geneval_correct is not None})
    for tag in tags:
        metrics[f"geneval/{tag}"] = float(np.mean([bool(r.geneval_correct) for r in scored.rewards if r.geneval_tag == tag]))
    metrics.update(reward_latency_metrics(scored.reward_latency))  # reward_latency/<component>/p50 ...: the judge's wait
    if learner is not None and learner.optimizer_steps > 0:  # no update (every group zero-signal and
        metrics.update({  # filtered): these were never measured, so they stay absent (a gap on the dashboard), not 0
            **({"policy/kl": learner.kl} if not math.isnan(learner.kl) else {}),  # NaN: no reference (beta 0)
            **({"policy/logprob_diff": learner.logprob_max_abs_diff}  # NaN: rollouts of older weights (async)
               if not math.isnan(learner.logprob_max_abs_diff) else {}),
            "policy/entropy": learner.entropy,
            "policy/clip_fraction": learner.clip_low_frac + learner.clip_high_frac,
            "policy/clip_low": learner.clip_low_frac,
            "policy/clip_high": learner.clip_high_frac,
            "policy/loss": learner.loss,
            "policy/grad_norm": learner.grad_norm,
            "policy/ratio_max": learner.ratio_max,
            "policy/lr": learner.lr,
        })
    if diffusion is not None and diffusion.optimizer_steps > 0:
        metrics.update({
            **({"diffusion/kl": diffusion.kl} if not math.isnan(diffusion.kl) else {}),  # NaN: beta 0
            **({"diffusion/logprob_diff": diffusion.logprob_max_abs_diff}
               if not math.isnan(diffusion.logprob_max_abs_diff) else {}),
            "diffusion/clip_fraction": diffusion.clip_fraction,
            "diffusion/loss": diffusion.loss,
            "diffusion/policy_loss": diffusion.policy_loss,
            "diffusion/grad_norm": diffusion.grad_norm,
            "diffusion/ratio_max": diffusion.ratio_max,
            "diffusion/ratio_min": diffusion.ratio_min,
            "diffusion/lr": diffusion.lr,
        })
    for prefix, learned in (("policy", learner), ("diffusion", diffusion)):  # spatial credit, when on
        if learned is not None and not math.isnan(learned.spatial_share):
            metrics[f"{prefix}/spatial_share"] = learned.spatial_share  # tokens (latent positions) with a local signal
            metrics[f"{prefix}/spatial_std"] = learned.spatial_std  # spread of their local advantages
    if diffusion is not None:
        metrics["diffusion/zero_signal_share"] = diffusion.zero_signal_share
    if versions.decoder or diffusion is not None:
        metrics["diffusion/version"] = float(versions.decoder)
    metrics.update({
        "policy/version": float(versions.policy),
        "policy/staleness": float(staleness),
        "groups/zero_signal_share": (learner or diffusion).zero_signal_share,
        "rollout/rows": float(len(rewards)),
    })
    metrics.update(schedule_metrics(schedule) if schedule is not None else {})
    metrics.update({f"time/{stage}": seconds for stage, seconds in timings.items()})
    metrics["throughput/images_per_s"] = len(rewards) / max(timings["step"], 1e-9)
    return metrics


def sample_records(scored: ScoredStep, count: int, group_size: int) -> list[SampleRecord]:
    """`count` samples spread evenly over the step's rows, with their reward breakdown."""
    rows = np.unique(np.linspace(0, len(scored.rewards) - 1, num=min(count, len(scored.rewards))).round().astype(int))
    rows = rows.tolist()
    images = scored.sample_images(rows)  # only these rows' images travel to the driver
    return [
        SampleRecord(
            prompt=scored.items[row // group_size].label,  # an edit's names its source image
            image=image,
            reward=float(scored.mixed.total[row]),  # what GRPO trained on; the components hold each reward
            components=scored.rewards[row].components(),
        )
        for row, image in zip(rows, images)
    ]


def progress_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    stages = " ".join(f"{name} {metrics[f'time/{name}']:.2f}s" for name in ("collect", "update", "sync"))
    if metrics.get("schedule/in_flight_steps", 0) > 0 and "time/collect_wait" in metrics:
        # collect runs from the step's launch, mostly while earlier steps trained: what it held up is the wait
        stages = stages.replace("s update", f"s (waited {metrics['time/collect_wait']:.2f}s) update", 1)
    busy = " ".join(f"{name} {metrics[f'time/{name}']:.2f}" for name in ("rollout", "decode", "reward"))
    if "policy/kl" in metrics:
        kl = f"{metrics['policy/kl']:.4f}"
    else:
        kl = "- (no update)" if "policy/loss" not in metrics else "- (beta 0)"
    diffusion = ""
    if "diffusion/version" in metrics:
        if "diffusion/kl" in metrics:
            diffusion = f" | decoder kl {metrics['diffusion/kl']:.2e}"
        elif "diffusion/loss" in metrics:
            diffusion = " | decoder kl - (beta 0)"
        diffusion += f" | decoder v{int(metrics['diffusion/version'])}"
    return (
        f"step {step}/{steps} | reward {metrics['reward/mean']:.3f} | kl {kl} | "
        f"zero-signal {metrics['groups/zero_signal_share']:.0%} | v{int(metrics['policy/version'])}{diffusion} | "
        f"{stages} (busy: {busy}) | step {metrics['time/step']:.2f}s"
    )


def note_rewards(store: RunStore, run_id: str, step: int, scored: ScoredStep,
                 mix: tuple[RewardComponentConfig, ...], known_versions: dict[str, str]) -> None:
    """The step's reward events (rl/scoring/reward_mix.py): each scorer's version when first seen and when
    it changes (a reward model replaced mid-run), and a warning for a reward constant over the step."""
    for note in reward_notes(step, scored.mixed, mix, known_versions):
        store.log_event(run_id, note.kind, note.message)
        if note.console:
            print(f"warning: {note.message}" if note.kind == "reward_constant" else note.message, flush=True)
