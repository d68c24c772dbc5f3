"""Training on edits: the run config's edit sources (a reward mix required, the demo's data written by
the run), the scoring of an edit row (source, mask and target reach every scorer of the mix, and the
request size counts them), and the glyph edit demo learning its edit (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from rewards.app.main import create_app
from rewards.app.settings import Settings
from rewards.client import encode_png
from rewards.consistency import consistency_scorer
from rewards.edit_checks import CopyGuard, EditOcrScorer
from rewards.ocr import Reading
from rewards.scorer import EditSource, ServedScorer
from rl.prompts.edit_synthetic import ensure_synthetic_sources, glyph_renderer
from rl.prompts.sources import load_source
from rl.run.config import ConfigError, load_config
from rl.run.reward_checks import check_rows_fit_config
from rl.scoring.reward_mix import RewardComponentConfig
from rl.scoring.service import TEXT_ALLOWANCE_BYTES, RewardEndpoint, max_item_bytes, score_images
from tests.rewards_support import serve_in_thread
from tests.train_support import REPO, metric_table, only_run, train, write_config

DEMO = REPO / "deploy" / "configs" / "tiny-cpu-glyph-edit.yaml"
MIX = (RewardComponentConfig(name="edit", scorer="edit_ocr", weight=1.0),
       RewardComponentConfig(name="keep", scorer="consistency", weight=0.5))


def demo_config(tmp_path, model, **changes):
    """The glyph edit demo with its model and data under `tmp_path`, written to tmp_path/config.yaml."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"] = {"path": str(model)}
    raw["data"]["sources"][0]["path"] = str(tmp_path / "data" / "train.jsonl")
    raw["eval"]["edit_data"]["path"] = str(tmp_path / "data" / "eval.jsonl")
    raw["logging"]["runs_dir"] = str(tmp_path / "runs")
    return write_config(tmp_path, raw, changes)


def test_an_edit_source_needs_a_reward_mix_and_takes_the_decoders_source_reader(tmp_path, glyph_model_dir):
    config = load_config(demo_config(tmp_path, glyph_model_dir))  # its data is not written yet: read when it is
    assert config.data.edits and config.data.sources[0].written_by_run
    assert config.rollout.engine.source_tokenizer == "glyph" and config.rollout.engine.glyph == config.decoder.decoder.glyph
    with pytest.raises(ConfigError, match=r"edit sources need rewards.mix: an edit prompt has no task reward"):
        load_config(demo_config(tmp_path, glyph_model_dir, **{"rewards.mix": None}))
    words = [{"kind": "words", "words": ["we"]}, yaml.safe_load(DEMO.read_text())["data"]["sources"][0]]
    with pytest.raises(ConfigError, match="edit sources cannot share a run with text-to-image sources"):
        load_config(demo_config(tmp_path, glyph_model_dir, **{"data.sources": words}))
    evaluated = {"kind": "edit", "path": str(tmp_path / "e.jsonl"), "synthetic": {"n": 1, "targets": ["pig"]}}
    with pytest.raises(ConfigError, match=r"synthetic: \['pig'\] are words of the synthetic edit evaluation set"):
        load_config(demo_config(tmp_path, glyph_model_dir, **{"data.sources": [evaluated]}))


def test_the_run_writes_the_demos_edit_once(tmp_path, glyph_model_dir):
    config = load_config(demo_config(tmp_path, glyph_model_dir))
    ensure_synthetic_sources(config.data.sources, log=lambda line: None)
    data = tmp_path / "data" / "train.jsonl"
    written = data.stat().st_mtime_ns
    ensure_synthetic_sources(config.data.sources, log=lambda line: None)  # exists: left alone
    assert data.stat().st_mtime_ns == written and not config.data.sources[0].written_by_run
    [item] = load_source(config.data.sources[0])
    assert (item.caption, item.task, item.edit.target) == ("change the word sun to we", "edit", {"text": "we"})
    assert item.label == "change the word sun to we [source cat_sun.png]"  # what the run store's samples show
    assert (item.edit.image.name, item.edit.mask.name) == ("cat_sun.png", "tiles_4_3.png")


