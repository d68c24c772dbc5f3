"""Request and response bodies of the reward API (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.geneval_rules import GenevalMetadata, GenevalResult

Base64Image = Annotated[str, Field(description="base64 PNG or JPEG (a data: URL is accepted too)")]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="machine-readable code, e.g. bad_base64, missing_quotes")
    message: str = Field(description="what is wrong, for a human")
    item: int | None = Field(None, description="index of the offending item, when there is one")


class OcrItem(BaseModel):
    """One image and the text it should show: a prompt with a quoted target, or the target itself."""

    model_config = ConfigDict(extra="forbid")

    image: Base64Image
    prompt: str | None = Field(None, description='caption with the target in double quotes: a sign "OPEN"')
    target: str | None = Field(None, description="the target text itself (instead of a prompt)")

    @model_validator(mode="after")
    def _one_source(self) -> "OcrItem":
        if (self.prompt is None) == (self.target is None):
            raise ValueError("give exactly one of 'prompt' or 'target'")
        return self


class OcrRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[OcrItem], Field(min_length=1)]


class RegionBody(BaseModel):
    """A part of the image and its reward (spatial credit; rewards/scorer.py)."""

    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 as fractions of the image's width and height")
    reward: float = Field(description="the region's reward, on the scorer's scale (higher is better)")


class OcrDetails(BaseModel):
    regions: list[RegionBody] = Field(default_factory=list, description=(
        "one per recognised character (1 = aligned to an equal target character, else 0) and one of "
        "reward 0 where each missing target character should be"))


class OcrItemResult(BaseModel):
    reward: float = Field(description="Flow-GRPO OCR reward in [0, 1]")
    recognized: str = Field(description="the recognised lines, concatenated")
    target: str = Field(description="the target text the reward was computed against")
    details: OcrDetails = Field(default_factory=OcrDetails)


class OcrResponse(BaseModel):
    results: list[OcrItemResult]
    version: str = Field("", description="the OCR models behind the numbers (as on /readyz)")


class GenevalItem(BaseModel):
    """One image and one line of GenEval metadata."""

    model_config = ConfigDict(extra="forbid")

    image: Base64Image
    metadata: GenevalMetadata


class GenevalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[GenevalItem], Field(min_length=1)]


class DetectedObject(BaseModel):
    label: str
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in pixels")
    score: float


class ClauseOutcome(BaseModel):
    """How one include clause was judged."""

    cls: str = Field(alias="class")
    count: int
    found: int = Field(description="objects of the class kept (score threshold, at most 16)")
    ok: bool
    colors: list[str] | None = Field(None, description="CLIP colour of each of the top `count` objects")
    relations: list[list[str]] | None = Field(None, description="relations of each (object, target) pair checked")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class GenevalDetails(BaseModel):
    objects: list[DetectedObject]
    include: list[ClauseOutcome]
    exclude_violated: list[int] = Field(description="indices of exclude clauses that held")
    terms: list[float] = Field(description="terms of the graded reward (their mean)")
    regions: list[RegionBody] = Field(default_factory=list, description=(
        "one per counted object (box as image fractions): 1 if it does what the prompt asks, else 0"))


class GenevalItemResult(BaseModel):
    reward: float = Field(description="graded reward (Flow-GRPO formula; can be negative when over-counting)")
    correct: bool = Field(description="strict GenEval correctness (official rules)")
    tag: str
    details: GenevalDetails

    @classmethod
    def of(cls, result: GenevalResult) -> "GenevalItemResult":
        objects = [
            DetectedObject(label=d.label, box=d.box, score=d.score) for found in result.objects.values() for d in found
        ]
        clauses = [
            ClauseOutcome(cls=r.cls, count=r.count, found=r.found, ok=r.ok, colors=r.colors, relations=r.relations)
            for r in result.include
        ]
        details = GenevalDetails(
            objects=objects, include=clauses, exclude_violated=result.exclude_violated, terms=result.terms,
            regions=[RegionBody(box=r.box, reward=r.reward) for r in result.regions],
        )
        return cls(reward=result.reward, correct=result.correct, tag=result.tag, details=details)


class GenevalResponse(BaseModel):
    results: list[GenevalItemResult]
    version: str = Field("", description="the detector and CLIP checkpoints behind the numbers (as on /readyz)")


class Health(BaseModel):
    status: str
    scorers: list[str] = []


class Limits(BaseModel):
    """What one request may hold: a client splits bigger work into requests that fit."""

    max_items: int = Field(description="most items in one request")
    max_body_bytes: int = Field(description="largest request body, in bytes")
    max_image_pixels: int = Field(description="largest image (width * height)")


class Readiness(Health):
    """/readyz: whether the scorers are loaded, which ones (with the version of each: the model and
    revision behind its numbers), and the request limits."""

    limits: Limits
    versions: dict[str, str] = Field(default_factory=dict, description="scorer name -> version")


class ScoreItem(BaseModel):
    """One image for a generic scorer (rewards/scorer.py): the prompt and metadata are passed to the
    scorer as they are; which ones it reads is up to the scorer."""

    model_config = ConfigDict(extra="forbid")

    image: Base64Image
    prompt: str = Field("", description="the caption the image was generated from")
    metadata: dict[str, Any] = Field(default_factory=dict, description="anything else the scorer reads")
    source_image: Base64Image | None = Field(
        None, description="edits: the image that was edited (same encoding as `image`); read by the scorers "
                          "that compare with it (consistency, edit_ocr, edit_color), ignored by the others")
    mask: Base64Image | None = Field(
        None, description="edits: the region the edit was asked for, white = edit (a pixel whose mean of R, G, B "
                          "is >= 128), the size of `source_image`")

    @model_validator(mode="after")
    def _mask_needs_source(self) -> "ScoreItem":
        if self.mask is not None and self.source_image is None:
            raise ValueError("a mask goes with a source_image")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[ScoreItem], Field(min_length=1)]


class ScoreItemResult(BaseModel):
    reward: float
    details: dict[str, Any] = Field(default_factory=dict, description=(
        "the scorer's breakdown (scorer-specific); optional `regions`: [{box: [x0, y0, x1, y1] as image "
        "fractions, reward}] say where the image is right or wrong (spatial credit)"))


class ScoreResponse(BaseModel):
    """Results in item order, and which scorer (model and revision) produced them."""

    results: list[ScoreItemResult]
    scorer: str
    version: str
