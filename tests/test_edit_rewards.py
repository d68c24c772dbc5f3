"""Edit rewards: PIE-Bench's background metrics against hand values, the consistency scorer (pixel
metrics, CLIP-I on the tiny colour CLIP), the copy guard, the OCR edit check on a real PP-OCR read
of glyph-rendered words, and one request with source_image + mask through the real reward app."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest

from rewards.app.main import create_app
from rewards.app.settings import Settings
from rewards.client import RewardClient, encode_png
from rewards.clip_score import ClipEmbedder, ClipModelConfig
from rewards.consistency import (
    PSNR_CEILING_DB,
    ConsistencyConfig,
    ConsistencyScorer,
    background_metrics,
    gaussian_window,
    region_psnr,
    ssim,
)
from rewards.edit_checks import CopyGuard, EditColorScorer, EditOcrScorer, color_share
from rewards.errors import RewardInputError
from rewards.ocr import OcrConfig, OcrScorer, Reading
from rewards.scorer import EditSource, ScoreResult, ServedScorer, mask_of
from rewards.tiny import make_tiny_colour_clip
from tests.rewards_support import serve_in_thread

COS_RED_BLUE = -1085 / 3011  # the tiny colour CLIP's red vs blue image embeddings (tests/test_rewards_clip.py)


def perturbed_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """16x16 grey-100 source; mask = columns 0-7 (left half, True = edit); the output has the whole
    edit region set to 0 (inside: ignored) and a 2x2 block at rows 0-1, columns 10-11 raised by 51
    (outside: 51 / 255 = 0.2 on the 0-1 scale, all three channels)."""
    source = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    output = source.copy()
    output[:, :8] = 0
    output[0:2, 10:12] += 51
    return output, source, mask


def test_background_mse_psnr_hand_values():
    output, source, mask = perturbed_pair()
    metrics = background_metrics(output, source, mask)
    # PIE-Bench: both images times (1 - mask), mean over all 16*16*3 values: 4 px * 3 ch * 0.2^2 / 768
    assert metrics.mse == pytest.approx(4 * 3 * 0.04 / 768, rel=1e-12)  # 6.25e-4
    assert metrics.psnr == pytest.approx(10 * math.log10(1600), rel=1e-12)  # 1 / 6.25e-4 = 1600: 32.04 dB
    assert metrics.outside_fraction == 0.5
    # inside-only changes leave the background perfect (PSNR at its ceiling, SSIM 1)
    inside_only = source.copy()
    inside_only[:, :8] = 255
    perfect = background_metrics(inside_only, source, mask)
    assert (perfect.mse, perfect.psnr, perfect.ssim) == (0.0, PSNR_CEILING_DB, 1.0)


def test_ssim_constant_images_hand_value():
    # constant a = 0.5, b = 0.25: variances and covariance 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    # with C1 = 0.01^2 (the C2 factor is C2 / C2 = 1) at every window position
    a, b = np.full((16, 16, 3), 0.5), np.full((16, 16, 3), 0.25)
    assert ssim(a, b) == pytest.approx((0.25 + 1e-4) / (0.3125 + 1e-4), rel=1e-12)
    assert ssim(a, a) == 1.0


def test_ssim_single_pixel_hand_value():
    # an 11x11 image has one window position, centred on pixel (5, 5); a = 1 there and 0 elsewhere,
    # b = 0. The Gaussian weight of the centre is w = g0^2, g0 = 1 / sum_{x=-5..5} exp(-x^2 / 4.5):
    # mu_a = w, var_a = w - w^2, mu_b = var_b = cov = 0, so
    # SSIM = C1 / (w^2 + C1) * C2 / (w - w^2 + C2), C1 = 1e-4, C2 = 9e-4.
    g0 = 1 / sum(math.exp(-(x**2) / 4.5) for x in range(-5, 6))
    w = g0 * g0
    a = np.zeros((11, 11, 1))
    a[5, 5] = 1.0
    expected = 1e-4 / (w * w + 1e-4) * 9e-4 / (w - w * w + 9e-4)
    assert ssim(a, np.zeros((11, 11, 1))) == pytest.approx(expected, rel=1e-9)
    assert gaussian_window()[5] == pytest.approx(g0, rel=1e-12)


def brute_force_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """The same definition, window by window with an explicit 11x11 kernel (no separable filter)."""
    g = gaussian_window()
    kernel = np.outer(g, g)
    values = []
    for c in range(a.shape[2]):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                x, y = a[i : i + 11, j : j + 11, c], b[i : i + 11, j : j + 11, c]
                mx, my = (kernel * x).sum(), (kernel * y).sum()
                vx, vy = (kernel * x * x).sum() - mx**2, (kernel * y * y).sum() - my**2
                cxy = (kernel * x * y).sum() - mx * my
                values.append((2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4)))
    return float(np.mean(values))


def test_ssim_matches_window_by_window_computation():
    rng = np.random.default_rng(0)
    a = rng.random((16, 19, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(brute_force_ssim(a, b), rel=1e-10)  # float64 sums in another order
    with pytest.raises(RewardInputError, match="at least 11"):
        ssim(a[:10], b[:10])


def test_region_psnr_and_mask_rule():
    output, source, mask = perturbed_pair()
    # inside the left half every value went 100 -> 0: MSE (100/255)^2, not diluted by the other half
    assert region_psnr(output, source, mask) == pytest.approx(-20 * math.log10(100 / 255), rel=1e-12)
    assert region_psnr(source, source, mask) == PSNR_CEILING_DB
    grey = np.array([[[127, 128, 129], [128, 128, 128]]], np.uint8)  # means 128 and 128 -> edit
    assert mask_of(grey).tolist() == [[True, True]]
    assert mask_of(np.array([[127, 255]], np.uint8)).tolist() == [[False, True]]


def test_consistency_scorer_rewards_and_errors():
    output, source, mask = perturbed_pair()
    psnr = ConsistencyScorer(ConsistencyConfig(reward="psnr", psnr_cap_db=40.0))
    [result] = psnr.score([output], [""], [{}], [EditSource(source, mask)])
    assert result.reward == pytest.approx(10 * math.log10(1600) / 40, rel=1e-12)
    assert set(result.details) == {"mse", "psnr", "ssim", "outside_fraction", "source_resized", "regions"}
    # spatial credit's regions: 8 x 8 blocks of 2 x 2 px; the 32 of columns 0-7 lie inside the mask (none);
    # the block of rows 0-1, columns 10-11 is the raised one: PSNR 10 log10(1 / 0.2^2) / 40, the rest identical
    regions = {tuple(r["box"]): r["reward"] for r in result.details["regions"]}
    raised = (10 / 16, 0.0, 12 / 16, 2 / 16)
    assert len(regions) == 32 and all(box[0] >= 0.5 for box in regions)
    assert regions.pop(raised) == pytest.approx(10 * math.log10(25) / 40, rel=1e-12)
    assert set(regions.values()) == {1.0}
    [capped] = psnr.score([source], [""], [{}], [EditSource(source, mask)])
    assert capped.reward == 1.0  # a copy is perfectly consistent: consistency has no copy guard
    [by_ssim] = ConsistencyScorer(ConsistencyConfig(reward="ssim")).score([output], [""], [{}],
                                                                          [EditSource(source, mask)])
    assert by_ssim.reward == pytest.approx(result.details["ssim"]) and 0 < by_ssim.reward < 1
    with pytest.raises(RewardInputError, match="source_image") as missing:
        psnr.score([output, output], ["", ""], [{}, {}], [EditSource(source, mask), None])
    assert missing.value.item == 1 and missing.value.code == "missing_source"
    with pytest.raises(RewardInputError, match="consistency.clip") as unmasked:
        psnr.score([output], [""], [{}], [EditSource(source)])
    assert unmasked.value.code == "missing_mask"
    with pytest.raises(RewardInputError, match="whole image"):
        psnr.score([output], [""], [{}], [EditSource(source, np.ones((16, 16), bool))])


def test_consistency_resizes_a_source_of_another_size():
    # a 32x32 source (grey 100) for a 16x16 output: resized to 16x16, the mask with it (nearest)
    source = np.full((32, 32, 3), 100, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[:, :16] = True
    output, _, _ = perturbed_pair()
    [result] = ConsistencyScorer().score([output], [""], [{}], [EditSource(source, mask)])
    assert result.details["source_resized"] is True
    assert result.details["mse"] == pytest.approx(4 * 3 * 0.04 / 768, rel=1e-9)  # a flat grey resizes to itself


def test_clip_i_without_a_mask(tmp_path):
    embedder, version = ClipEmbedder.from_config(ClipModelConfig(model=str(make_tiny_colour_clip(tmp_path / "clip"))),
                                                 "consistency.clip")
    scorer = ConsistencyScorer(ConsistencyConfig(), embedder, version)
    red, blue = np.full((32, 32, 3), (255, 0, 0), np.uint8), np.full((32, 32, 3), (0, 0, 255), np.uint8)
    same, other = scorer.score([red, red], ["", ""], [{}, {}], [EditSource(red), EditSource(blue)])
    assert same.reward == pytest.approx(1.0, abs=1e-5) and same.details["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert other.details["clip_i"] == pytest.approx(COS_RED_BLUE, abs=1e-4) and other.reward == 0.0  # max(cos, 0)
    assert "clip-i" in scorer.version


class FixedReader:
    """Stands in for PaddleOCR: reads the given texts, in order."""

    version = "fixed-reader"

    def __init__(self, texts: list[str]):
        self.texts = texts

    def read(self, images):
        return self.texts[: len(images)]

    def readings(self, images):
        return [Reading(text) for text in self.read(images)]


def test_copy_guard_zeroes_the_edit_reward_of_a_copy():
    output, source, mask = perturbed_pair()
    target = [{"target": {"text": "dog"}}]
    guarded = EditOcrScorer(FixedReader(["dog"]), CopyGuard(40.0))
    # the source already reads "dog": returning it would earn the OCR reward without an edit
    [copy] = guarded.score([source], [""], target, [EditSource(source, mask)])
    assert (copy.reward, copy.details["ocr"], copy.details["copied"]) == (0.0, 1.0, True)
    assert copy.details["edit_region_psnr"] == PSNR_CEILING_DB
    [edit] = guarded.score([output], [""], target, [EditSource(source, mask)])
    assert (edit.reward, edit.details["copied"]) == (1.0, False)  # edit region PSNR 8.1 dB < 40
    [unguarded] = EditOcrScorer(FixedReader(["dog"]), CopyGuard(None)).score([source], [""], target, [None])
    assert unguarded.reward == 1.0 and "copied" not in unguarded.details
    # just under / over the threshold: the edit region changed by 1 grey level is 48.1 dB
    nudged = source.copy()
    nudged[mask] += 1
    assert EditOcrScorer(FixedReader(["dog"]), CopyGuard(48.0)).score(
        [nudged], [""], target, [EditSource(source, mask)])[0].reward == 0.0
    assert EditOcrScorer(FixedReader(["dog"]), CopyGuard(48.2)).score(
        [nudged], [""], target, [EditSource(source, mask)])[0].reward == 1.0
    with pytest.raises(RewardInputError, match="target") as no_target:
        guarded.score([output], [""], [{}], [EditSource(source, mask)])
    assert no_target.value.code == "missing_target"


def test_color_check_share_inside_the_mask_and_guard():
    # left half (the mask, 128 px): rows 0-11 pure red, rows 12-15 (250, 160, 10): nearest CSS colour
    # orange (distance^2 5^2 + 5^2 + 10^2 = 150; to red 5^2 + 160^2 + 10^2 = 25725). Right half blue.
    source = np.full((16, 16, 3), (0, 0, 255), np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    output = source.copy()
    output[:12, :8] = (255, 0, 0)
    output[12:, :8] = (250, 160, 10)
    assert color_share(output, mask, "red") == 0.75 and color_share(output, mask, "orange") == 0.25
    scorer = EditColorScorer(CopyGuard(40.0))
    red = {"target": {"color": "red"}}
    [edit, copy] = scorer.score([output, source], ["", ""], [red, {"target": {"color": "blue"}}],
                                [EditSource(source, mask)] * 2)
    assert (edit.reward, edit.details["share"], edit.details["copied"]) == (0.75, 0.75, False)
    assert (copy.reward, copy.details["share"], copy.details["copied"]) == (0.0, 1.0, True)  # already blue: a copy
    [whole] = EditColorScorer(CopyGuard(None)).score([output], [""], [red], [None])
    assert whole.reward == 12 * 8 / 256  # no mask: the share of the whole image
    with pytest.raises(RewardInputError, match="one of red, orange") as bad:
        scorer.score([output], [""], [{"target": {"color": "teal"}}], [EditSource(source, mask)])
    assert bad.value.code == "missing_target"


@pytest.fixture(scope="module")
def ocr() -> OcrScorer:
    return OcrScorer(OcrConfig(size="small", cache_size=8))


@pytest.mark.slow
def test_edit_ocr_reads_the_target_word_on_glyph_renders(ocr):
    from rl.prompts.edit_synthetic import glyph_renderer, tile_mask

    glyphs = glyph_renderer()
    source, edited, wrong = (glyphs.render_text(text) for text in ("cat sun", "dog sun", "cow sun"))
    mask = mask_of(tile_mask(glyphs.image_shape, glyphs.config.tile_width, 0, 3))
    scorer = EditOcrScorer(ocr, CopyGuard(40.0))
    target = {"target": {"text": "dog"}}
    done, copied, missed = scorer.score([edited, source, wrong], [""] * 3, [target] * 3, [EditSource(source, mask)] * 3)
    assert done.reward == 1.0 and done.details["recognized"] == "dog", done.details  # the box of tiles 0-2 only
    assert copied.reward == 0.0 and copied.details["copied"] is True
    # the mask's box reads "cow" (the kept "sun" is not read): 2 of 3 letters off "dog"
    assert missed.reward == pytest.approx(1 - 2 / 3) and missed.details["copied"] is False, missed.details
    assert missed.details["recognized"].replace(" ", "").lower() == "cow"


def test_consistency_request_through_the_reward_app():
    """source_image + mask over HTTP (uvicorn, the real consistency scorer): the hand values come back;
    a mask of another size, a mask without a source and an unmasked item are 422 naming the problem."""
    output, source, mask = perturbed_pair()
    settings = Settings(scorers=["consistency"], max_items=8, batch_wait_ms=1)
    with serve_in_thread(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        item = {"image": encode_png(output), "source_image": encode_png(source),
                "mask": encode_png(mask.astype(np.uint8) * 255)}
        answer = http.post("/v1/rewards/consistency", json={"items": [item]})
        assert answer.status_code == 200, answer.text
        [result] = answer.json()["results"]
        assert result["details"]["mse"] == pytest.approx(6.25e-4, rel=1e-12)
        assert result["reward"] == pytest.approx(10 * math.log10(1600) / 40, rel=1e-12)
        assert answer.json()["scorer"] == "consistency"

        small_mask = {**item, "mask": encode_png(np.zeros((8, 8), np.uint8))}
        no_source = {"image": item["image"], "mask": item["mask"]}
        unmasked = {"image": item["image"], "source_image": item["source_image"]}
        for bad, code, words in ((small_mask, "mask_size", "8x8"), (no_source, "invalid_request", "source_image"),
                                 (unmasked, "missing_mask", "consistency.clip")):
            error = http.post("/v1/rewards/consistency", json={"items": [bad]})
            assert error.status_code == 422 and error.json()["error"] == code, error.text
            assert words in error.json()["message"]

        async def through_client():
            async with RewardClient(base) as client:
                return await client.score("consistency", [output], [""], [{}], sources=[EditSource(source, mask)])

        assert asyncio.run(through_client()).results[0].reward == pytest.approx(result["reward"], rel=1e-12)


def test_scorers_without_sources_never_see_them():
    class Plain:
        name, version = "plain", "1"

        def score(self, images, prompts, metadatas):
            return [ScoreResult(1.0)] * len(images)

    image = np.zeros((4, 4, 3), np.uint8)
    served = ServedScorer(Plain())
    assert not served.reads_sources
    assert served.score_conditions([image], [("p", {}, EditSource(image))])[0].reward == 1.0
