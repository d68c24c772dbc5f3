"""Run alarms (config `logging.alarms`): a metric above its threshold is an `alarm` event in the run
store (the dashboard lists events) and an `alarm:` console line, once per crossing: it alarms again
only after the metric came back to or below the threshold. It listens to the store, so every
writer of metrics reaches it (a step logged again with its eval does not alarm twice).

What the defaults watch: the sampler/learner log-prob gap at the weights that sampled the step,
    policy/logprob_diff     max |learner - vLLM| log-prob over the step's image tokens (AR learner)
    diffusion/logprob_diff  max |learner - decoder| per-step SDE log-prob (diffusion learner)
A gap means the policy trained is not the one that sampled (precision, kernels, a LoRA merge
rounding in bf16, top-p ties): the importance ratios and the KL are then measured against
another policy than the rollouts'. Absent metrics (not measured at a step) change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

NOTES = {
    "policy/logprob_diff": "the AR learner and vLLM disagree on the log-probs of the tokens vLLM sampled, at the "
                           "same weights",
    "diffusion/logprob_diff": "the diffusion learner and the decoder disagree on the SDE log-probs of the decoder's "
                              "own steps, at the same weights",
}
"""Why an alarm on these keys matters (the console line and event say it)."""


class Alarms:
    """Thresholds over metrics, each firing once per crossing; a run store metrics listener."""

    def __init__(self, run_id: str, thresholds: Mapping[str, float], log_event: Callable[[str, str], None]):
        self.run_id, self.thresholds, self.log_event = run_id, dict(thresholds), log_event
        self.above: set[str] = set()
        """The metrics whose last value was above their threshold (alarmed already)."""

    def check(self, step: int, metrics: Mapping[str, float | None]) -> list[str]:
        """The alarms of `step`: each watched metric that crosses above its threshold now."""
        messages = []
        for key, threshold in self.thresholds.items():
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            if value <= threshold:
                self.above.discard(key)
            elif key not in self.above:
                self.above.add(key)
                note = f": {NOTES[key]}" if key in NOTES else ""
                messages.append(f"step {step}: {key} = {value:.3g} is above {threshold:g} (logging.alarms){note}")
        return messages

    def __call__(self, run_id: str, step: int, metrics: dict[str, float | None]) -> None:
        if run_id != self.run_id:
            return
        for message in self.check(step, metrics):
            self.log_event("alarm", message)
            print(f"alarm: {message}", flush=True)
