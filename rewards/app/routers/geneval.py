"""POST /v1/rewards/geneval."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from rewards.app.deps import BatcherDep, GenevalScorerLike, SettingsDep, check_item_count, get_geneval_scorer
from rewards.app.images import decode_image
from rewards.app.schemas import GenevalItemResult, GenevalRequest, GenevalResponse

router = APIRouter(tags=["rewards"])


@router.post("/v1/rewards/geneval", response_model=GenevalResponse)
async def score_geneval(
    body: GenevalRequest,
    settings: SettingsDep,
    batcher: BatcherDep,
    scorer: Annotated[GenevalScorerLike, Depends(get_geneval_scorer)],
) -> GenevalResponse:
    """GenEval correctness (official rules) and graded reward (Flow-GRPO) of each image."""
    check_item_count(len(body.items), settings)
    images = [decode_image(item.image, settings.max_image_pixels, i) for i, item in enumerate(body.items)]
    results = await batcher.submit(scorer.score, images, [item.metadata for item in body.items])
    return GenevalResponse(results=[GenevalItemResult.of(r) for r in results], version=getattr(scorer, "version", ""))
