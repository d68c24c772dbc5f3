"""In-run evaluation (rl/evaluation/in_run.py, Trainer._evaluate): the config, the best-eval
checkpoint, then one short real run on the glyph demo.

Cost: the unit tests take a second; the end-to-end test is one 3-step glyph run (Ray, vLLM, Serve,
DeepSpeed) with two evals of 4 OCR prompts x 2 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.checkpoint import CheckpointDir, CheckpointError, TrainerState
from rl.evaluation.harness import EvalReport, EvalSpec, SampleResult, geneval_scores, ocr_scores
from rl.evaluation.in_run import eval_metrics, gallery_records
from rl.prompts.sources import BENCH_PROMPTS, SamplerState
from rl.run.config import ConfigError, load_config
from tests.train_support import metric_table, only_run, small_config, train

OCR_EVAL = {"every": 2, "bench": "ocr", "prompts": 4, "images_per_prompt": 2}


def ocr_test_prompts() -> list[str]:
    return [line.strip() for line in BENCH_PROMPTS["ocr"].read_text().splitlines() if line.strip()]


# ---- the config ----------------------------------------------------------------------------------

def test_config_takes_eval_prompts_only_where_no_source_trains_on_them(tmp_path):
    from rl.run.reward_checks import required_scorers

    model = tmp_path / "model"
    config = load_config(small_config(tmp_path, model, eval=OCR_EVAL))
    assert config.eval.bench == "ocr" and config.eval.prompts == 4
    assert [s for s in range(1, 8) if config.eval.due(s, 7)] == [2, 4, 6, 7]  # every 2nd, and the last

    tests = ocr_test_prompts()
    trained = tmp_path / "trained.txt"
    # a source (allowed eval prompts, for tests) holding the 3rd evaluated prompt: refused
    trained.write_text(f"{tests[2]}\n")
    source = {"kind": "ocr", "path": str(trained), "allow_eval_prompts": True}
    words = {"kind": "words", "words": ["cat"]}
    with pytest.raises(ConfigError, match=r"eval \(ocr\) vs data\.sources\.1: 1 of the 4 evaluation prompts are trained on"):
        load_config(small_config(tmp_path, model, eval=OCR_EVAL, **{"data.sources": [words, source]}))
    # the same target text in another prompt is an overlap too (the OCR reward reads only the target)
    target = tests[0].split('"')[1]
    with pytest.raises(ConfigError, match="evaluation prompts are trained on"):
        load_config(small_config(tmp_path, model, eval=OCR_EVAL, **{"data.sources": [
            {"kind": "words", "words": [target], "allow_eval_prompts": True}]}))
    # a test prompt the eval does not score (the 5th, with prompts: 4) may be trained on (tests only)
    trained.write_text(f"{tests[4]}\n")
    assert load_config(small_config(tmp_path, model, eval=OCR_EVAL, **{"data.sources": [words, source]})).eval

    with pytest.raises(ConfigError, match=r"eval\.evry: Extra inputs are not permitted"):
        load_config(small_config(tmp_path, model, eval={**OCR_EVAL, "evry": 3}))
    # a GenEval eval needs the geneval scorer even when training only reads text
    geneval = load_config(small_config(tmp_path, model, eval={"every": 5, "bench": "geneval", "prompts": 6}))
    assert required_scorers(geneval) == {"ocr", "geneval"}
    assert required_scorers(config.model_copy(update={"eval": config.eval.model_copy(update={"every": 0})})) == {"ocr"}


def test_eval_metrics_and_gallery_name_what_the_store_and_dashboard_read(tmp_path):
    def report(bench: str, rows: list[SampleResult]) -> EvalReport:
        return EvalReport(bench=bench, spec=EvalSpec(bench=bench, model="m"), policy_version=0, prompts=2,
                          images=len(rows), images_per_prompt=2, sampling={},
                          geneval=geneval_scores(rows) if bench == "geneval" else None,
                          ocr=ocr_scores(rows) if bench == "ocr" else None, new_images=len(rows), seconds=1.0,
                          images_per_s=4.0)

    def row(p: int, s: int, reward: float, tag: str = "", correct: bool | None = None) -> SampleResult:
        return SampleResult(prompt_index=p, sample_index=s, seed=p * 2 + s, prompt=f"p{p}", tag=tag, reward=reward,
                            correct=correct, image=f"images/p{p}-s{s}.png", policy_version=0)

    ocr = [row(0, 0, 1.0), row(0, 1, 0.5), row(1, 0, 0.0), row(1, 1, 1.0)]
    # score = mean reward (1 + 0.5 + 0 + 1) / 4 = 0.625; exact = 2 of 4 images read in full
    assert eval_metrics(report("ocr", ocr)) == {"eval/ocr/score": 0.625, "eval/ocr/exact": 0.5}
    geneval = [row(0, 0, 1.0, "counting", True), row(0, 1, 0.2, "counting", False),
               row(1, 0, 0.0, "position", False), row(1, 1, 0.0, "position", False)]
    # counting 1/2, position 0/2: score = (0.5 + 0.0) / 2 = 0.25
    assert eval_metrics(report("geneval", geneval)) == {
        "eval/geneval/score": 0.25, "eval/geneval/counting": 0.5, "eval/geneval/position": 0.0}
    # the gallery: the first image of each prompt, in prompt order, at most `count`
    gallery = gallery_records(list(reversed(geneval)), tmp_path, count=5)
    assert [(g.prompt, g.image, g.components) for g in gallery] == [
        ("p0", tmp_path / "images/p0-s0.png", {"geneval": 1.0, "geneval_correct": 1.0}),
        ("p1", tmp_path / "images/p1-s0.png", {"geneval": 0.0, "geneval_correct": 0.0})]
    assert [g.prompt for g in gallery_records(ocr, tmp_path, count=1)] == ["p0"]


# ---- the best-eval checkpoint --------------------------------------------------------------------

def commit(checkpoints: CheckpointDir, step: int) -> Path:
    tmp = checkpoints.begin(step)
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").write_bytes(bytes([step]) * 8)
    return checkpoints.commit(tmp, TrainerState(step=step, policy_version=step, run_id="r", sampler=SamplerState()))


def test_the_best_checkpoint_survives_pruning_and_a_resume(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "r", keep_last=2)
    assert checkpoints.best() is None and checkpoints.best_record() is None
    for step in (1, 2, 3):
        commit(checkpoints, step)
    checkpoints.mark_best(2, 0.5)
    for step in (4, 5, 6):
        commit(checkpoints, step)
    assert checkpoints.complete_steps() == [2, 5, 6]  # the newest two, and the best
    # a resumed run opens the directory anew: the best is still step 2, with its score
    resumed = CheckpointDir(tmp_path / "r", keep_last=2)
    assert resumed.best() == resumed.path_for(2)
    assert (resumed.best_record().step, resumed.best_record().score) == (2, 0.5)
    assert (resumed.best() / "policy" / "model.safetensors").read_bytes() == bytes([2]) * 8
    assert json.loads((tmp_path / "r" / "best.json").read_text()) == {"step": 2, "score": 0.5}
    # a new best replaces it, and the old one goes with the next prune
    resumed.mark_best(6, 0.75)
    assert resumed.complete_steps() == [5, 6] and resumed.best() == resumed.path_for(6)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        resumed.mark_best(9, 1.0)  # never committed: nothing to pin
    (resumed.path_for(6) / "policy" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="damaged"):
        resumed.best()


# ---- a real run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_glyph_run_evaluates_at_its_eval_steps_and_keeps_the_best(tmp_path, glyph_model_dir):
    """3 steps, eval every 2 -> evals after steps 2 and 3 (the last), 4 OCR test prompts x 2 images."""
    config = small_config(tmp_path, glyph_model_dir, steps=3, eval=OCR_EVAL,
                          **{"checkpoint.every": 100, "checkpoint.keep_last": 1})
    result = train(config)
    store, run = only_run(tmp_path / "runs")
    table = metric_table(store, run.id)
    assert sorted(table) == [1, 2, 3]
    assert not any(key.startswith("eval/") for key in table[1]) and "time/eval" not in table[1]
    tests = ocr_test_prompts()[:4]
    scores = {}
    for step in (2, 3):
        samples = [SampleResult.model_validate_json(line) for line in
                   (tmp_path / "runs" / run.id / "eval" / f"step-{step:07d}" / "samples.jsonl").read_text().splitlines()]
        # rl.evaluation.harness's rows: prompt p, sample s seeded p*2 + s (eval.seed 0) at every eval, the weights of the step
        assert sorted((s.prompt_index, s.sample_index, s.seed) for s in samples) == [
            (p, s, p * 2 + s) for p in range(4) for s in range(2)]
        assert {s.prompt for s in samples} == set(tests)
        assert {s.policy_version for s in samples} == {table[step]["policy/version"]}
        rewards = [s.reward for s in samples]
        assert table[step]["eval/ocr/score"] == pytest.approx(sum(rewards) / 8, abs=1e-12)
        assert table[step]["eval/ocr/exact"] == pytest.approx(sum(r == 1.0 for r in rewards) / 8, abs=1e-12)
        assert table[step]["time/eval"] > 0
        scores[step] = table[step]["eval/ocr/score"]
        gallery = store.samples(run.id, step, kind="eval")
        assert [g.prompt for g in gallery] == tests  # the first image of each prompt
        assert [g.reward for g in gallery] == [s.reward for s in sorted(samples, key=lambda s: s.prompt_index)
                                               if s.sample_index == 0]
        assert f"eval step {step}/3 | ocr score {scores[step]:.4f}" in result.stdout
    assert store.sample_steps(run.id, kind="eval") == [2, 3]
    assert [e.kind for e in store.events(run.id)].count("eval") == 2
    # the best: step 2, unless step 3 scored strictly higher; pinned, so keep_last 1 did not prune it
    best_step = 3 if scores[3] > scores[2] else 2
    checkpoints = CheckpointDir(tmp_path / "runs" / "checkpoints" / run.id)
    assert json.loads((checkpoints.root / "best.json").read_text()) == {"step": best_step, "score": scores[best_step]}
    assert checkpoints.best() == checkpoints.path_for(best_step)
    assert (checkpoints.best() / "policy" / "config.json").is_file()
    assert checkpoints.complete_steps() == sorted({best_step, 3})
    assert checkpoints.load_state(checkpoints.best()).step == best_step
