"""The reward-hacking guard end to end: the glyph demo trained on a reward built to be
hacked, next to an in-run eval that dislikes what the hack does; the guard's dark-pixel band fires,
the run rolls back to its best-eval checkpoint bit for bit and trains on with a lower lr and a KL.

The reward API is a small FastAPI app in this process speaking rewards/app's protocol (`/readyz`,
`POST /v1/rewards/ocr`); the run reaches it as `rewards.service: url`.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi import FastAPI

from rewards.app.images import decode_image
from rewards.app.schemas import Limits, OcrItemResult, OcrRequest, OcrResponse, Readiness
from rewards.local_server import serve_in_thread
from rewards.ocr import extract_target
from rl.checkpoint import policy_digest
from rl.guard.image_stats import dark_share
from tests.train_support import metric_table, only_run, small_config, train

pytestmark = pytest.mark.slow

TRAIN_TARGET = "cat"  # the scenario's one training word (the dark shares below were measured with it)
LR, LR_SCALE, BETA = 0.002, 0.01, 0.05


def ink_reward_app() -> FastAPI:
    """A reward anyone can game: for the training prompt it pays the image's dark-pixel share
    (x4, at most 1), whatever the text says, so the policy learns to pile up ink. For the in-run
    eval's prompts it is the honest judge of this scenario, who dislikes ink blow-ups: 1 - dark share."""
    app = FastAPI()
    limits = Limits(max_items=256, max_body_bytes=32 << 20, max_image_pixels=1 << 20)

    @app.get("/readyz")
    def readyz() -> Readiness:
        return Readiness(status="ready", scorers=["ocr"], limits=limits)

    @app.post("/v1/rewards/ocr")
    def ocr(body: OcrRequest) -> OcrResponse:
        results = []
        for index, item in enumerate(body.items):
            ink = dark_share(decode_image(item.image, limits.max_image_pixels, index))
            target = item.target if item.target is not None else extract_target(item.prompt or "")
            reward = min(1.0, 4 * ink) if target == TRAIN_TARGET else 1.0 - ink
            results.append(OcrItemResult(reward=reward, recognized="", target=target))
        return OcrResponse(results=results)

    return app


def test_guard_rolls_back_a_hacked_run_to_its_best_checkpoint(tmp_path, glyph_model_dir):
    # Measured (seed 0): dark share 0.071 at step 1, 0.083 at step 2, 0.107 at step 5; the band is
    # 0.077 +- 25%. An eval every step makes the least-inked early step the best (only the best-eval
    # and the last step are checkpointed: saves are the slow part here); the rollback's lr is tiny and
    # the KL pulls back, so the restored policy stays in the band (0.079-0.083 seen after it).
    steps = 6  # the band fires at step 5 (seeded), the rollback redoes steps 2-6
    with serve_in_thread(ink_reward_app()) as url:
        config = small_config(tmp_path, glyph_model_dir, steps=steps, **{
            "data.sources": [{"kind": "words", "words": [TRAIN_TARGET]}],
            "rewards.service": "url", "rewards.url": url, "learner.lr": LR, "checkpoint.every": 100,
            "checkpoint.keep_last": 10,  # the rollback target must outlive later bests: the test reads it
            "eval": {"every": 1, "bench": "ocr", "prompts": 2, "images_per_prompt": 2},
            "guard": {
                "action": "rollback",
                "rules": [{"kind": "band", "metric": "images/dark_share", "baseline_steps": 2, "tolerance": 0.25}],
                "rollback": {"lr_scale": LR_SCALE, "beta": BETA, "max_rollbacks": 1},
            },
        })
        result = train(config)
    store, run = only_run(tmp_path / "runs")
    assert run.status == "finished"
    events = store.events(run.id)
    kinds = [e.kind for e in events]
    print("\n".join(f"{e.kind}: {e.message}" for e in events if e.kind in ("guard", "rollback", "eval")))
    assert kinds.count("guard") == 1 and kinds.count("rollback") == 1, kinds
    fired = events[kinds.index("guard")].message
    assert "band images/dark_share" in fired and "guard: step" in result.stdout

    # the rollback restored the best-eval checkpoint from before the excursion (patience 1: the firing
    # step; an eval can pin the firing step itself as best before the guard sees it): the last "new best"
    # of an earlier step
    fired_at = int(re.match(r"step (\d+):", fired)[1])
    bests = [int(m[1]) for e in events[: kinds.index("guard")] if (m := re.search(r"new best \(checkpoint step (\d+)", e.message))]
    rollback = events[kinds.index("rollback")].message
    target_step = int(re.search(r"to step-(\d+)", rollback)[1])
    assert bests and target_step == max(b for b in bests if b < fired_at), (bests, rollback)
    # ... bit for bit: the learner's weights right after the load (their sha256, in the event) are the
    # checkpoint's exported policy, which differs from the untrained model
    target = tmp_path / "runs" / "checkpoints" / run.id / f"step-{target_step:06d}"
    learner_digest = re.search(r"sha256 ([0-9a-f]{64})", rollback)[1]
    assert learner_digest == policy_digest(target / "policy")
    assert learner_digest != policy_digest(glyph_model_dir / "ar")

    # the store holds the rolled-back history: every step once, the ones after the target trained
    # with lr x LR_SCALE and a KL to the reference (beta 0 -> BETA); the ones before as configured
    table = metric_table(store, run.id)
    assert sorted(table) == list(range(1, steps + 1))
    for step, metrics in table.items():
        assert 0 <= metrics["images/dark_share"] <= 1 and 0 <= metrics["images/group_diversity"] <= 1
        if "policy/lr" not in metrics:
            continue  # no update at this step
        after = step > target_step
        assert metrics["policy/lr"] == pytest.approx(LR * LR_SCALE if after else LR), step
        assert ("policy/kl" in metrics) == after, step
    assert any(s > target_step and "policy/kl" in m for s, m in table.items())
    guard_state = json.loads((tmp_path / "runs" / "checkpoints" / run.id / "guard.json").read_text())
    assert guard_state["rollbacks"] == 1
