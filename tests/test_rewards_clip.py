"""CLIPScore and PickScore (rewards/clip_score.py) through the real transformers CLIPModel, on a
tiny CLIP whose weights are set by hand to embed colour (rewards/tiny.py `wire_colour_clip`):
random weights cannot rank images by meaning, so the orderings are built in, and the formulas are
checked against the model's own embeddings and against values derived by hand.

Hand values. Both towers embed a colour c in {-1, +1}^3 (pixel 0 -> -1, 255 -> +1; a colour word
by its last letter) as the first three dims of LayerNorm((c, 0 x 29)), i.e. of c minus its mean over
the 32 hidden dims; for one +1 and two -1 the mean is -1/32, so red -> (33, -31, -31) / 32.
    cos(red, red)  = 1
    cos(red, blue) = (-33*31 + 31*31 - 31*33) / (33^2 + 2*31^2) = -1085 / 3011 ~ -0.360
An image half red, half blue (whole 8x8 patches of each) embeds as the sum of the two patch
vectors, (2, -62, 2) / 32, so
    cos(half, red) = (2*33 + 62*31 - 2*31) / sqrt((4 + 3844 + 4) * 3011) = 1926 / sqrt(3852 * 3011) ~ 0.566
"""

from __future__ import annotations

import argparse
import math
import shutil
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from policy.model_dir import CheckpointNotFoundError
from rewards.aesthetic import AestheticConfig, aesthetic_scorer
from rewards.app.main import create_app
from rewards.app.run import add_serve_arguments, serve_from_args
from rewards.app.settings import Settings
from rewards.client import encode_png
from rewards.clip_score import (
    ClipEmbedder,
    ClipScoreConfig,
    PickScoreConfig,
    clipscore_scorer,
    directory_fingerprint,
    pickscore_scorer,
)
from rewards.tiny import make_tiny_colour_clip
from tests.rewards_support import serve_in_thread

PICK_SCALE = 50.0  # exp(logit_scale) of the tiny PickScore: not CLIP's initial 14.29, so a missing exp shows
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COS_RED_BLUE = -1085 / 3011
COS_HALF_RED = 1926 / math.sqrt(3852 * 3011)


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((32, 32, 3), rgb, np.uint8)


