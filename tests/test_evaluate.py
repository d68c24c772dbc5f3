"""`blip3o-rl eval` (rl/evaluation/harness.py, rl/evaluation/command.py): the numbers by hand, then real evals.

Cost: one in-process vLLM engine (glyph), two `blip3o-rl eval` subprocesses (glyph OCR on a run
checkpoint; tiny SANA GenEval), one OCR reward server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.evaluation.harness import (
    EvalMismatchError,
    EvalSpec,
    SampleResult,
    SampleStore,
    eval_prompts,
    geneval_scores,
    ocr_scores,
    row_chunks,
)

REPO = Path(__file__).resolve().parents[1]
OCR_TINY = ["--scorers", "ocr", "--ocr-size", "tiny"]


def sample(p: int, s: int, reward: float, tag: str = "", correct: bool | None = None) -> SampleResult:
    return SampleResult(prompt_index=p, sample_index=s, seed=0, prompt="x", tag=tag, reward=reward, correct=correct,
                        policy_version=0)


# ---- the numbers, by hand ----------------------------------------------------------------------

def test_geneval_score_is_the_mean_of_the_tag_accuracies():
    rows = (
        # single_object: 4 images, 3 correct -> 3/4 = 0.75
        [sample(0, s, 1.0, "single_object", c) for s, c in enumerate([True, True, True, False])]
        # counting: 8 images (2 prompts), 2 correct -> 2/8 = 0.25
        + [sample(1 + s // 4, s % 4, 0.5, "counting", s in (0, 5)) for s in range(8)]
        # position: 4 images, 0 correct -> 0.0
        + [sample(3, s, 0.0, "position", False) for s in range(4)]
    )
    scores = geneval_scores(rows)
    assert {t: (v.images, v.correct) for t, v in scores.tags.items()} == {
        "single_object": (4, 3), "counting": (8, 2), "position": (4, 0)}
    assert list(scores.tags) == ["single_object", "counting", "position"]  # GenEval's tag order
    # overall = (0.75 + 0.25 + 0.0) / 3 = 1/3, not the image accuracy (3 + 2 + 0) / 16 = 0.3125
    assert scores.overall == pytest.approx(1 / 3)
    assert scores.image_accuracy == pytest.approx(5 / 16)
    assert scores.missing_tags == ["two_object", "colors", "color_attr"]
    # mean reward: (4 * 1.0 + 8 * 0.5 + 4 * 0.0) / 16 = 0.5
    assert scores.mean_reward == pytest.approx(0.5)


def test_six_tags_weigh_equally_whatever_their_sizes():
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    # tag i has i+1 images of which only the first is correct: accuracies 1, 1/2, 1/3, 1/4, 1/5, 1/6
    rows = [sample(i, s, 0.0, tag, s == 0) for i, tag in enumerate(tags) for s in range(i + 1)]
    scores = geneval_scores(rows)
    # mean of the six: (1 + 1/2 + 1/3 + 1/4 + 1/5 + 1/6) / 6 = 2.45 / 6 = 0.408333...
    assert scores.overall == pytest.approx(2.45 / 6)
    assert scores.missing_tags == []
    assert scores.image_accuracy == pytest.approx(6 / 21)  # 6 correct of 1+2+...+6 = 21


def test_ocr_mean_reward_and_exact_match():
    rewards = [1.0, 0.5, 1.0, 0.0, 0.75]
    scores = ocr_scores([sample(i, 0, r) for i, r in enumerate(rewards)])
    assert scores.mean_reward == pytest.approx(3.25 / 5)  # (1 + 0.5 + 1 + 0 + 0.75) / 5 = 0.65
    assert scores.exact_match == pytest.approx(2 / 5)  # two images with reward exactly 1
    assert scores.images == 5


def test_limit_spreads_geneval_prompts_over_tags_and_rows_chunk_consecutively():
    spec = EvalSpec(bench="geneval", model="m", limit=8)
    chosen = eval_prompts(spec)
    # the file is grouped by tag (starts 0, 80, 179, 259, 353, 453): 8 = the first of each tag, then
    # the second of the first two tags
    assert [index for index, _ in chosen] == [0, 1, 80, 81, 179, 259, 353, 453]
    assert len(eval_prompts(EvalSpec(bench="geneval", model="m"))) == 553
    assert [i for i, _ in eval_prompts(EvalSpec(bench="ocr", model="m", limit=3))] == [0, 1, 2]
    # rows p*N+s with N = 4: prompts 0, 1 -> rows 0..7 (one run), prompt 80 -> 320..323
    assert row_chunks([0, 1, 2, 3, 4, 5, 6, 7, 320, 321, 322, 323], 5) == [[0, 1, 2, 3, 4], [5, 6, 7], [320, 321, 322, 323]]


def test_store_drops_a_torn_line_and_refuses_another_eval(tmp_path):
    import numpy as np

    store = SampleStore(tmp_path / "r")
    identity = EvalSpec(bench="ocr", model="m").identity(0)
    assert store.open(identity) == {}
    rows = [sample(p, 0, 0.5).model_copy(update={"image": store.image_name(p, 0)}) for p in range(3)]
    store.write(rows, np.zeros((3, 8, 8, 3), dtype=np.uint8))
    text = store.samples_path.read_text()
    store.samples_path.write_text(text[: len(text) - 40])  # the last line cut mid-way, as by a kill
    assert sorted(store.open(identity)) == [(0, 0), (1, 0)]
    assert store.samples_path.read_text().count("\n") == 2  # the torn line is gone before any append
    with pytest.raises(EvalMismatchError, match="seed: 0 on disk, 1 now"):
        store.open(EvalSpec(bench="ocr", model="m", seed=1).identity(0))


# ---- a run directory, resolved -----------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, glyph_model_dir) -> Path:
    """runs/checkpoints/<run_id>/step-000003 whose policy/ is the glyph model with its lm_head
    perturbed, served as version 3; the run store records the run's config as the trainer does."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from rl.checkpoint import CheckpointDir, TrainerState
    from rl.run_store import RunStore
    from rollout.config import RolloutConfig
    from rollout.decoder_config import DecoderConfig

    runs = tmp_path_factory.mktemp("runs")
    config = {"rollout": {"engine": RolloutConfig(model=str(glyph_model_dir)).model_dump(mode="json")},
              "decoder": {"decoder": DecoderConfig(model=str(glyph_model_dir)).model_dump(mode="json")}}
    run_id = RunStore(runs).create_run("eval-test", config)
    checkpoints = CheckpointDir(runs / "checkpoints" / run_id)
    for step, version in ((2, 2), (3, 3)):
        tmp = checkpoints.begin(step)
        model = Qwen3ForCausalLM.from_pretrained(glyph_model_dir / "ar")
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(step)))
        model.save_pretrained(tmp / "policy", safe_serialization=True)
        AutoTokenizer.from_pretrained(glyph_model_dir / "ar").save_pretrained(tmp / "policy")
        checkpoints.commit(tmp, TrainerState(step=step, policy_version=version, run_id=run_id))
    return runs / "checkpoints" / run_id