def test_the_in_run_edit_eval_writes_held_out_edits_the_run_does_not_train_on(tmp_path, glyph_model_dir):
    from rl.evaluation.config import chosen_eval_prompts, eval_scorers
    from rl.prompts.edit import EVAL_WORDS
    from rl.prompts.edit_synthetic import ensure_synthetic_eval
    from rl.run.reward_checks import required_scorers

    config = load_config(demo_config(tmp_path, glyph_model_dir))
    assert chosen_eval_prompts(config.eval) == []  # not written yet
    assert eval_scorers(config.eval) == required_scorers(config) == {"edit_ocr", "consistency"}
    ensure_synthetic_eval(config.eval, log=lambda line: None)
    items = chosen_eval_prompts(config.eval)
    assert len(items) == 8 and all(item.task == "edit" and item.edit.target["text"] in EVAL_WORDS for item in items)
    # the eval file as a training source: refused, its edits would be trained on (even when a source may hold
    # evaluation words, which the sources refuse by themselves otherwise)
    source = {"kind": "edit", "path": str(tmp_path / "data" / "eval.jsonl"), "allow_eval_prompts": True}
    with pytest.raises(ConfigError, match="8 of the 8 evaluation prompts are trained on"):
        load_config(demo_config(tmp_path, glyph_model_dir, **{"data.sources": [source]}))
    for changes, message in (
        ({"eval.edit_data": None}, "eval bench edit needs edit_data"),
        ({"eval.bench": "ocr"}, "only bench edit takes it"),
        ({"eval.edit_data.format": "imgedit"}, "the in-run edit eval reads edit lines with a target"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(demo_config(tmp_path, glyph_model_dir, **changes))


def test_an_edit_evals_score_is_its_edit_checks_mean_never_a_background_metric():
    from types import SimpleNamespace

    from rl.evaluation.edit_bench import EditMetrics, summarise
    from rl.evaluation.in_run import EditScoreMissing, eval_metrics, eval_score

    def report(*metrics):
        return SimpleNamespace(edit=SimpleNamespace(overall=summarise(list(metrics))), geneval=None, ocr=None)

    text = report(EditMetrics(key="0", masked=True, psnr=20.0, edit_ocr=1.0, edit_ocr_exact=True),
                  EditMetrics(key="1", masked=True, psnr=30.0, edit_ocr=0.5, edit_ocr_exact=False))
    assert eval_score(text) == 0.75
    assert eval_metrics(text) == {"eval/edit/score": 0.75, "eval/edit/psnr": 25.0, "eval/edit/edit_ocr": 0.75,
                                  "eval/edit/edit_ocr_exact": 0.5}
    assert eval_score(report(EditMetrics(key="0", masked=True, psnr=20.0, edit_color=0.25))) == 0.25
    with pytest.raises(EditScoreMissing, match="none of the edit checks"):
        eval_score(report(EditMetrics(key="0", masked=True, psnr=40.0)))


def test_a_request_item_counts_the_source_and_its_mask(tmp_path, glyph_model_dir):
    rng = np.random.default_rng(0)
    noise, grey = rng.integers(0, 256, (64, 256, 3), dtype=np.uint8), rng.integers(0, 256, (64, 256), dtype=np.uint8)
    encoded = len(encode_png(noise)) * 2 + len(encode_png(grey))  # the worst case: nothing compresses (a mask is 1 channel)
    assert encoded < max_item_bytes(64, 256, (64, 256)) - TEXT_ALLOWANCE_BYTES < 1.05 * encoded
    config_path = demo_config(tmp_path, glyph_model_dir)
    ensure_synthetic_sources(load_config(config_path).data.sources, log=lambda line: None)
    check_rows_fit_config(load_config(config_path))
    alone = max_item_bytes(64, 256)  # room for the output alone, not for its 256x64 source and mask
    with pytest.raises(ConfigError, match="one 256x64 image with its 256x64 source and mask can take up to"):
        check_rows_fit_config(load_config(demo_config(tmp_path, glyph_model_dir,
                                                      **{"rewards.server.max_body_bytes": alone})))


class GlyphReader:
    """edit_ocr's text reader for the test: reads the glyph tiles of the box edit_ocr crops (the mask's
    3 tiles, padded by 16 px) with the glyph decoder's inverse, exactly."""

    version = "glyph-reader"

    def __init__(self):
        self.glyphs = glyph_renderer()

    def readings(self, crops: list[np.ndarray]) -> list[Reading]:
        rows = np.full((len(crops), *self.glyphs.image_shape), 255, np.uint8)  # [B, 64, 256, 3]
        for row, crop in zip(rows, crops):
            row[:, :96] = crop[16:-16, 16:-16]  # [64, 96, 3] the 3 tiles, into tiles 0-2 of a blank row
        texts = [self.glyphs.codes_to_text(codes).strip() for codes in self.glyphs.images_to_codes(rows).tolist()]
        return [Reading(text) for text in texts]  # no character boxes: no regions


def test_score_images_sends_each_edit_rows_source_mask_and_target(tmp_path, glyph_model_dir):
    """Through a real reward app (edit_ocr with its copy guard, consistency), the rows of the demo's edit
    ("cat sun", change sun to we, mask = tiles 4-6) get the hand values below."""
    config = load_config(demo_config(tmp_path, glyph_model_dir))
    ensure_synthetic_sources(config.data.sources, log=lambda line: None)
    [item] = load_source(config.data.sources[0])
    glyphs = glyph_renderer()
    done, copy, near = (glyphs.render_text(text) for text in ("cat we", "cat sun", "dog wx"))
    settings = Settings(scorers=["edit_ocr", "consistency"], max_items=8, batch_wait_ms=1)
    scorers = {"edit_ocr": ServedScorer(EditOcrScorer(GlyphReader(), CopyGuard(40.0))),
               "consistency": ServedScorer(consistency_scorer(settings))}
    with serve_in_thread(create_app(settings, scorers=scorers)) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=30, outage_budget_s=10, backoff_s=0.05, mix=MIX)
        scored = score_images(endpoint, np.stack([done, copy, near]), [item] * 3, MIX)
    # the background (tiles 0-3 and 7) of "cat we" is the source's: PSNR 100 dB (identical) -> keep 1.0;
    # "we" read in tiles 4-6 -> edit 1 - 0/2
    assert scored.rewards[0].scores == {"edit": 1.0, "keep": 1.0}
    # the source itself: the guard (PSNR over tiles 4-6 = 100 dB >= 40) -> edit 0; its background -> keep 1.0
    assert scored.rewards[1].scores == {"edit": 0.0, "keep": 1.0}
    # "wx" for "we": Levenshtein 1 of 2 -> 0.5; keep = clip(PSNR / 40) of "dog" over "cat" in tiles 0-2,
    # PSNR = 10 log10(1 / MSE), MSE the mean over H x W x 3 of the 0-1 difference outside tiles 4-6
    outside = np.ones((64, 256, 1))
    outside[:, 128:224] = 0
    mse = np.mean(((near / 255.0 - copy / 255.0) * outside) ** 2)
    assert scored.rewards[2].scores["edit"] == 0.5
    assert scored.rewards[2].scores["keep"] == pytest.approx(10 * math.log10(1 / mse) / 40, rel=1e-9)
    assert all(reward.task == "edit" for reward in scored.rewards)


@pytest.mark.slow
def test_the_glyph_edit_demo_learns_its_edit(tmp_path, glyph_model_dir):
    """The demo for 10 of its 60 steps: its edit reward (edit_ocr's mean) over steps 7-10 is above that of
    steps 1-4 by 0.1 (measured on the demo, seed 0: 0.03 -> 0.25; a policy that learns nothing stays where
    it started), and the background is not given up for it (keep: 0.32 -> 0.33 measured; it rises once the
    edit is learned, after step 30, which this test does not wait for)."""
    steps = 10
    config = demo_config(tmp_path, glyph_model_dir, steps=steps, **{"checkpoint.every": 100, "eval.every": 10})
    result = train(config)
    assert "wrote 1 edits to" in result.stdout and "wrote 8 edits to" in result.stdout  # the run wrote its data
    store, run = only_run(tmp_path / "runs")
    table = metric_table(store, run.id)
    edit = [table[step]["reward/edit"] for step in range(1, steps + 1)]
    keep = [table[step]["reward/keep"] for step in range(1, steps + 1)]
    print(f"edit {edit}\nkeep {keep}")
    assert np.mean(edit[-4:]) > np.mean(edit[:4]) + 0.1, edit
    assert np.mean(keep[-4:]) > np.mean(keep[:4]) - 0.03, keep
    assert max(table[s]["policy/logprob_diff"] for s in table if "policy/logprob_diff" in table[s]) < 1e-3
    samples = store.samples(run.id, steps)
    assert samples and all(s.prompt == "change the word sun to we [source cat_sun.png]" for s in samples)
    assert {"edit", "keep"} <= set(samples[0].components)
    # the in-run eval of step 10 on the 8 held-out edits: its score is edit_ocr's mean over its images
    evaluated = [json.loads(line) for line in
                 (tmp_path / "runs" / run.id / "eval" / "step-0000010" / "samples.jsonl").read_text().splitlines()]
    assert len(evaluated) == 8 and all(s["edit"]["psnr"] is not None for s in evaluated)
    assert table[steps]["eval/edit/score"] == pytest.approx(np.mean([s["edit"]["edit_ocr"] for s in evaluated]))
    assert table[steps]["eval/edit/psnr"] == pytest.approx(np.mean([s["edit"]["psnr"] for s in evaluated]))
    assert f"eval step {steps}/{steps} | edit score" in result.stdout
    assert len(store.samples(run.id, steps, kind="eval")) == 8


def test_edit_ocr_regions_are_the_characters_of_the_box_placed_on_the_image():
    """The mask of tiles 4-6 (x 128-224 of 256, y 0-64) is read from a crop padded by 16 px, so crop pixel
    (u, v) is image pixel (112 + u, v - 16). The reader sees "e" at crop x 48-64, y 20-60; for "we" the
    'e' is right (1) and the missing 'w' is a box of the same width just before it (0)."""

    class OneE:
        version = "one-e"

        def readings(self, crops):
            assert crops[0].shape == (96, 128, 3)
            return [Reading("e", (("e", (48.0, 20.0, 64.0, 60.0)),))]

    glyphs = glyph_renderer()
    source = glyphs.render_text("cat sun")
    mask = np.zeros((64, 256), bool)
    mask[:, 128:224] = True
    [result] = EditOcrScorer(OneE(), CopyGuard(40.0)).score([glyphs.render_text("cat e")], [""],
                                                          [{"target": {"text": "we"}}], [EditSource(source, mask)])
    assert result.reward == 0.5
    regions = sorted((tuple(r["box"]), r["reward"]) for r in result.details["regions"])
    assert regions == [((144 / 256, 4 / 64, 160 / 256, 44 / 64), 0.0), ((160 / 256, 4 / 64, 176 / 256, 44 / 64), 1.0)]
    [copy] = EditOcrScorer(OneE(), CopyGuard(40.0)).score([source], [""], [{"target": {"text": "we"}}],
                                                        [EditSource(source, mask)])
    assert copy.reward == 0.0 and copy.details["regions"] == []  # a copy: no edit reward, no regions
