"""The reward-hacking guard's rules (rl/guard/rules.py) on metric sequences built by hand, its state across a
resume, the hyperparameters after rollbacks, and the checkpoint bookkeeping a rollback relies on."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from rl.checkpoint import CheckpointDir, TrainerState, policy_digest, weights_digest
from rl.guard.config import GuardSection, RollbackSection
from rl.guard.rules import Guard, GuardState, rollback_hyperparameters
from rl.prompts.sources import SamplerState

DARK = "images/dark_share"


def band(**changes) -> dict:
    return {"kind": "band", "metric": DARK, "baseline_steps": 2, "tolerance": 0.5, **changes}


def guard_of(*rules: dict, **section) -> Guard:
    return Guard(GuardSection.model_validate({"rules": list(rules), **section}))


def fired_steps(guard: Guard, series: dict[int, dict[str, float]]) -> list[int]:
    return [firing.step for step, metrics in series.items() for firing in guard.observe(step, metrics)]


def dark(*values: float, first: int = 1) -> dict[int, dict[str, float]]:
    return {first + i: {DARK: v} for i, v in enumerate(values)}


def test_band_fires_once_per_excursion_around_the_first_steps_mean():
    guard = guard_of(band())
    # baseline mean(0.4, 0.2) = 0.3, band 0.3 +- 50% = [0.15, 0.45]; 0.45 is inside (edges count)
    series = dark(0.4, 0.2, 0.45, 0.46, 0.9, 0.3, 0.1)
    firings = [f for step, m in series.items() for f in guard.observe(step, m)]
    assert [f.step for f in firings] == [4, 7]  # 0.9 at step 5 is the same excursion; back in at 6
    assert [f.since for f in firings] == [4, 7]  # patience 1: each excursion begins where it fires
    assert firings[0].value == 0.46 and firings[0].rule == "band images/dark_share"
    assert "[0.1500, 0.4500]" in firings[0].detail and "steps 1-2" in firings[0].detail


def test_band_absolute_tolerance_and_patience():
    guard = guard_of(band(baseline_steps=1, tolerance=0.1, relative=False, patience=2))
    # band 0.3 +- 0.1; one step outside (0.45) then back in resets the streak; two in a row fire
    series = dark(0.3, 0.45, 0.35, 0.45, 0.15, 0.5)
    firings = [f for step, m in series.items() for f in guard.observe(step, m)]
    assert [(f.step, f.since) for f in firings] == [(5, 4)]  # the excursion began at step 4


def test_band_skips_steps_without_the_metric():
    guard = guard_of(band())
    series = {1: {DARK: 0.4}, 2: {"reward/mean": 1.0}, 3: {DARK: float("nan")}, 4: {DARK: 0.2}, 5: {DARK: 0.5}}
    assert fired_steps(guard, series) == [5]  # baseline from steps 1 and 4: [0.15, 0.45]


def reward_eval_series(rewards: list[float], evals: dict[int, float]) -> dict[int, dict[str, float]]:
    return {step: {"reward/mean": r, **({"eval/ocr/score": evals[step]} if step in evals else {})}
            for step, r in enumerate(rewards, start=1)}


RISING = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_reward_up_eval_down_fires_when_eval_falls_while_reward_rises():
    rule = {"kind": "reward_up_eval_down", "window": 4, "reward_average": 2}
    guard = guard_of(rule)
    # step 4: eval 0.5 -> 0.6, up: no. Step 6: oldest eval within 4 steps is step 2's 0.5 -> 0.4 (a drop
    # of 0.1) while R(6) = mean(0.5, 0.6) = 0.55 > R(2) = mean(0.1, 0.2) = 0.15
    firings = [f for s, m in reward_eval_series(RISING, {2: 0.5, 4: 0.6, 6: 0.4}).items()
               for f in guard.observe(s, m)]
    assert [(f.step, f.since) for f in firings] == [(6, 3)]  # the eval of step 2 was still the better one
    assert firings[0].value == 0.4 and "0.5000 (step 2) -> 0.4000" in firings[0].detail
    assert "0.1500 -> 0.5500" in firings[0].detail
    # step 8: the oldest point within 4 steps is step 4's 0.6 -> 0.55: fires again
    guard = guard_of(rule)
    assert fired_steps(guard, reward_eval_series(RISING, {2: 0.5, 4: 0.6, 8: 0.55})) == [8]


def test_reward_up_eval_down_stays_quiet_otherwise():
    rule = {"kind": "reward_up_eval_down", "window": 4, "reward_average": 2}
    falling = RISING[::-1]
    assert fired_steps(guard_of(rule), reward_eval_series(falling, {2: 0.5, 6: 0.4})) == []  # reward fell too
    assert fired_steps(guard_of(rule), reward_eval_series(RISING, {})) == []  # no in-run eval: never
    assert fired_steps(guard_of(rule), reward_eval_series(RISING, {1: 0.5, 6: 0.4})) == []  # step 1 is out of the window
    small_drop = {**rule, "min_eval_drop": 0.2}
    assert fired_steps(guard_of(small_drop), reward_eval_series(RISING, {2: 0.5, 6: 0.4})) == []
    named = {**rule, "eval_metric": "eval/geneval/score"}  # watches another key: this one is ignored
    assert fired_steps(guard_of(named), reward_eval_series(RISING, {2: 0.5, 6: 0.4})) == []


def test_state_survives_a_resume_and_forgets_the_redone_steps():
    """A resume from step k continues with what the rules knew after k, exactly like the straight run."""
    straight = guard_of(band())
    assert fired_steps(straight, dark(0.4, 0.2, 0.3, 0.6)) == [4]
    assert straight.count_rollback() == 1
    saved = straight.state().model_dump_json()
    resumed = Guard(straight.config, GuardState.model_validate_json(saved))
    resumed.forget_after(3)  # steps after 3 are redone: the excursion of step 4 is forgotten
    assert resumed.rollbacks == 1  # never forgotten: it bounds the rollbacks
    assert fired_steps(resumed, dark(0.6, first=4)) == [4]
    early = Guard(straight.config, GuardState.model_validate_json(saved))
    early.forget_after(1)  # the baseline was still being measured at step 1: step 2 is measured again
    assert fired_steps(early, dark(0.4, 0.5, first=2)) == []  # new baseline mean(0.4, 0.4) -> [0.2, 0.6]
    assert fired_steps(early, dark(0.7, first=4)) == [4]
    with pytest.raises(ValueError, match="does not match"):
        Guard(GuardSection.model_validate({"rules": [band(), band()]}), GuardState.model_validate_json(saved))


def test_config_is_strict():
    with pytest.raises(ValidationError, match="tolerance"):
        GuardSection.model_validate({"rules": [band(tolerance=0)]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        GuardSection.model_validate({"rules": [band(windw=3)]})
    with pytest.raises(ValidationError, match="kind"):
        GuardSection.model_validate({"rules": [{"kind": "bands", "metric": DARK, "tolerance": 0.1}]})
    with pytest.raises(ValidationError, match="action"):
        GuardSection.model_validate({"rules": [band()], "action": "rollbak"})
    with pytest.raises(ValidationError, match="rules"):
        GuardSection.model_validate({"rules": []})


def test_rollback_hyperparameters_depend_on_the_count_alone():
    rollback = RollbackSection(lr_scale=0.5, beta=0.01)
    first, second = rollback_hyperparameters(rollback, 0.0, 1), rollback_hyperparameters(rollback, 0.0, 2)
    assert (first.lr_scale, first.beta) == (0.5, 0.01) and (second.lr_scale, second.beta) == (0.25, 0.01)
    none = rollback_hyperparameters(rollback, 0.0, 0)
    assert (none.lr_scale, none.beta) == (1.0, 0.0)
    keep_beta = rollback_hyperparameters(RollbackSection(lr_scale=0.1), 0.001, 3)
    assert keep_beta.lr_scale == pytest.approx(1e-3) and keep_beta.beta == 0.001


def test_discard_after_points_latest_at_the_rollback_target(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=10)
    for step in (2, 4, 6):
        tmp = checkpoints.begin(step)
        (tmp / "learner").mkdir()
        checkpoints.commit(tmp, TrainerState(step, step, "run", SamplerState(cursors=[step])))
    checkpoints.discard_after(4)
    assert checkpoints.complete_steps() == [2, 4] and checkpoints.latest() == checkpoints.path_for(4)
    checkpoints.discard_after(2)
    assert checkpoints.load_state(checkpoints.latest()).sampler.cursors == [2]


def test_weights_digest_is_bitwise_and_matches_the_exported_file(tmp_path):
    weights = {"model.embed.weight": torch.randn(5, 3), "model.norm.weight": torch.ones(3)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert policy_digest(tmp_path) == weights_digest(weights)
    with_alias = {**weights, "lm_head.weight": weights["model.embed.weight"]}  # tied: not written by an export
    assert weights_digest(with_alias) == weights_digest(weights)
    flipped = {**weights, "model.norm.weight": weights["model.norm.weight"].clone()}
    flipped["model.norm.weight"].view(torch.int32)[0] ^= 1  # one bit of one float
    assert weights_digest(flipped) != weights_digest(weights)


def test_a_resumed_trainer_continues_the_guard_from_its_saved_state(tmp_path):
    """Trainer(config, resume=run) takes guard.json back: its rollback count, minus what it saw after
    the checkpoint's step; a guard config whose rules differ is refused (ConfigError)."""
    from rl.run.config import ConfigError, load_config
    from rl.run.trainer import Trainer
    from tests.train_support import small_config

    config = load_config(small_config(tmp_path, tmp_path / "no-model", steps=10,
                                      guard={"action": "rollback", "rules": [band()]}))
    first = Trainer(config)
    tmp = first.checkpoints.begin(3)  # the run's checkpoint of step 3 (no learner files needed here)
    first.checkpoints.commit(tmp, TrainerState(3, 3, first.run_id, SamplerState(cursors=[3])))
    assert fired_steps(first.guard, dark(0.4, 0.2, 0.3, 0.6)) == [4]
    first.guard.count_rollback()
    first.guard.save()

    resumed = Trainer(config, resume=first.run_id)
    assert resumed.state.step == 3 and resumed.guard.rollbacks == 1
    assert fired_steps(resumed.guard, dark(0.6, first=4)) == [4]  # step 4 is redone: it fires again
    two_rules = config.model_copy(update={"guard": GuardSection.model_validate({"rules": [band(), band()]})})
    with pytest.raises(ConfigError, match="guard.json cannot be resumed"):
        Trainer(two_rules, resume=first.run_id)