def test_model_specs_resolve(run_dir, glyph_model_dir):
    from rl.evaluation.command import EvalCommandError, load_policy_weights, resolve_eval_model, split_step

    assert split_step("runs/checkpoints/r:12") == ("runs/checkpoints/r", 12)
    assert split_step("BLIP3o/BLIP3o-NEXT-SFT-3B") == ("BLIP3o/BLIP3o-NEXT-SFT-3B", None)
    plain = resolve_eval_model(str(glyph_model_dir))
    assert (plain.checkpoint, plain.policy_version, plain.rollout.model) == (None, 0, str(glyph_model_dir.resolve()))
    latest = resolve_eval_model(str(run_dir))
    assert (latest.checkpoint.name, latest.policy_version) == ("step-000003", 3)
    assert latest.rollout.model == str(glyph_model_dir) and latest.decoder.model == str(glyph_model_dir)
    assert resolve_eval_model(f"{run_dir}:2").checkpoint.name == "step-000002"
    assert resolve_eval_model(str(run_dir / "step-000002")).policy_version == 2
    with pytest.raises(EvalCommandError, match="no complete checkpoint of step 7; complete steps: 2, 3"):
        resolve_eval_model(f"{run_dir}:7")
    with pytest.raises(EvalCommandError, match="not a run directory"):
        resolve_eval_model(f"{glyph_model_dir}:3")
    weights = load_policy_weights(run_dir / "step-000003" / "policy")
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" in weights


