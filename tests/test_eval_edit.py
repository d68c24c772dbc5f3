"""`blip3o-rl eval --bench edit` (rl/evaluation/edit_bench.py, the harness's edit rows): the summary by
hand, the command's flags, and the harness over a stand-in editor and the real reward app, every
reported number recomputed from the saved images. The same through the real glyph workers is in
tests/test_evaluate.py (slow), which shares that file's vLLM engine.

Cost: ~2 s; the reward app is served in a thread (consistency and edit_color are numpy only; a
python scorer stands in for the judge).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from rewards.consistency import background_metrics
from rewards.edit_checks import color_share
from rl.evaluation.edit_bench import EditData, EditMetrics, EditScoring, edit_markdown, edit_scores
from rl.evaluation.harness import EvalSpec, SampleResult, SampleStore, evaluate
from rl.prompts.edit import load_pixels, read_edit_file


def metrics(key: str, **values) -> EditMetrics:
    return EditMetrics(key=key, masked="psnr" in values, **values)


def test_edit_summary_is_the_mean_over_the_images_that_have_each_metric():
    rows = [
        ("color", metrics("0", psnr=20.0, ssim=0.5, mse=0.01, edit_color=1.0, copied=False)),
        ("color", metrics("1", psnr=30.0, ssim=0.7, mse=0.001, edit_color=0.0, copied=True)),
        ("text", metrics("2", edit_ocr=1.0, edit_ocr_exact=True, copied=False, judge=0.6)),
        ("text", metrics("3", edit_ocr=0.5, edit_ocr_exact=False, copied=False)),
    ]
    scores = edit_scores(rows)
    means = {name: m.mean for name, m in scores.overall.metrics.items()}
    assert means == pytest.approx({
        "psnr": 25.0, "ssim": 0.6, "mse": 0.0055,   # (20 + 30) / 2, (0.5 + 0.7) / 2, (0.01 + 0.001) / 2
        "edit_ocr": 0.75, "edit_ocr_exact": 0.5,    # (1 + 0.5) / 2; one of two exact
        "edit_color": 0.5, "copied": 0.25, "judge": 0.6})  # one copy in four checked images; one judged image
    assert {name: m.images for name, m in scores.overall.metrics.items()} == {
        "psnr": 2, "ssim": 2, "mse": 2, "edit_ocr": 2, "edit_ocr_exact": 2, "edit_color": 2, "copied": 4, "judge": 1}
    assert list(scores.overall.metrics) == ["psnr", "ssim", "mse", "edit_ocr", "edit_ocr_exact", "edit_color",
                                            "copied", "judge"]  # SUMMARY_METRICS order
    assert list(scores.categories) == ["color", "text"] and scores.overall.images == 4
    assert scores.categories["text"].metrics["edit_ocr"].mean == pytest.approx(0.75)
    assert "psnr" not in scores.categories["text"].metrics
    table = edit_markdown(scores)
    assert table.splitlines()[0] == ("| category | images | psnr | ssim | mse | edit_ocr | edit_ocr_exact | "
                                     "edit_color | copied | judge |")
    assert "| color | 2 | 25.00 | 0.6000 | 0.0055 | - | - | 0.5000 | 0.5000 | - |" in table
    assert table.splitlines()[-1] == ("| **overall** | 4 | 25.00 | 0.6000 | 0.0055 | 0.7500 | 0.5000 | 0.5000 | "
                                      "0.2500 | 0.6000 |")


def test_the_edit_bench_needs_its_data_and_only_it_takes_it(tmp_path):
    with pytest.raises(ValidationError, match="bench edit needs edit_data"):
        EvalSpec(bench="edit", model="m")
    with pytest.raises(ValidationError, match="only bench edit takes it"):
        EvalSpec(bench="ocr", model="m", edit_data=EditData(path=tmp_path / "x.jsonl"))
    with pytest.raises(ValidationError, match="not from a prompt file"):
        EvalSpec(bench="edit", model="m", edit_data=EditData(path=tmp_path / "x.jsonl"), prompt_file=tmp_path / "p")


def test_the_cli_refuses_edit_flags_elsewhere_and_an_edit_bench_without_data(tmp_path, monkeypatch):
    from deploy.cli import build_parser
    from rl.evaluation.command import EvalCommandError, run

    # `run` is the CLI's, in this process: whatever it sets in the environment must not reach the
    # subprocesses of later tests (VLLM_LOGGING_LEVEL once silenced their engines' INFO lines)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)

    for flags, message in (
        (["--bench", "ocr", "--data", "x.jsonl", "--images", "d"], "--data, --images are for --bench edit"),
        (["--bench", "edit"], "--bench edit needs --data FILE"),
        (["--bench", "edit", "--data", "x.jsonl", "--prompts", "p.txt"], "reads --data, not --prompts"),
    ):
        args = build_parser().parse_args(["eval", "--model", "m", "--out", str(tmp_path / "o.json"), *flags])
        with pytest.raises(EvalCommandError, match=message):
            run(args)
    assert "VLLM_LOGGING_LEVEL" not in os.environ  # a refusal comes before anything is started


def test_the_started_reward_server_loads_what_the_lines_need(tmp_path):
    from argparse import Namespace

    from rl.evaluation.command import server_flags
    from rl.evaluation.edit_bench import needed_scorers
    from rl.prompts.edit import EditRecord
    from rl.prompts.edit_benchmarks import BenchEdit

    plain = BenchEdit(EditRecord("make it brighter", tmp_path / "a.png"), "0")  # no mask, no target
    masked = BenchEdit(EditRecord("x", tmp_path / "a.png", mask=tmp_path / "m.png", target_json='{"text": "dog"}'), "1")
    assert needed_scorers([plain], clip=False) == []
    assert needed_scorers([plain], clip=True) == ["consistency", "clipscore"]  # CLIP-I is consistency's
    assert needed_scorers([plain, masked], clip=False) == ["consistency", "edit_ocr"]
    args = Namespace(bench="edit", ocr_size="tiny", clip="/models/clip")
    flags, env = server_flags(args, ["edit_ocr", "clipscore"])
    assert flags == ["--scorers", "consistency,edit_ocr,clipscore", "--ocr-size", "tiny"]
    assert env == {"BLIP3O_RL_REWARDS_CONSISTENCY__CLIP__MODEL": "/models/clip",
                   "BLIP3O_RL_REWARDS_CLIPSCORE__MODEL": "/models/clip", "BLIP3O_RL_REWARDS_CLIPSCORE__PREFIX": ""}


# ---- the harness over a stand-in editor and the real reward app ----------------------------------

def write_edit_set(root: Path) -> Path:
    """Three 32 x 24 sources (grey 100 with a lighter top-left block, so SSIM sees structure), all
    asking for red: a masked edit (left half), a masked edit the editor answers with a copy (mask =
    the right 8 columns), and an unmasked edit."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, value in (("a", 100), ("b", 90), ("c", 110)):
        pixels = np.full((24, 32, 3), value, np.uint8)
        pixels[2:8, 2:10] = 180
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    left, right = np.zeros((24, 32), np.uint8), np.zeros((24, 32), np.uint8)
    left[:, :16], right[:, 24:] = 255, 255
    Image.fromarray(left).save(root / "masks" / "left.png")
    Image.fromarray(right).save(root / "masks" / "right.png")
    lines = [
        {"prompt": "paint the left half red", "image": "images/a.png", "mask": "masks/left.png",
         "target": {"color": "red"}},
        {"prompt": "keep it, paint the right red", "image": "images/b.png", "mask": "masks/right.png",
         "target": {"color": "red"}},
        {"prompt": "make it red", "image": "images/c.png", "target": {"color": "red", "caption": "a red picture"}},
    ]
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class StandInEditor:
    """Rollout and decoder at once: `generate` keeps each row's source; `decode` paints the left half
    of it pure red and raises pixel (0, 31), outside every mask's left half, by 10 * (seed % 5 + 1)
    grey levels; a row whose instruction starts with "keep" is answered with the source as it is."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[np.ndarray]]] = []

    def served_version(self) -> int:
        return 0

    def generate(self, captions, group_size, seed, sampling, sources=None):
        import torch

        from rollout.records import RolloutBatch

        self.calls.append((captions, sources))
        rows = len(captions)
        return RolloutBatch(prompt_ids=[[1]] * rows, group_index=list(range(rows)),
                            image_tokens=torch.zeros((rows, 1), dtype=torch.long), logprobs=torch.zeros((rows, 1)),
                            policy_version=0, seed=seed)

    def decode(self, batch, seed):
        from rollout.records import DecodedImages

        captions, sources = self.calls[-1]
        images = []
        for row, (caption, source) in enumerate(zip(captions, sources)):
            image = source.copy()
            if not caption.startswith("keep"):
                image[:, :16] = (255, 0, 0)
                image[0, 31] += 10 * ((seed + row) % 5 + 1)
            images.append(image)
        return DecodedImages(images=np.stack(images), policy_version=0)


def redness(image: np.ndarray) -> float:
    """tests/support/python_scorers.py `redness`, the stand-in judge."""
    return float(image[..., 0].astype(np.float64).sum() / image.astype(np.float64).sum())


def test_edit_eval_reports_the_scorers_numbers_of_the_saved_images_and_resumes(tmp_path):
    from rewards.app.main import create_app
    from rewards.app.settings import Settings
    from rl.evaluation.harness import LocalWorkers
    from rl.scoring.service import RewardEndpoint
    from tests.rewards_support import serve_in_thread

    data = write_edit_set(tmp_path / "set")
    editor = StandInEditor()
    workers = LocalWorkers(editor, editor)
    spec = EvalSpec(bench="edit", model="stand-in", images_per_prompt=2, seed=3, chunk_images=4,
                    edit_data=EditData(path=data))
    settings = Settings(scorers=["consistency", "edit_color"], batch_wait_ms=1,
                        python_scorers={"judge": "tests.support.python_scorers:redness"})
    with serve_in_thread(create_app(settings)) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=60, outage_budget_s=30, backoff_s=0.2)
        scoring = EditScoring(judge_url=f"{url}/v1/rewards/judge")
        store = SampleStore(tmp_path / "results")
        report = evaluate(workers, endpoint, spec, store, edit_scoring=scoring)
        again = evaluate(workers, endpoint, spec, SampleStore(tmp_path / "results"), edit_scoring=scoring)

    records = read_edit_file(data)
    # 3 lines x 2 samples in chunks of 4: rows 0-3 then 4-5; each generate call got its rows' sources
    assert [captions for captions, _ in editor.calls] == [[r.prompt for r in records for _ in range(2)][:4],
                                                          [records[2].prompt] * 2]
    expected_sources = [load_pixels(r)[0] for r in records for _ in range(2)]
    assert all(np.array_equal(got, want) for got, want in
               zip([s for _, sources in editor.calls for s in sources], expected_sources, strict=True))

    samples = [SampleResult.model_validate_json(line) for line in store.samples_path.read_text().splitlines()]
    assert [(s.prompt_index, s.sample_index, s.seed, s.reward, s.edit.key) for s in samples] == [
        (p, s, 3 + 2 * p + s, None, str(p)) for p in range(3) for s in range(2)]
    for sample in samples:  # every number recomputed from the saved PNG against its source
        output = np.asarray(Image.open(store.root / sample.image))
        source, mask = load_pixels(records[sample.prompt_index])
        edit = sample.edit
        if mask is not None:
            expected = background_metrics(output, source, mask)
            assert (edit.psnr, edit.ssim, edit.mse, edit.outside_fraction) == pytest.approx(
                (expected.psnr, expected.ssim, expected.mse, expected.outside_fraction), rel=1e-12)
        else:
            assert edit.psnr is edit.ssim is edit.mse is None and not edit.masked
        copy = sample.prompt_index == 1
        assert edit.copied is copy  # the copy guard (40 dB inside the edit region) fires on the copy only
        share = color_share(output, mask if mask is not None else np.ones(output.shape[:2], bool), "red")
        assert edit.edit_color == pytest.approx(0.0 if copy else share, rel=1e-12)
        assert edit.judge == pytest.approx(redness(output), rel=1e-12)
        assert edit.clip_i is edit.clip_t is None  # the API serves no clipscore: no CLIP metric asked for
    # the copy: exact background (PSNR at its 100 dB ceiling, SSIM 1); masked edits: the left half is
    # red, so line 0's mask share is 1 and line 2's whole-image share 16 / 32 columns
    assert samples[2].edit.psnr == 100.0 and samples[2].edit.ssim == pytest.approx(1.0)
    assert samples[0].edit.edit_color == 1.0 and samples[4].edit.edit_color == 0.5
    assert samples[0].edit.psnr < 100.0  # pixel (0, 31) moved

    overall = report.edit.overall.metrics
    masked = [s.edit for s in samples if s.edit.masked]
    assert overall["psnr"].images == 4 and overall["psnr"].mean == pytest.approx(np.mean([m.psnr for m in masked]))
    assert overall["copied"].mean == pytest.approx(2 / 6) and overall["judge"].images == 6
    assert report.new_images == 6 and again.new_images == 0 and again.edit == report.edit  # resumed from disk
    assert "| **overall** | 6 |" in report.markdown()
    assert (tmp_path / "results" / "spec.json").is_file()


def test_a_mask_over_the_whole_image_has_no_background_to_score(tmp_path):
    """PIE-Bench writes "nan" for an image whose mask leaves no background; we leave the metrics out
    (the consistency scorer would refuse the item) and still score the line's edit check."""
    from rewards.app.main import create_app
    from rewards.app.settings import Settings
    from rewards.scorer import EditSource
    from rl.evaluation.edit_bench import score_edits
    from rl.prompts.edit import EditRecord
    from rl.prompts.edit_benchmarks import BenchEdit
    from rl.scoring.service import RewardEndpoint
    from tests.rewards_support import serve_in_thread

    source = np.full((16, 16, 3), 100, np.uint8)
    output = source.copy()
    output[:, :8] = (255, 0, 0)  # the left half red: share 1/2 of the whole image, of the left half 1
    whole, left = np.ones((16, 16), bool), np.zeros((16, 16), bool)
    left[:, :8] = True
    record = EditRecord("make it red", tmp_path / "unused.png", target_json='{"color": "red"}')
    lines = [BenchEdit(record, "whole"), BenchEdit(record, "left")]
    with serve_in_thread(create_app(Settings(scorers=["consistency", "edit_color"], batch_wait_ms=1))) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=60, outage_budget_s=30, backoff_s=0.2)
        full, half = score_edits(endpoint, np.stack([output, output]), lines,
                                 [EditSource(source, whole), EditSource(source, left)], EditScoring())
    assert full.masked and full.psnr is None and full.ssim is None and full.edit_color == 0.5  # the whole image
    assert half.psnr == 100.0 and half.outside_fraction == 0.5 and half.edit_color == 1.0  # the right half kept
