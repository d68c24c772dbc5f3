"""What a rehearsal reports: the substitutions, the run store's per-step numbers, and whether the
samplers and the learners agree on log-probs in the config's precision.

Agreement is read from metrics the trainer logs every step (rl/run/step_report.py):

    ar       AR_AGREEMENT_METRIC       max |learner - sampler| image-token log-prob (vLLM vs the AR learner)
    decoder  diffusion/logprob_diff    max |learner - sampler| per-step SDE log-prob (decoder vs the
                                       diffusion learner), measured at the update of each step

Both compare the sampler's numbers with the learner's recomputation at the weights the sampler was
told it serves, so any drift between what a worker serves and what the learner trained (a lossy
merge or cast, a stale stream) shows up in them after the first update.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl.rehearsal.substitution import Substitution
from rl.run.config import LoggingSection, TrainConfig
from rl.run_store import RunInfo, RunStore

AR_AGREEMENT_METRIC = "policy/logprob_diff"
DECODER_AGREEMENT_METRIC = "diffusion/logprob_diff"


def tolerance(config: TrainConfig, metric: str) -> float:
    """The largest gap a rehearsal accepts: the run's own alarm threshold for `metric` (`logging.alarms`,
    rl/run/alarms.py; the field's docstring in rl/run/config.py gives the measurements behind the
    defaults: AR 0.05 against 4-5e-3 of bf16 kernel noise, SANA 1e-4 against 0-2e-7), or the default
    where the config turned that alarm off. So a rehearsal fails where the GPU run would alarm."""
    defaults = LoggingSection.model_fields["alarms"].default
    return config.logging.alarms.get(metric, defaults[metric])


STEP_COLUMNS = {  # per-step numbers shown and written (present ones only)
    "reward/mean": "reward", "policy/version": "v", "diffusion/version": "dv", "policy/loss": "loss",
    "policy/kl": "kl", "diffusion/loss": "d.loss", "diffusion/kl": "d.kl", AR_AGREEMENT_METRIC: "ar.lp.diff",
    DECODER_AGREEMENT_METRIC: "dec.lp.diff", "sync/gb_per_s": "sync GB/s", "sync_diffusion/gb_per_s": "d.sync GB/s",
    "time/sync": "sync s", "time/step": "step s",
}


@dataclass(frozen=True)
class Agreement:
    """Sampler/learner log-prob agreement of one policy over the run."""

    policy: str
    """"ar" or "decoder"."""
    metric: str
    precision: str
    tolerance: float
    per_step: dict[int, float]
    """Step -> the metric (steps where it was logged)."""

    @property
    def max_abs_diff(self) -> float | None:
        return max(self.per_step.values()) if self.per_step else None

    @property
    def ok(self) -> bool:
        """Measured at every step and within the tolerance."""
        return self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance


@dataclass
class Report:
    """Everything `blip3o-rl rehearse` prints and writes (as JSON)."""

    config: str
    rehearsal_config: str
    nodes: int
    steps: int
    substituted: list[Substitution]
    run_id: str | None = None
    status: str | None = None
    exit_code: int | None = None
    """The trainer's exit code (rl/run/train.py `main`)."""
    per_step: dict[int, dict[str, float]] = field(default_factory=dict)
    agreement: list[Agreement] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    """The run's fault, recovery, guard, rollback and resume events."""
    worker_logs: str | None = None
    """Where the Ray nodes' logs were kept (every worker's output)."""

    @property
    def steps_completed(self) -> int:
        return max(self.per_step, default=0)

    @property
    def problems(self) -> list[str]:
        """Why the rehearsal failed (empty: it passed)."""
        problems = []
        if self.exit_code != 0 or self.status != "finished" or self.steps_completed < self.steps:
            problems.append(f"the run did not complete its {self.steps} steps (exit {self.exit_code}, status "
                            f"{self.status}, {self.steps_completed} steps logged)")
        for agreement in self.agreement:
            if agreement.max_abs_diff is None:
                problems.append(f"{agreement.policy}: {agreement.metric} was never logged")
            elif not agreement.ok:
                problems.append(f"{agreement.policy}: sampler/learner log-probs differ by up to "
                                f"{agreement.max_abs_diff:.3g} ({agreement.metric}), more than the {agreement.precision} "
                                f"tolerance {agreement.tolerance:g}")
        return problems

    def to_json(self) -> dict:
        return {
            "config": self.config, "rehearsal_config": self.rehearsal_config, "nodes": self.nodes,
            "run_id": self.run_id, "status": self.status, "exit_code": self.exit_code,
            "steps": self.steps, "steps_completed": self.steps_completed,
            "substituted": [asdict(s) for s in self.substituted],
            "per_step": {str(step): row for step, row in sorted(self.per_step.items())},
            "agreement": {a.policy: {"metric": a.metric, "precision": a.precision, "tolerance": a.tolerance,
                                     "max_abs_diff": a.max_abs_diff, "ok": a.ok,
                                     "per_step": {str(s): v for s, v in sorted(a.per_step.items())}}
                          for a in self.agreement},
            "events": self.events, "worker_logs": self.worker_logs, "problems": self.problems, "ok": not self.problems,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def precision_of(config: TrainConfig, policy: str) -> str:
    """"bf16" when the sampler or the learner of `policy` runs in bfloat16, else "fp32"."""
    learner = config.learner if policy == "ar" else config.diffusion_learner
    sampler = config.rollout.engine.dtype if policy == "ar" else config.decoder.decoder.dtype
    return "bf16" if sampler == "bfloat16" or (learner is not None and learner.precision == "bf16") else "fp32"


def agreements(config: TrainConfig, per_step: dict[int, dict[str, float]]) -> list[Agreement]:
    """The agreement of every trained policy (a frozen one has no learner to agree with)."""
    out = []
    for policy, metric, trained in (("ar", AR_AGREEMENT_METRIC, config.learner is not None),
                                    ("decoder", DECODER_AGREEMENT_METRIC, config.diffusion_learner is not None)):
        if trained:
            precision = precision_of(config, policy)
            values = {step: row[metric] for step, row in per_step.items() if metric in row}
            out.append(Agreement(policy, metric, precision, tolerance(config, metric), values))
    return out


EVENT_KINDS = ("alarm", "worker_fault", "recovered", "guard", "rollback", "resume", "failed", "stopped", "error")


def read_run(store: RunStore, run: RunInfo) -> tuple[dict[int, dict[str, float]], list[str]]:
    """Every logged metric by step (finite values only), and the run's notable events."""
    per_step: dict[int, dict[str, float]] = {}
    for step, key, value, _ in store.scalars(run.id):
        if math.isfinite(value):
            per_step.setdefault(step, {})[key] = value
    events = [f"{e.kind}: {e.message}" for e in store.events(run.id) if e.kind in EVENT_KINDS]
    return per_step, events


def format_substitutions(report: Report) -> str:
    """The console table of what the rehearsal substituted, and why."""
    lines = [f"rehearsal of {report.config} ({report.nodes} Ray node{'s' * (report.nodes > 1)}; "
             f"config run: {report.rehearsal_config})", f"substituted ({len(report.substituted)}):"]
    for s in report.substituted:
        lines.append(f"  {s.key}: {_short(s.was)} -> {_short(s.now)}")
        lines.append(f"      why: {s.why}")
    return "\n".join(lines)


def format_outcome(report: Report) -> str:
    """The console form of the run: per-step numbers, events, agreement, verdict."""
    lines = [f"run {report.run_id}: {report.status}, exit {report.exit_code}, "
             f"{report.steps_completed}/{report.steps} steps"]
    columns = [key for key in STEP_COLUMNS if any(key in row for row in report.per_step.values())]
    if columns:
        lines.append("  step " + " ".join(f"{STEP_COLUMNS[key]:>11}" for key in columns))
        for step, row in sorted(report.per_step.items()):
            lines.append(f"  {step:>4} " + " ".join(f"{_number(row.get(key)):>11}" for key in columns))
    lines += [f"  {event}" for event in report.events]
    if report.worker_logs:
        lines.append(f"  worker logs: {report.worker_logs}")
    lines.append("sampler/learner log-prob agreement:")
    for a in report.agreement:
        measured = "never logged" if a.max_abs_diff is None else f"max {a.max_abs_diff:.3g}"
        lines.append(f"  {a.policy:<8} {a.precision} {a.metric}: {measured} (tolerance {a.tolerance:g}) "
                     f"{'ok' if a.ok else 'FAILED'}")
    lines.append("rehearsal passed" if not report.problems else "rehearsal FAILED: " + "; ".join(report.problems))
    return "\n".join(lines)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"