def test_a_checkpoint_without_any_export_is_refused_by_name(tmp_path):
    """A checkpoint whose run trained neither the AR policy (policy/) nor the decoder (diffusion_policy/)."""
    from rl.checkpoint import CheckpointDir, TrainerState
    from rl.evaluation.command import EvalCommandError, resolve_eval_model

    checkpoints = CheckpointDir(tmp_path / "checkpoints" / "r1")
    path = checkpoints.commit(checkpoints.begin(2), TrainerState(step=2, policy_version=2, run_id="r1"))
    with pytest.raises(EvalCommandError, match=r"step-000002 has no policy/ or diffusion_policy/ export to evaluate"):
        resolve_eval_model(str(path))


# ---- real evals --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ocr_server(tmp_path_factory):
    from rewards.local_server import start_reward_server

    with start_reward_server(OCR_TINY, log=tmp_path_factory.mktemp("eval-ocr") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def glyph_workers(glyph_rollout_worker, glyph_model_dir):
    """In-process rollout + decoder workers on the glyph model, configured as `blip3o-rl eval` does."""
    from rl.evaluation.harness import LocalWorkers
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import DiffusionDecoderWorker

    return LocalWorkers(glyph_rollout_worker, DiffusionDecoderWorker(DecoderConfig(model=str(glyph_model_dir))))


def endpoint_of(server):
    from rl.scoring.service import RewardEndpoint

    return RewardEndpoint(url=server.url, token=None, timeout_s=120, outage_budget_s=60, backoff_s=0.5)


def eval_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "eval", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_samples(path: Path) -> list[SampleResult]:
    return [SampleResult.model_validate_json(line) for line in path.read_text().splitlines()]


def outcome(samples: list[SampleResult]) -> list[tuple]:
    """What must be identical between two evals of one checkpoint, even in other processes or other
    chunks: seeds, the recognized text of glyph images drawn from the tokens, and rewards computed
    from that text. Float rounding (another batch, process or thread count) enters only through the
    sampled tokens, and moves one only at a near-tie of two perturbed logits."""
    return [(s.prompt_index, s.sample_index, s.seed, s.reward, s.recognized, s.correct) for s in samples]


@pytest.fixture(scope="module")
def cli_run(run_dir, ocr_server, tmp_path_factory):
    """`blip3o-rl eval --model RUN_DIR --bench ocr --limit 4 --images-per-prompt 2 --reward-url URL`."""
    out = tmp_path_factory.mktemp("eval-cli") / "ocr.json"
    result = eval_cli("--model", str(run_dir), "--bench", "ocr", "--limit", "4", "--images-per-prompt", "2",
                      "--reward-url", ocr_server.url, "--out", str(out))
    return out, result


@pytest.mark.slow
def test_cli_eval_of_a_run_checkpoint_writes_consistent_files(cli_run):
    out, result = cli_run
    report = json.loads(out.read_text())
    samples = read_samples(out.with_suffix("") / "samples.jsonl")
    assert [(s.prompt_index, s.sample_index, s.seed) for s in samples] == [
        (p, s, p * 2 + s) for p in range(4) for s in range(2)]
    assert all(s.policy_version == 3 for s in samples) and report["policy_version"] == 3  # the checkpoint's weights
    assert all((out.with_suffix("") / s.image).is_file() for s in samples)
    assert len(list((out.with_suffix("") / "images").glob("*.png"))) == 8
    rewards = [s.reward for s in samples]
    assert report["ocr"]["mean_reward"] == pytest.approx(sum(rewards) / 8)
    assert report["ocr"]["exact_match"] == pytest.approx(sum(r == 1.0 for r in rewards) / 8)
    assert (report["prompts"], report["images"], report["new_images"]) == (4, 8, 8)
    assert set(report["stage_seconds"]) == {"generate", "decode", "score", "write"}
    assert sum(report["stage_seconds"].values()) <= report["seconds"]
    assert "| images | mean reward | exact match |" in result.stdout
    assert f"| 8 | {report['ocr']['mean_reward']:.4f} |" in result.stdout
    assert "eval ocr: 8/8 images (100%)" in result.stderr


@pytest.mark.slow
def test_two_evals_agree_and_an_interrupted_eval_resumes_to_the_same_numbers(glyph_workers, ocr_server,
                                                                            glyph_model_dir, tmp_path):
    from rl.evaluation.harness import evaluate

    spec = EvalSpec(bench="ocr", model=str(glyph_model_dir), limit=4, images_per_prompt=2, chunk_images=3)
    endpoint = endpoint_of(ocr_server)
    first = evaluate(glyph_workers, endpoint, spec, SampleStore(tmp_path / "a"))
    second = evaluate(glyph_workers, endpoint, spec, SampleStore(tmp_path / "b"))
    assert outcome(read_samples(tmp_path / "a" / "samples.jsonl")) == outcome(read_samples(tmp_path / "b" / "samples.jsonl"))
    assert first.ocr == second.ocr and first.new_images == second.new_images == 8

    class Stop(Exception):
        pass

    def stop_after_first_chunk(progress):
        if progress.new > 0:
            raise Stop

    with pytest.raises(Stop):  # killed after the first chunk of 3 images was committed
        evaluate(glyph_workers, endpoint, spec, SampleStore(tmp_path / "c"), progress=stop_after_first_chunk)
    assert len(read_samples(tmp_path / "c" / "samples.jsonl")) == 3
    resumed = evaluate(glyph_workers, endpoint, spec, SampleStore(tmp_path / "c"))
    assert resumed.new_images == 5 and resumed.ocr == first.ocr
    assert outcome(read_samples(tmp_path / "c" / "samples.jsonl")) == outcome(read_samples(tmp_path / "a" / "samples.jsonl"))

    # part of the results file lost (2 whole lines and half of a third): those 3 rows are redone
    path = tmp_path / "c" / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]) + lines[-3][:25])
    again = evaluate(glyph_workers, endpoint, spec, SampleStore(tmp_path / "c"))
    assert again.new_images == 3 and again.ocr == first.ocr
    assert sorted(outcome(read_samples(path))) == outcome(read_samples(tmp_path / "a" / "samples.jsonl"))

    with pytest.raises(EvalMismatchError, match="images_per_prompt"):
        evaluate(glyph_workers, endpoint, spec.model_copy(update={"images_per_prompt": 3}), SampleStore(tmp_path / "c"))


