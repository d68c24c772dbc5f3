"""POST /v1/rewards/{name}: every generic scorer (rewards/scorer.py) behind one route."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rewards.app.deps import SettingsDep, check_item_count, get_generic_scorer
from rewards.app.images import decode_image, decode_source
from rewards.app.schemas import ScoreItemResult, ScoreRequest, ScoreResponse
from rewards.scorer import Condition

router = APIRouter(tags=["rewards"])


@router.post("/v1/rewards/{name}", response_model=ScoreResponse)
async def score_generic(name: str, body: ScoreRequest, request: Request, settings: SettingsDep) -> ScoreResponse:
    """The reward of each image from the scorer `name` (see /readyz for the ones this server runs)."""
    scorer = get_generic_scorer(request, name)
    check_item_count(len(body.items), settings)
    images = [decode_image(item.image, settings.max_image_pixels, i) for i, item in enumerate(body.items)]
    sources = [decode_source(item.source_image, item.mask, settings.max_image_pixels, i) if scorer.reads_sources
               else None for i, item in enumerate(body.items)]  # a scorer that never reads them: not decoded
    conditions = [Condition(item.prompt, item.metadata, source) for item, source in zip(body.items, sources)]
    batcher = request.app.state.batchers[request.url.path]
    results = await batcher.submit(scorer.score_conditions, images, conditions)
    return ScoreResponse(results=[ScoreItemResult(reward=r.reward, details=r.details) for r in results],
                         scorer=scorer.name, version=scorer.version)
