"""Spatial credit: reward regions projected onto token / latent grids, per-token advantages by hand,
lambda 0 = plain GRPO exactly, the regions of OCR (real PP-OCR), GenEval (constructed detections) and
JPEG blocks, and one learner step with spatial credit on the tiny glyph model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rewards.compressibility import BLOCKS, JpegScorer, block_regions
from rewards.geneval import GenevalScorer, object_regions
from rewards.geneval_rules import Detection, GenevalMetadata, evaluate
from rewards.scorer import Region, ScoreResult, ServedScorer, parse_regions
from rl.objectives.flow_grpo import local_policy_loss, position_log_probs
from rl.objectives.grpo import (
    GRPOConfig,
    GRPOLoss,
    LossInputs,
    SpatialCreditConfig,
    group_advantages,
    spatial_credit,
)
from rl.objectives.regions import (
    ComponentRegions,
    cell_overlaps,
    component_regions,
    local_advantages,
    project,
    region_advantages,
    token_grid,
)
from rl.scoring.reward_mix import RewardComponentConfig, mix_rewards
from rollout.flow_sde import sde_step, step_log_prob

EPS = 1e-4


def regions(*pairs) -> ComponentRegions:
    """One component of weight 1 from per-row lists of (box, reward)."""
    return component_regions("r", 1.0, [[Region(tuple(box), reward) for box, reward in row] for row in pairs])


# ---- projection on hand-built boxes -------------------------------------------------------------


def test_cell_overlaps_are_fractions_of_each_cell():
    # 2 x 2 grid, cells of 0.5 x 0.5 (area 0.25). A box over the top-left quarter and half of the
    # bottom-right one: 0.25 / 0.25 = 1 of cell 0, 0.125 / 0.25 = 0.5 of cell 3.
    overlaps = cell_overlaps(np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 0.75]]), (2, 2))
    np.testing.assert_allclose(overlaps, [[1, 0, 0, 0], [0, 0, 0, 0.5]])


def test_projection_reaches_covered_cells_and_the_home_cell_of_a_small_box():
    # Box A covers cell 0 (value 1); box B = x [0.4, 1], y [0.5, 1] covers 0.05 / 0.25 = 0.2 of cell 2
    # (below min_cover 0.5, and not its home) and all of cell 3 (value -1).
    values, covered = project(np.array([[0, 0, 0.5, 0.5], [0.4, 0.5, 1.0, 1.0]]), np.array([1.0, -1.0]), (2, 2))
    np.testing.assert_array_equal(covered, [True, False, False, True])
    np.testing.assert_allclose(values, [1, 0, 0, -1])
    # a box far smaller than a cell still reaches its home cell (0.04 of cell 0)
    values, covered = project(np.array([[0.1, 0.1, 0.2, 0.2]]), np.array([3.0]), (2, 2))
    np.testing.assert_array_equal(covered, [True, False, False, False])
    assert values[0] == 3.0
    # two regions over cell 0: the overlap-weighted mean (1 x 1 + 0.5 x 0) / 1.5 = 2/3
    values, _ = project(np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25]]), np.array([1.0, 0.0]), (2, 2))
    assert values[0] == pytest.approx(2 / 3)


def test_glyph_tiles_and_siglip_raster():
    assert token_grid("glyph", 8) == (1, 8)
    assert token_grid("sana", 729) == (27, 27)
    with pytest.raises(ValueError, match="no square grid"):
        token_grid("sana", 8)
    # a character box overhanging its tile (tile 2 = x [0.25, 0.375]) by 0.01 on the right: tile 2 only
    _, covered = project(np.array([[0.26, 0.2, 0.385, 0.9]]), np.array([1.0]), (1, 8))
    assert covered.tolist() == [False, False, True, False, False, False, False, False]
    # a 27 x 27 raster: token t is row t // 27, column t % 27; the box of cells (1, 2) and (1, 3)
    _, covered = project(np.array([[2 / 27, 1 / 27, 4 / 27, 2 / 27]]), np.array([1.0]), (27, 27))
    assert np.flatnonzero(covered).tolist() == [27 + 2, 27 + 3]


# ---- the local advantages and the per-token advantages, by hand -------------------------------------


def test_region_advantages_pool_the_groups_regions():
    # group 0: rows 0, 1 with region rewards [1, 0] and [1, 1]: pooled mean 0.75, unbiased std
    # sqrt((3 x 0.25^2 + 0.75^2) / 3) = 0.5; group 1: one row, one region -> no signal.
    out, signal = region_advantages((np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([5.0])),
                                    np.array([0, 0, 1]), scale_by_std=True, eps=EPS)
    np.testing.assert_allclose(out[0], [0.25 / 0.5001, -0.75 / 0.5001])
    np.testing.assert_allclose(out[1], [0.25 / 0.5001, 0.25 / 0.5001])
    assert out[2].tolist() == [0.0] and signal.tolist() == [True, True, False]


def test_per_token_advantages_match_hand_values():
    # One group of 2 on a 1 x 4 glyph grid. Scalar rewards [1, 0]: A = +-0.5 / (std 0.70711 + 1e-4).
    # Regions: row 0 has tile 0 right (1) and tile 1 wrong (0); row 1 has tile 0 wrong (0).
    # Pooled [1, 0, 0]: mean 1/3, std sqrt(1/3) = 0.57735 -> l = 0.66667 / 0.57745, -0.33333 / 0.57745.
    cfg = GRPOConfig(spatial=SpatialCreditConfig(weight=0.5))
    base = group_advantages(torch.tensor([1.0, 0.0]), [0, 0], cfg)
    tile = [[0.0, 0.0, 0.25, 1.0], [0.25, 0.0, 0.5, 1.0]]
    step = [regions([(tile[0], 1.0), (tile[1], 0.0)], [(tile[0], 0.0)])]
    out = spatial_credit(base, step, [0, 0], (1, 4), cfg.spatial, cfg)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    right, wrong = (2 / 3) / (math.sqrt(1 / 3) + EPS), (-1 / 3) / (math.sqrt(1 / 3) + EPS)
    expected = torch.tensor([[a + 0.5 * right, a + 0.5 * wrong, a, a], [-a + 0.5 * wrong, -a, -a, -a]])
    torch.testing.assert_close(out.token_advantages([0, 1]), expected, rtol=0, atol=1e-6)  # float32 rounding
    assert out.local_signal.tolist() == [[True, True, False, False], [True, False, False, False]]
    summary = out.spatial_summary()
    assert summary["spatial_share"] == 3 / 8
    assert summary["spatial_std"] == pytest.approx(float(np.std([right, wrong, wrong])), abs=1e-6)


def test_weighted_components_add_where_both_reach_and_a_subset_can_be_chosen():
    # two components on a 1 x 2 grid, each with a signal in its group; the cell both reach gets
    # w_a l_a + w_b l_b; `rewards: [a]` keeps component a only.
    a = component_regions("a", 2.0, [[Region((0, 0, 0.5, 1), 1.0)], [Region((0, 0, 0.5, 1), 0.0)]])
    b = component_regions("b", -1.0, [[Region((0, 0, 1, 1), 3.0)], [Region((0, 0, 1, 1), 1.0)]])
    local = local_advantages([a, b], [0, 0], (1, 2))
    la, lb = 0.5 / (math.sqrt(0.5) + EPS), 1.0 / (math.sqrt(2) + EPS)  # (r - mean) / (std + eps)
    np.testing.assert_allclose(local.values, [[2 * la - lb, -lb], [-2 * la + lb, lb]])
    cfg = GRPOConfig(spatial=SpatialCreditConfig(weight=1.0, rewards=["a"]))
    base = group_advantages(torch.tensor([1.0, 1.0]), [0, 0], cfg)
    chosen = spatial_credit(base, [a, b], [0, 0], (1, 2), cfg.spatial, cfg)
    torch.testing.assert_close(chosen.local, torch.tensor([[2 * la, 0.0], [-2 * la, 0.0]]), rtol=0, atol=1e-6)


def test_a_zero_signal_group_with_local_signal_is_kept_only_when_lambda_is_positive():
    # every sample wrote the same partial answer: equal scalar rewards, but right and wrong regions
    cfg = GRPOConfig(filter_zero_signal_groups=True)
    base = group_advantages(torch.tensor([0.5, 0.5]), [0, 0], cfg)
    step = [regions([((0, 0, 0.5, 1), 1.0), ((0.5, 0, 1, 1), 0.0)], [((0, 0, 0.5, 1), 1.0), ((0.5, 0, 1, 1), 0.0)])]
    assert base.kept_rows() == []
    on = spatial_credit(base, step, [0, 0], (1, 2), SpatialCreditConfig(weight=1.0), cfg)
    assert on.kept_rows() == [0, 1] and on.advantages.tolist() == [0.0, 0.0]
    assert bool((on.token_advantages([0])[0, 0] > 0) & (on.token_advantages([0])[0, 1] < 0))
    off = spatial_credit(base, step, [0, 0], (1, 2), SpatialCreditConfig(weight=0.0), cfg)
    assert off is base and off.kept_rows() == []


def test_lambda_zero_is_plain_grpo_exactly():
    """Loss and gradient bitwise equal to GRPO without spatial credit (the same tensors flow)."""
    torch.manual_seed(0)
    cfg = GRPOConfig(beta=0.01, spatial=SpatialCreditConfig(weight=0.0))
    plain = group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.7]), [0, 0, 1, 1], GRPOConfig(beta=0.01))
    step = [regions(*[[((0, 0, 0.5, 1), float(b))] for b in range(4)])]
    spatial = spatial_credit(plain, step, [0, 0, 1, 1], (1, 4), cfg.spatial, cfg)
    logits = torch.randn(4, 4)
    old, ref = torch.randn(4, 4), torch.randn(4, 4)

    def loss_and_grad(advantages):
        logp = logits.clone().requires_grad_(True)
        out = GRPOLoss(cfg, 4)(LossInputs(logp, old, old, advantages.token_advantages([0, 1, 2, 3]),
                                          torch.ones(4), 16.0, ref_logprobs=ref))
        out.loss.backward()
        return out.loss.detach(), logp.grad

    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(plain), loss_and_grad(spatial)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    # and per-token advantages equal to A_b on every token give the [B] path's loss exactly
    tokenwise = GRPOLoss(cfg, 4)(LossInputs(logits, old, old, plain.advantages[:, None].expand(4, 4), torch.ones(4),
                                            16.0, ref_logprobs=ref)).loss
    assert torch.equal(tokenwise, loss_a)


# ---- the diffusion learner's local term --------------------------------------------------------------


def test_position_log_probs_average_to_the_image_log_prob_and_weight_the_gradient():
    torch.manual_seed(0)
    x, v, eps = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    sampled = sde_step(v, x, 0.8, 0.6, 0.9, 0.7, noise=eps)
    velocity = v.clone().requires_grad_(True)
    step = sde_step(velocity, x, 0.8, 0.6, 0.9, 0.7, next_latents=sampled.next_latents)
    positions = position_log_probs(step.next_latents, step.mean, step.scale)  # [2, 4]
    torch.testing.assert_close(positions.mean(dim=1), step_log_prob(step))  # float32 summation order
    local = torch.tensor([[1.0, 0.0, -2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    loss = local_policy_loss(positions, local, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-float(local.mean()))
    (grad,) = torch.autograd.grad(loss, velocity, retain_graph=True)
    (expected,) = torch.autograd.grad(-(local * positions).mean(), velocity)
    torch.testing.assert_close(grad, expected)


# ---- the scorers' regions ------------------------------------------------------------------------


def test_jpeg_blocks_single_out_the_busy_block():
    image = np.full((64, 64, 3), 128, np.uint8)
    image[8:16, 16:24] = np.random.default_rng(0).integers(0, 256, (8, 8, 3))  # block (1, 2) of 8 x 8
    compress = block_regions(image, "compressibility")
    assert len(compress) == BLOCKS * BLOCKS
    busy = compress[1 * BLOCKS + 2]
    assert busy.box == (0.25, 0.125, 0.375, 0.25)
    assert busy.reward < 0 and all(r.reward == 0 for i, r in enumerate(compress) if i != 1 * BLOCKS + 2)
    incompress = block_regions(image, "incompressibility")
    assert incompress[1 * BLOCKS + 2].reward == pytest.approx(-busy.reward * 500)  # size_kB x 64 vs -size_kB x 64 / 500
    # through the generic scorer: the regions are in details, checked by the server's wrapper
    (result,) = ServedScorer(JpegScorer("compressibility")).score_conditions([image], [("", {})])
    assert [Region(tuple(r["box"]), r["reward"]) for r in result.details["regions"]] == compress


def test_bad_regions_are_refused():
    with pytest.raises(ValueError, match="is not 0 <= x0"):
        parse_regions([{"box": [0.5, 0, 0.2, 1], "reward": 1}])
    with pytest.raises(ValueError, match="finite"):
        parse_regions([{"box": [0, 0, 1, 1], "reward": float("nan")}])

    class Bad:
        name, version = "bad", "1"

        def score(self, images, prompts, metadatas):
            return [ScoreResult(1.0, {"regions": [{"box": [0, 0, 2, 1], "reward": 0}]})]

    with pytest.raises(RuntimeError, match="bad regions"):
        ServedScorer(Bad()).score_conditions([np.zeros((4, 4, 3), np.uint8)], [("", {})])


def det(label: str, x: float, y: float, score: float = 0.95, color: str = "red") -> Detection:
    d = Detection(label, (x, y, x + 20, y + 20), score)
    COLOURS[id(d)] = color  # what the fake CLIP reports for it
    return d


COLOURS: dict[int, str] = {}


def fake_colours(objects, cls):
    return [COLOURS[id(obj)] for obj in objects]


def test_geneval_regions_pass_and_fail_per_object():
    # "a red cup and a dog": the cup is blue (fails its colour), the first dog passes, a second
    # dog is one more than asked (fails), a cat is named by no clause (no region), no missing region.
    meta = GenevalMetadata.model_validate({"tag": "color_attr", "include": [
        {"class": "cup", "count": 1, "color": "red"}, {"class": "dog", "count": 1}]})
    cup, dog, dog2, cat = det("cup", 0, 0, color="blue"), det("dog", 40, 0, 0.9), det("dog", 60, 60, 0.8), det("cat", 0, 60)
    result = evaluate(meta, [cup, dog, dog2, cat], fake_colours)
    got = object_regions(meta, result, 100, 100, fake_colours)
    assert sorted((r.box, r.reward) for r in got) == [
        ((0.0, 0.0, 0.2, 0.2), 0.0), ((0.4, 0.0, 0.6, 0.2), 1.0), ((0.6, 0.6, 0.8, 0.8), 0.0)]


def test_geneval_regions_judge_positions_and_missing_objects():
    # "a cat right of a dog": the cat stands left of the dog -> cat 0, dog 1
    meta = GenevalMetadata.model_validate({"tag": "position", "include": [
        {"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]})
    dog, cat = det("dog", 60, 40), det("cat", 0, 40)
    got = object_regions(meta, evaluate(meta, [dog, cat], fake_colours), 100, 100, fake_colours)
    assert sorted((r.box, r.reward) for r in got) == [((0.0, 0.4, 0.2, 0.6), 0.0), ((0.6, 0.4, 0.8, 0.6), 1.0)]
    # the dog missing: the cat's position is not judged (no target), it passes; the dog has no region
    got = object_regions(meta, evaluate(meta, [cat], fake_colours), 100, 100, fake_colours)
    assert [(r.box, r.reward) for r in got] == [((0.0, 0.4, 0.2, 0.6), 1.0)]


def test_geneval_scorer_answers_regions_with_its_results():
    class FixedDetector:
        def detect(self, images):
            return [[det("dog", 10, 10), det("dog", 50, 50, 0.5)] for _ in images]

    class Colours:
        def classify(self, image, objects, cls):
            return fake_colours(objects, cls)

    meta = GenevalMetadata.model_validate({"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    (result,) = GenevalScorer(FixedDetector(), Colours()).score([np.zeros((100, 100, 3), np.uint8)], [meta])
    assert sorted((r.box, r.reward) for r in result.regions) == [((0.1, 0.1, 0.3, 0.3), 1.0), ((0.5, 0.5, 0.7, 0.7), 0.0)]


def test_mix_keeps_each_components_regions_and_weight():
    components = (RewardComponentConfig(name="ocr", scorer="ocr", weight=2.0),
                  RewardComponentConfig(name="jpeg", scorer="compressibility", weight=0.5))
    one = (Region((0, 0, 1, 1), 1.0),)
    mixed = mix_rewards(components, {"ocr": np.array([1.0, 0.0]), "jpeg": np.array([-0.1, -0.2])}, [0, 0],
                        regions={"ocr": [one, ()], "jpeg": [(), ()]})
    assert mixed.weights == {"ocr": 2.0, "jpeg": 0.5}
    assert mixed.regions == {"ocr": [one, ()]}  # a component that answered none is left out


# ---- real PP-OCR on glyph renders whose right and wrong characters are known ---------------------------


@pytest.fixture(scope="module")
def ocr():
    from rewards.ocr import OcrConfig, OcrScorer

    return OcrScorer(OcrConfig(size="tiny"))


@pytest.fixture(scope="module")
def glyphs():
    from rollout.decoder_config import GlyphConfig
    from rollout.glyph import GlyphDecoder

    return GlyphDecoder(GlyphConfig(), 64, 8)


def test_alignment_hand_values():
    from rewards.ocr import alignment

    assert alignment("cxt", "cat") == ([True, False, True], [])  # substitution
    assert alignment("ct", "cat") == ([True, True], [1])  # 'a' missing after 1 character
    assert alignment("ca", "cat") == ([True, True], [2])
    assert alignment("xcatx", "cat") == ([False, True, True, True, False], [])  # substring: extras match nothing


@pytest.mark.slow
@pytest.mark.parametrize("drawn, tiles", [
    ("cxt", {0: 1.0, 1: 0.0, 2: 1.0}),  # x is wrong
    ("c t", {0: 1.0, 1: 0.0, 2: 1.0}),  # the missing 'a' gets a 0 region in the gap, tile 1
    ("cat", {0: 1.0, 1: 1.0, 2: 1.0}),
])
def test_real_ocr_regions_land_on_the_right_tiles(ocr, glyphs, drawn, tiles):
    image = glyphs.render_text(drawn)
    (result,) = ocr.score([image], ["cat"])
    assert ocr.character_boxes, "PaddleX's word-box seam moved: per-character boxes fell back to word splits"
    boxes = np.array([r.box for r in result.regions])
    values, covered = project(boxes, np.array([r.reward for r in result.regions]), (1, 8))
    assert {t: float(values[t]) for t in np.flatnonzero(covered)} == tiles, (result.recognized, result.regions)


# ---- one learner step with spatial credit on the tiny glyph model --------------------------------------


@pytest.mark.slow
def test_ar_learner_step_with_spatial_credit(ray_cluster, glyph_model_dir):
    from policy.loading import load_tokenizer, load_vocab
    from policy.model_dir import ModelPaths
    from policy.prompt import rollout_prompt_ids
    from rl.learners.ar_config import LearnerConfig
    from rl.learners.group import LearnerGroup
    from rollout.records import RolloutBatch

    paths = ModelPaths(glyph_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    prompts = [rollout_prompt_ids(tokenizer, 'a sign that says "cat"')] * 4
    codes = torch.randint(0, vocab.codebook_size, (4, vocab.tokens_per_image), generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(prompts, [0, 0, 0, 0], vocab.to_token_ids(codes), torch.zeros(codes.shape),
                         policy_version=0, seed=0)
    grpo = GRPOConfig(beta=0.0, tis_cap=None, spatial=SpatialCreditConfig(weight=1.0))
    config = LearnerConfig(model=str(glyph_model_dir), world_size=1, micro_batch_size=4, lr=1e-3, torch_threads=1,
                           grpo=grpo)
    tile = 1 / 8
    step = [regions(*[[((0, 0, tile, 1), float(b % 2)), ((tile, 0, 2 * tile, 1), 0.0)] for b in range(4)])]
    group = LearnerGroup(config, timeout_s=600)
    try:
        metrics = group.train_step(batch, group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), [0] * 4, grpo), step)
    finally:
        group.shutdown()
    assert metrics.optimizer_steps == 1 and math.isfinite(metrics.loss)
    assert metrics.spatial_share == 2 / 8  # tiles 0 and 1 of every row
    # pooled [1, 0, 0, 0, 1, 0, 0, 0]: the L values are 1.5 / std and -0.5 / std; their spread:
    values = np.array([1, 0, 0, 0, 1, 0, 0, 0]) - 0.25
    assert metrics.spatial_std == pytest.approx(float(np.std(values / (values.std(ddof=1) + EPS))), rel=1e-5)


def test_regions_pass_from_the_service_through_the_client_and_the_mix():
    """A stub OCR answering one region and the real compressibility scorer, over HTTP: each row's
    regions reach SampleReward, the step's mix and the learner's ComponentRegions, with weights."""
    from rewards.app.main import create_app
    from rewards.app.settings import Settings
    from rewards.ocr import OcrResult
    from rewards.scorer import build_builtin
    from rl.prompts.sources import PromptItem
    from rl.run.pipeline import step_mix
    from rl.run.policies import step_regions
    from rl.scoring.reward_mix import resolve_mix
    from rl.scoring.service import RewardEndpoint, score_images
    from tests.rewards_support import serve_in_thread

    class OneRegionOcr:
        version = "stub"

        def score(self, images, targets):
            return [OcrResult(1.0, t, t, (Region((0.0, 0.0, 0.5, 1.0), 1.0),)) for t in targets]

    mix = (RewardComponentConfig(name="ocr", scorer="ocr", weight=2.0),
           RewardComponentConfig(name="jpeg", scorer="compressibility", weight=0.5))
    settings = Settings(scorers=["ocr", "compressibility"])
    app = create_app(settings, scorers={"ocr": OneRegionOcr(), "compressibility": build_builtin("compressibility", settings)})
    images = np.full((2, 16, 16, 3), 200, np.uint8)
    items = [PromptItem('a sign that says "cat"', "ocr")] * 2
    with serve_in_thread(app) as url:
        endpoint = RewardEndpoint(url=url, token=None, timeout_s=10, outage_budget_s=10, backoff_s=0.05, mix=mix)
        scored = score_images(endpoint, images, items, mix)
    assert [r.regions["ocr"] for r in scored.rewards] == [(Region((0.0, 0.0, 0.5, 1.0), 1.0),)] * 2
    assert all(len(r.regions["jpeg"]) == BLOCKS * BLOCKS for r in scored.rewards)
    mixed = step_mix(resolve_mix(mix, {"ocr"}), scored.rewards, [scored], [0, 0])
    scored = SimpleNamespace(mixed=mixed)  # what ScoredStep holds
    assert step_regions(scored, None) is None  # spatial credit off: nothing for the learners
    chosen = {c.name: c for c in step_regions(scored, SpatialCreditConfig(weight=1.0))}
    assert {name: c.weight for name, c in chosen.items()} == {"ocr": 2.0, "jpeg": 0.5}
    np.testing.assert_array_equal(chosen["ocr"].boxes[1], [[0.0, 0.0, 0.5, 1.0]])


def test_the_spatial_demo_is_the_demo_with_spatial_credit_on():
    """The two configs the benchmark compares stay the same run but for the spatial section."""
    from pathlib import Path

    import yaml

    configs = Path(__file__).resolve().parents[1] / "deploy" / "configs"
    base = yaml.safe_load((configs / "tiny-cpu-glyph-ocr.yaml").read_text())
    spatial = yaml.safe_load((configs / "tiny-cpu-glyph-ocr-spatial.yaml").read_text())
    assert spatial["learner"]["grpo"].pop("spatial")["weight"] > 0
    assert {**spatial, "name": base["name"]} == base