@pytest.mark.slow
def test_edit_bench_through_the_glyph_workers_reports_the_scorers_values_of_its_saved_images(glyph_workers, tmp_path):
    """`--bench edit` on a synthetic evaluation set (`blip3o-rl prompts edit --split eval`) through the
    real glyph workers (each row sampled from its source's tokens) and a real reward app (tiny PP-OCR,
    a tiny CLIP as consistency's CLIP-I and clipscore's CLIP-T): every reported number is the scorer's
    value recomputed from the saved image. The edit bench's other tests: tests/test_eval_edit.py."""
    import numpy as np
    from PIL import Image

    from rewards.app.main import create_app
    from rewards.app.settings import Settings
    from rewards.clip_score import ClipEmbedder, ClipModelConfig
    from rewards.consistency import background_metrics
    from rewards.tiny import make_tiny_colour_clip
    from rl.evaluation.edit_bench import EditData, EditScoring
    from rl.evaluation.harness import evaluate
    from rl.prompts.edit import load_pixels, read_edit_file
    from rl.prompts.edit_synthetic import write_edit_set
    from rl.scoring.service import RewardEndpoint
    from tests.rewards_support import serve_in_thread

    data = tmp_path / "set" / "eval.jsonl"
    write_edit_set(data, 3, seed=1, split="eval", log=lambda *_: None)
    clip = str(make_tiny_colour_clip(tmp_path / "clip"))
    settings = Settings(scorers=["consistency", "edit_ocr", "clipscore"], ocr={"size": "tiny"}, batch_wait_ms=1,
                        consistency={"clip": {"model": clip}}, clipscore={"model": clip, "prefix": ""})
    spec = EvalSpec(bench="edit", model="glyph", images_per_prompt=2, edit_data=EditData(path=data))
    store = SampleStore(tmp_path / "edit")
    with serve_in_thread(create_app(settings)) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=120, outage_budget_s=60, backoff_s=0.5)
        report = evaluate(glyph_workers, endpoint, spec, store, edit_scoring=EditScoring(clip=True))
    samples, records = read_samples(store.samples_path), read_edit_file(data)
    assert [(s.prompt_index, s.sample_index, s.seed, s.prompt) for s in samples] == [
        (p, s, 2 * p + s, records[p].prompt) for p in range(3) for s in range(2)]

    embedder, _ = ClipEmbedder.from_config(ClipModelConfig(model=clip), "test")
    outputs = [np.asarray(Image.open(store.root / s.image)) for s in samples]
    sources = [load_pixels(records[s.prompt_index]) for s in samples]
    clip_i = (embedder.images(outputs) * embedder.images([source for source, _ in sources])).sum(-1)
    clip_t = (embedder.images(outputs) * embedder.texts([s.prompt for s in samples])).sum(-1)
    for sample, output, (source, mask), image_cos, text_cos in zip(samples, outputs, sources, clip_i, clip_t):
        assert output.shape == source.shape == (64, 256, 3)  # the glyph row, as the synthetic sources
        expected = background_metrics(output, source, mask)  # every synthetic edit has a mask (the word's 3 tiles)
        edit = sample.edit
        assert (edit.psnr, edit.ssim, edit.mse, edit.outside_fraction) == pytest.approx(
            (expected.psnr, expected.ssim, expected.mse, expected.outside_fraction), rel=1e-12)
        assert edit.outside_fraction == pytest.approx(5 / 8)  # 3 of the 8 tiles are the edit region
        assert edit.clip_i == pytest.approx(float(image_cos), abs=1e-5)
        assert edit.clip_t == pytest.approx(float(text_cos), abs=1e-5)
        assert edit.clip_t_caption is None and edit.judge is None and edit.edit_color is None
        assert 0.0 <= edit.edit_ocr <= 1.0 and edit.edit_ocr_exact == (edit.edit_ocr == 1.0)
        assert edit.copied is not None
    overall = report.edit.overall.metrics
    assert overall["psnr"].mean == pytest.approx(np.mean([s.edit.psnr for s in samples]), rel=1e-12)
    assert overall["psnr"].images == overall["clip_i"].images == overall["edit_ocr"].images == 6