def test_guard_actions_short_of_a_rollback(tmp_path):
    """What the trainer does on a firing (the end-to-end test does the rollback itself): every firing
    is a `guard` event; warn trains on; stop, a rollback without any checkpoint yet, and a firing
    after max_rollbacks raise GuardTripped, which the loop turns into the clean stop (exit 5)."""
    from rl.guard.rollback import GuardTripped
    from rl.run.config import load_config
    from rl.run.trainer import Trainer
    from tests.train_support import small_config

    def trainer(action: str, **rollback) -> Trainer:
        directory = tmp_path / f"{action}-{len(rollback)}"
        directory.mkdir()
        guard = {"action": action, "rules": [band()], "rollback": rollback}
        return Trainer(load_config(small_config(directory, tmp_path / "no-model", steps=10, guard=guard)))

    def feed(trainer: Trainer, *values: float) -> list[bool]:
        return [trainer._guard_step(step, metrics) for step, metrics in dark(*values).items()]

    warn = trainer("warn")
    assert feed(warn, 0.4, 0.2, 0.3, 0.6, 0.7) == [False] * 5
    events = [e for e in warn.store.events(warn.run_id) if e.kind == "guard"]
    assert len(events) == 1 and events[0].message.startswith("step 4: band images/dark_share: 0.6000 is outside")
    stop = trainer("stop")
    with pytest.raises(GuardTripped, match="step 4: band"):
        feed(stop, 0.4, 0.2, 0.3, 0.6)
    with pytest.raises(GuardTripped, match="no checkpoint to roll back to"):
        feed(trainer("rollback"), 0.4, 0.2, 0.3, 0.6)
    spent = trainer("rollback", max_rollbacks=1)
    spent.guard.count_rollback()
    with pytest.raises(GuardTripped, match=r"max_rollbacks \(1\) already taken"):
        feed(spent, 0.4, 0.2, 0.3, 0.6)