def halves(left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    image = solid(left)
    image[:, 16:] = right  # columns 16-31: whole 8x8 patches
    return image


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(CLIPScore model dir, PickScore model dir, PickScore processor dir): PickScore keeps its
    processor apart, as PickScore_v1 takes the processor of laion/CLIP-ViT-H-14."""
    root = tmp_path_factory.mktemp("tiny-clip-rewards")
    clip = make_tiny_colour_clip(root / "clip")
    pick = make_tiny_colour_clip(root / "pickscore", math.log(PICK_SCALE), processor_directory=root / "pick-processor")
    return clip, pick, root / "pick-processor"


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    """An aesthetic head 16 -> 8 -> 4 -> 4 -> 2 -> 1 (the predictor's five Linear layers, narrower),
    set by hand: the first three layers pass embedding dims 0-2 on, the last two give
    5 + 4 * (e . u_red), u_red the unit red vector (33, -31, -31) / sqrt(3011). The image embedding
    e is unit, so the reward is 5 + 4 * cos(image, red)."""
    shapes = {0: (8, 16), 2: (4, 8), 4: (4, 4), 6: (2, 4), 7: (1, 2)}  # keys as in the released .pth
    state = {}
    for index, (rows, cols) in shapes.items():
        weight = torch.zeros(rows, cols)
        if index < 6:
            weight[range(3), range(3)] = 1.0
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = weight, torch.zeros(rows)
    state["layers.6.weight"][0, :3] = torch.tensor([33.0, -31.0, -31.0]) / math.sqrt(3011)
    state["layers.7.weight"][0, 0], state["layers.7.bias"][0] = 4.0, 5.0
    path = tmp_path_factory.mktemp("aesthetic-head") / "head.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def settings(dirs, aesthetic_head) -> Settings:
    clip, pick, processor = dirs
    return Settings(
        scorers=["clipscore", "pickscore", "aesthetic"],
        clipscore=ClipScoreConfig(model=str(clip)),
        pickscore=PickScoreConfig(model=str(pick), processor=str(processor)),
        aesthetic=AestheticConfig(model=str(clip), head=str(aesthetic_head)),
        max_items=8,
    )


@pytest.fixture(scope="module")
def clipscore(settings):
    return clipscore_scorer(settings)


@pytest.fixture(scope="module")
def pickscore(settings):
    return pickscore_scorer(settings)


@pytest.fixture(scope="module")
def aesthetic(settings):
    return aesthetic_scorer(settings)


def own_cosines(embedder: ClipEmbedder, images: list[np.ndarray], texts: list[str]) -> torch.Tensor:
    """Cosines straight from the model's get_*_features, one pair at a time (no batching, no dedupe)."""
    values = []
    with torch.no_grad():
        for image, text in zip(images, texts):
            pixels = embedder.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            image_emb = embedder.model.get_image_features(pixel_values=pixels).pooler_output[0]
            tokens = embedder.tokenizer([text], return_tensors="pt")
            text_emb = embedder.model.get_text_features(**tokens).pooler_output[0]
            values.append(torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=0))
    return torch.stack(values)


IMAGES = [solid(RED), solid(RED), halves(RED, BLUE), solid(BLUE)]
PROMPTS = ["red", "blue", "red", "red"]
HAND_COSINES = [1.0, COS_RED_BLUE, COS_HALF_RED, COS_RED_BLUE]


def test_clipscore_is_w_times_the_positive_cosine(clipscore):
    results = clipscore.score(IMAGES, PROMPTS, [{}] * 4)
    cosines = [r.details["cosine"] for r in results]
    assert cosines == pytest.approx(HAND_COSINES, abs=1e-5)
    # Hessel's prefix is part of the text the model reads.
    own = own_cosines(clipscore.embedder, IMAGES, ["A photo depicts " + p for p in PROMPTS])
    assert cosines == pytest.approx(own.tolist(), abs=1e-5)
    # 2.5 * max(cos, 0): the two mismatches (cos -0.36) score 0, not a negative reward.
    assert [r.reward for r in results] == pytest.approx([2.5, 0.0, 2.5 * COS_HALF_RED, 0.0], abs=1e-5)


def test_pickscore_is_exp_logit_scale_times_the_cosine(pickscore):
    assert float(pickscore.embedder.model.logit_scale.detach().exp()) == pytest.approx(PICK_SCALE)
    results = pickscore.score(IMAGES, PROMPTS, [{}] * 4)
    own = own_cosines(pickscore.embedder, IMAGES, PROMPTS)  # no prefix for PickScore
    assert [r.details["cosine"] for r in results] == pytest.approx(own.tolist(), abs=1e-5)
    # 50 * cos, negative when the colours disagree (no clipping in PickScore).
    assert [r.reward for r in results] == pytest.approx([PICK_SCALE * c for c in HAND_COSINES], abs=1e-4)


@pytest.mark.parametrize("which", ["clipscore", "pickscore"])
def test_the_image_built_for_a_prompt_ranks_first(which, request):
    scorer = request.getfixturevalue(which)
    candidates = [solid(RED), halves(RED, BLUE), solid(GREEN), solid(BLUE)]
    for prompt, order in [
        ("red", [0, 1, 2]),  # red (cos 1) > half red (0.57) > green (-0.36; CLIPScore 0)
        ("blue", [3, 1, 0]),
        ("a photo of something green", [2, 0]),  # words ending in a/o/f/g embed to zero
    ]:
        rewards = [r.reward for r in scorer.score(candidates, [prompt] * 4, [{}] * 4)]
        ranked = [rewards[i] for i in order]
        assert all(a > b for a, b in zip(ranked, ranked[1:])), (prompt, rewards)
        assert max(rewards) == ranked[0]
    # Pairing survives batching and prompt de-duplication: one batch of mixed prompts = one call per item.
    images, prompts = [solid(RED), solid(BLUE), solid(RED), halves(RED, BLUE)], ["red", "red", "blue", "red"]
    batch = [r.reward for r in scorer.score(images, prompts, [{}] * 4)]
    single = [scorer.score([im], [p], [{}])[0].reward for im, p in zip(images, prompts)]
    assert batch == pytest.approx(single, abs=1e-6)


def test_chunks_of_max_batch_and_bfloat16_agree(dirs, clipscore):
    clip = str(dirs[0])
    images = [solid(RED), solid(GREEN), halves(RED, BLUE), solid(BLUE), halves(GREEN, RED)]
    prompts = ["red", "red", "blue", "green", "green"]
    reference = clipscore.embedder.cosines(images, prompts)
    small, _ = ClipEmbedder.from_config(ClipScoreConfig(model=clip, max_batch=2), "clipscore")
    torch.testing.assert_close(small.cosines(images, prompts), reference, atol=1e-6, rtol=0)
    half, _ = ClipEmbedder.from_config(ClipScoreConfig(model=clip, dtype="bfloat16"), "clipscore")
    assert half.model.dtype == torch.bfloat16
    torch.testing.assert_close(half.cosines(images, prompts), reference, atol=0.03, rtol=0)


def test_reward_route_answers_the_in_process_numbers_and_versions(settings, clipscore, pickscore, aesthetic, dirs,
                                                                  aesthetic_head):
    clip, pick, processor = dirs
    assert clipscore.version == f"{clip}#{directory_fingerprint(clip)}"
    processor_part = f"{processor}#{directory_fingerprint(processor, weights=False)}"
    assert pickscore.version == f"{pick}#{directory_fingerprint(pick)} + {processor_part}"
    assert aesthetic.version.startswith(f"{clip}#{directory_fingerprint(clip)} + {aesthetic_head}#")
    body = {"items": [{"image": encode_png(im), "prompt": p} for im, p in zip(IMAGES, PROMPTS)]}
    with serve_in_thread(create_app(settings)) as base, httpx.Client(base_url=base, timeout=60) as http:
        ready = http.get("/readyz").json()
        assert ready["versions"] == {s.name: s.version for s in (clipscore, pickscore, aesthetic)}
        for scorer in (clipscore, pickscore, aesthetic):
            answer = http.post(f"/v1/rewards/{scorer.name}", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["scorer"] == scorer.name and answer.json()["version"] == scorer.version
            expected = scorer.score(IMAGES, PROMPTS, [{}] * 4)
            got = answer.json()["results"]
            assert [r["reward"] for r in got] == pytest.approx([e.reward for e in expected], abs=1e-6)
            assert [r["details"] for r in got] == [pytest.approx(e.details, abs=1e-6) for e in expected]


def test_version_changes_with_the_checkpoint(dirs, tmp_path):
    _, pick, processor = dirs
    shutil.copytree(pick, tmp_path / "copy")
    assert directory_fingerprint(tmp_path / "copy") == directory_fingerprint(pick)  # same bytes, any path
    other = make_tiny_colour_clip(tmp_path / "retrained", math.log(60.0), processor_directory=tmp_path / "proc")
    assert directory_fingerprint(other) != directory_fingerprint(pick)  # only the logit_scale weight differs
    assert directory_fingerprint(tmp_path / "proc", weights=False) == directory_fingerprint(processor, weights=False)


def test_a_hub_id_is_versioned_by_the_commit_it_loaded(dirs, tmp_path, monkeypatch):
    """Offline, from a Hugging Face cache laid out as the hub client writes it (refs/main -> commit)."""
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--colour-clip"
    shutil.copytree(dirs[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    embedder, version = ClipEmbedder.from_config(ClipScoreConfig(model="tiny-org/colour-clip"), "clipscore")
    assert version == f"tiny-org/colour-clip@{commit[:12]}"
    assert float(embedder.cosines([solid(RED)], ["red"])[0]) == pytest.approx(1.0, abs=1e-5)


def test_missing_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no" / "such-clip"
    with pytest.raises(CheckpointNotFoundError) as local:
        ClipEmbedder.from_config(ClipScoreConfig(model=str(missing)), "clipscore")
    message = str(local.value)
    assert "\n" not in message and str(missing) in message and "BLIP3O_RL_REWARDS_CLIPSCORE__MODEL" in message
    # A hub id that is not in the cache, offline (tests run with HF_HUB_OFFLINE=1): no download, one line.
    with pytest.raises(CheckpointNotFoundError) as hub:
        ClipEmbedder.from_config(PickScoreConfig(model="nobody/no-such-pickscore"), "pickscore")
    assert "\n" not in str(hub.value) and "nobody/no-such-pickscore" in str(hub.value)
    assert "HF_HUB_OFFLINE" in str(hub.value)
    # The server command prints it as one line and exits 2, before binding a port.
    monkeypatch.setenv("BLIP3O_RL_REWARDS_PICKSCORE__MODEL", str(missing))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(SystemExit) as exit_:
        serve_from_args(parser.parse_args(["--scorers", "pickscore", "--port", "0"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blip3o-rl: error: cannot load scorers: pickscore.model") and "\n" not in err


def test_aesthetic_is_the_mlp_of_the_unit_image_embedding(aesthetic, dirs):
    """With the hand-set head (fixture `aesthetic_head`): 5 + 4 * cos(image, red); the prompt is ignored."""
    images = [solid(RED), solid(BLUE), halves(RED, BLUE)]
    rewards = [r.reward for r in aesthetic.score(images, ["blue", "red", ""], [{}] * 3)]
    assert rewards == pytest.approx([9.0, 5 + 4 * COS_RED_BLUE, 5 + 4 * COS_HALF_RED], abs=1e-4)
    with pytest.raises(CheckpointNotFoundError) as missing:
        aesthetic_scorer(SimpleNamespace(aesthetic=AestheticConfig(model=str(dirs[0]), head="nobody/no-such-head")))
    assert "\n" not in str(missing.value) and "aesthetic.head 'nobody/no-such-head'" in str(missing.value)