@pytest.mark.slow
def test_in_process_eval_of_the_checkpoint_weights_equals_the_cli(glyph_workers, ocr_server, run_dir, cli_run,
                                                                  glyph_model_dir, tmp_path):
    """The last user of `glyph_workers` in this file; the session's glyph engine gets its weights back."""
    from rl.evaluation.command import load_policy_weights
    from rl.evaluation.harness import evaluate

    out, _ = cli_run
    spec = EvalSpec(bench="ocr", model="base", limit=4, images_per_prompt=2)
    base_store = SampleStore(tmp_path / "base")
    evaluate(glyph_workers, endpoint_of(ocr_server), spec, base_store)
    weights = load_policy_weights(run_dir / "step-000003" / "policy")
    version = glyph_workers.rollout.served_version() + 1  # the decoder refuses tokens of another version
    glyph_workers.rollout.update_weights(version, weights)
    glyph_workers.decoder.update_weights(version, weights)
    store = SampleStore(tmp_path / "v3")
    try:
        trained = evaluate(glyph_workers, endpoint_of(ocr_server), spec.model_copy(update={"model": "v3"}), store)
    finally:
        glyph_workers.rollout.update_weights(version + 1, load_policy_weights(glyph_model_dir / "ar"))
    cli_samples = read_samples(out.with_suffix("") / "samples.jsonl")
    assert outcome(read_samples(store.samples_path)) == outcome(cli_samples)
    assert trained.ocr.model_dump() == json.loads(out.read_text())["ocr"]
    # the checkpoint's weights are really what was evaluated: its images are not the base model's
    same = [(store.root / s.image).read_bytes() == (base_store.root / s.image).read_bytes()
            for s in read_samples(store.samples_path)]
    assert not all(same)


