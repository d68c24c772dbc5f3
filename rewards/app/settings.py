"""Server settings: flags of `blip3o-rl rewards serve`, or `BLIP3O_RL_REWARDS_*` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rewards.aesthetic import AestheticConfig
from rewards.clip_score import ClipScoreConfig, PickScoreConfig
from rewards.consistency import ConsistencyConfig
from rewards.edit_checks import EditCheckConfig
from rewards.geneval import GenevalConfig
from rewards.ocr import OcrConfig
from rewards.scorer import BUILTIN_SCORERS


class Settings(BaseSettings):
    """Everything the reward server is built from; read once at startup."""

    model_config = SettingsConfigDict(
        env_prefix="BLIP3O_RL_REWARDS_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port (0 = any free port)."""
    scorers: list[str] = ["ocr", "geneval"]
    """Scorers to load at startup: ocr, geneval, or a generic one (rewards/scorer.py BUILTIN_SCORERS);
    a request for another one answers 404 `scorer_not_loaded`."""
    token: SecretStr | None = None
    """Bearer token required on /v1 endpoints (none = open)."""
    max_items: int = Field(64, ge=1)
    """Most items in one request."""
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body accepted."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest decoded image (width * height); bigger ones are refused before decoding."""
    batch_size: int = Field(16, ge=1)
    """Most items per model call; concurrent requests are grouped up to this."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long the first queued item waits for others to join its batch."""
    python_scorers: dict[str, str] = {}
    """User scorers to load at startup: name -> "module:function", a function of (images, prompts,
    metadatas) answering one reward per image (rewards/scorer.py FunctionScorer), served at
    /v1/rewards/{name} like the built-in generic scorers."""
    ocr: OcrConfig = OcrConfig()
    """OCR scorer."""
    geneval: GenevalConfig = GenevalConfig()
    """GenEval scorer."""
    clipscore: ClipScoreConfig = ClipScoreConfig()
    """CLIPScore scorer (rewards/clip_score.py)."""
    pickscore: PickScoreConfig = PickScoreConfig()
    """PickScore scorer (rewards/clip_score.py)."""
    aesthetic: AestheticConfig = AestheticConfig()
    """LAION aesthetic predictor (rewards/aesthetic.py)."""
    consistency: ConsistencyConfig = ConsistencyConfig()
    """Edit consistency scorer: background metrics outside the mask, CLIP-I without one (rewards/consistency.py)."""
    edit: EditCheckConfig = EditCheckConfig()
    """Edit checks (edit_ocr, edit_color): the copy guard (rewards/edit_checks.py); edit_ocr reads with the `ocr` models."""

    @field_validator("scorers")
    @classmethod
    def _known_scorers(cls, names: list[str]) -> list[str]:
        known = ["ocr", "geneval", *BUILTIN_SCORERS]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown scorers {unknown}; known: {known}")
        return names

    @field_validator("python_scorers")
    @classmethod
    def _python_scorer_names(cls, specs: dict[str, str]) -> dict[str, str]:
        """A user scorer may not shadow a built-in one; its spec must at least look like module:function
        (it is imported when the scorers load)."""
        for name, spec in specs.items():
            if name in ("ocr", "geneval", *BUILTIN_SCORERS) or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"python scorer name '{name}' is taken by a built-in scorer or is not [A-Za-z0-9_-]+")
            module, _, function = spec.partition(":")
            if not module or not function:
                raise ValueError(f"python scorer {name}: '{spec}' is not 'module:function'")
        return specs