class StandInLearners:
    """A learner group whose `load_checkpoint` takes the weights a checkpoint's learner folder holds
    (one tensor, written by the test), and whose digest is theirs."""

    def __init__(self):
        self.weights, self.version, self.hyperparameters = None, None, None

    def load_checkpoint(self, directory: str, version: int | None = None) -> int:
        from safetensors.torch import load_file

        self.weights, self.version = load_file(f"{directory}/weights.safetensors"), version
        return version

    def weights_digest(self) -> str:
        return weights_digest(self.weights)

    def set_hyperparameters(self, lr_scale: float, beta: float) -> None:
        self.hyperparameters = (lr_scale, beta)


def test_a_rollback_restores_a_checkpoint_from_before_the_excursion(tmp_path):
    """Patience 2: steps 4 and 5 are outside the band, it fires at 5. The run has checkpoints of steps 2,
    4 and 5, and an eval pinned step 5 as the best before the guard saw step 5 (what `_evaluate` does
    before `_guard_step`). Steps 4 and 5 are inside the excursion: the rollback restores step 2, the
    newest checkpoint older than the excursion's first step, bit for bit and under a new version. The
    steps in flight (async) are dropped first: waited out (tests/test_pipeline.py, tests/test_async_schedule.py)."""
    from types import SimpleNamespace

    from rl.run.config import load_config
    from rl.run.policies import ARPolicy
    from rl.run.trainer import Trainer
    from tests.train_support import small_config

    guard = {"action": "rollback", "rules": [band(patience=2)], "rollback": {"lr_scale": 0.5, "beta": 0.01}}
    trainer = Trainer(load_config(small_config(tmp_path, tmp_path / "no-model", steps=10, guard=guard,
                                               **{"checkpoint.keep_last": 3})))
    group, published = StandInLearners(), []
    trainer.policies = {"ar": ARPolicy(group, trainer.config.learner, lambda versions, _: published.append(versions))}
    fleet_calls = []
    trainer.fleet = SimpleNamespace(check_versions=lambda versions, timeout_s: None,
                                    describe=lambda versions: f"v{versions.policy}", name=lambda actor: actor,
                                    restart=lambda actor: fleet_calls.append(("restart", actor)),
                                    recover=lambda versions, why: fleet_calls.append(("recover", why)))
    dropped = []  # async: the next steps are in flight when the guard fires; one worker stays busy with one
    trainer.in_flight = SimpleNamespace(drain=lambda stage_timeout_s: dropped.append(stage_timeout_s) or ["rollout-0"])
    for step in (2, 4, 5):  # weights of step s: a tensor holding s; the export is the same tensor
        tmp = trainer.checkpoints.begin(step)
        for folder, name in (("learner", "weights"), ("policy", "model")):
            (tmp / folder).mkdir()
            save_file({"w": torch.full((3,), float(step))}, str(tmp / folder / f"{name}.safetensors"))
        trainer.checkpoints.commit(tmp, TrainerState(step, step, trainer.run_id, SamplerState(cursors=[step])))
    trainer.checkpoints.mark_best(5, 0.9)
    trainer.state = TrainerState(5, 5, trainer.run_id, SamplerState(cursors=[5]))
    trainer.checkpointed_step = 5

    rolled = [trainer._guard_step(step, metrics) for step, metrics in dark(0.4, 0.2, 0.3, 0.6, 0.7).items()]
    assert rolled == [False, False, False, False, True]
    [rollback] = [e.message for e in trainer.store.events(trainer.run_id) if e.kind == "rollback"]
    assert rollback.startswith("rollback 1/2 to step-000002: learner weights policy sha256 ")
    assert "served as v6; training on from step 3 with lr x0.5 (0.001), beta 0.01" in rollback
    assert group.weights["w"].tolist() == [2.0, 2.0, 2.0] and group.version == 6
    assert group.hyperparameters == (0.5, 0.01)
    assert (trainer.state.step, trainer.state.policy_version, trainer.state.sampler.cursors) == (2, 6, [2])
    assert [versions.policy for versions in published] == [6]
    assert trainer.checkpoints.complete_steps() == [2]  # the steps after the target are redone
    # the steps in flight were waited out first; the worker still busy with one restarted like a hung one
    assert dropped == [trainer.config.schedule.stage_timeout_s]
    assert fleet_calls == [("restart", "rollout-0"),
                           ("recover", "step 5: guard rollback: rollout-0 still busy with a dropped step")]