class SeededTokens:
    """A stand-in rollout worker (no vLLM): row r's codes drawn from a generator seeded seed + r."""

    def __init__(self, model_dir: Path):
        from policy.loading import load_vocab
        from policy.model_dir import ModelPaths

        self.vocab = load_vocab(ModelPaths(model_dir))

    def served_version(self) -> int:
        return 0

    def generate(self, captions, group_size, seed, sampling):
        import torch

        from rollout.records import RolloutBatch

        rows = len(captions) * group_size
        codes = torch.stack([torch.randint(0, self.vocab.codebook_size, (self.vocab.tokens_per_image,),
                                           generator=torch.Generator().manual_seed(seed + r)) for r in range(rows)])
        return RolloutBatch(prompt_ids=[[1]] * rows, group_index=list(range(rows)),
                            image_tokens=self.vocab.to_token_ids(codes), logprobs=torch.zeros(codes.shape),
                            policy_version=0, seed=seed)


@pytest.mark.slow
def test_ray_actors_evaluate_exactly_like_local_workers(ray_cluster, glyph_model_dir, ocr_server):
    """The trainer's path: the same harness over Ray actors (a real glyph decoder actor)."""
    from rl.evaluation.harness import ActorWorkers, LocalWorkers, evaluate
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import DiffusionDecoderWorker, decoder_actor

    config = DecoderConfig(model=str(glyph_model_dir), num_cpus=0)
    spec = EvalSpec(bench="ocr", model="seeded", limit=3, images_per_prompt=2, chunk_images=4)
    actors = ActorWorkers(ray_cluster.remote(SeededTokens).remote(glyph_model_dir), decoder_actor(config))
    local = LocalWorkers(SeededTokens(glyph_model_dir), DiffusionDecoderWorker(config))
    remote_report = evaluate(actors, endpoint_of(ocr_server), spec)
    local_report = evaluate(local, endpoint_of(ocr_server), spec)
    assert remote_report.ocr == local_report.ocr and remote_report.images == 6


DOG_PROMPTS = [  # the tiny detector sees only confident dogs: the first is correct, the second cannot be
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
     "prompt": "a photo of a dog and a cat"},
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
]


@pytest.mark.slow
def test_cli_geneval_on_tiny_sana_starts_its_own_reward_server(tiny_model_dir, tiny_geneval_dirs, tmp_path):
    import numpy as np
    from PIL import Image

    detector, clip = tiny_geneval_dirs
    prompts = tmp_path / "dogs.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in DOG_PROMPTS))
    out = tmp_path / "geneval.json"
    result = eval_cli("--model", str(tiny_model_dir), "--bench", "geneval", "--limit", "2", "--prompts", str(prompts),
                      "--detector", str(detector), "--clip", str(clip), "--out", str(out))
    report = json.loads(out.read_text())
    results = tmp_path / "geneval"
    samples = read_samples(results / "samples.jsonl")
    # --limit 2 = the first prompt of each of the first two tags (lines 0 and 1), 4 images each by default
    assert [(s.prompt_index, s.sample_index, s.seed, s.tag) for s in samples] == (
        [(0, i, i, "single_object") for i in range(4)] + [(1, i, 4 + i, "two_object") for i in range(4)])
    assert {p.name for p in (results / "images").iterdir()} == {Path(s.image).name for s in samples}
    assert np.asarray(Image.open(results / samples[0].image)).shape == (64, 64, 3)
    accuracy = {tag: sum(bool(s.correct) for s in samples if s.tag == tag) / 4 for tag in ("single_object", "two_object")}
    assert accuracy == {"single_object": 1.0, "two_object": 0.0}  # a dog is always seen, a cat never
    assert {t: v["accuracy"] for t, v in report["geneval"]["tags"].items()} == accuracy
    assert report["geneval"]["overall"] == pytest.approx((1.0 + 0.0) / 2)
    assert report["geneval"]["missing_tags"] == ["counting", "colors", "position", "color_attr"]
    assert "| **overall** (mean of 2 tags) | 8 | 4 | **0.5000** |" in result.stdout
    assert (results / "reward_server.log").is_file()
