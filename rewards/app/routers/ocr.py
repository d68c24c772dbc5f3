"""POST /v1/rewards/ocr."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from rewards.app.deps import BatcherDep, OcrScorerLike, SettingsDep, check_item_count, get_ocr_scorer
from rewards.app.images import decode_image
from rewards.app.schemas import OcrDetails, OcrItemResult, OcrRequest, OcrResponse, RegionBody
from rewards.errors import RewardInputError
from rewards.ocr import extract_target, normalise

router = APIRouter(tags=["rewards"])


@router.post("/v1/rewards/ocr", response_model=OcrResponse)
async def score_ocr(
    body: OcrRequest,
    settings: SettingsDep,
    batcher: BatcherDep,
    scorer: Annotated[OcrScorerLike, Depends(get_ocr_scorer)],
) -> OcrResponse:
    """Flow-GRPO OCR reward of each image for the quoted text of its prompt (or its target)."""
    check_item_count(len(body.items), settings)
    images, targets = [], []
    for index, item in enumerate(body.items):  # validate everything before queueing anything
        try:
            target = item.target if item.target is not None else extract_target(item.prompt or "")
            if not normalise(target):
                raise RewardInputError("target text is empty (after removing spaces)", code="empty_target")
        except RewardInputError as error:
            raise error.at(index) from None
        targets.append(target)
        images.append(decode_image(item.image, settings.max_image_pixels, index))
    results = await batcher.submit(scorer.score, images, targets)
    return OcrResponse(results=[OcrItemResult(reward=r.reward, recognized=r.recognized, target=r.target,
                                              details=OcrDetails(regions=regions_of(r)))
                                for r in results],
                       version=getattr(scorer, "version", ""))


def regions_of(result) -> list[RegionBody]:
    """A scorer result's regions (a stub scorer may have none)."""
    return [RegionBody(box=r.box, reward=r.reward) for r in getattr(result, "regions", ())]
