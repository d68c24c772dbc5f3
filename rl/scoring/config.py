"""The run's reward section: where the reward API runs, how it is called, what the run trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.app.settings import Settings as RewardServerSettings
from rl.scoring.reward_mix import RewardMix

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RewardsSection(BaseModel):
    model_config = STRICT

    service: Literal["serve", "url"] = "serve"
    """serve: start the reward app as a Ray Serve application in this cluster; url: use a running one."""
    url: str | None = None
    """Base URL of the reward API (service "url")."""
    token: str | None = None
    """Bearer token the reward API wants (None = open)."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port of Ray Serve (service "serve"; 0 = any free port)."""
    num_cpus: float = Field(1.0, ge=0)
    """Ray CPUs of each Serve replica (service "serve")."""
    num_gpus: float = Field(0.0, ge=0)
    """Ray GPUs of each Serve replica (service "serve"; > 0 when `server.geneval.device` is cuda)."""
    num_replicas: int = Field(1, ge=1)
    """Serve replicas of the reward app (service "serve"); Serve spreads requests over them."""
    server: RewardServerSettings = RewardServerSettings(scorers=["ocr"])
    """The reward app's settings (service "serve")."""
    make_tiny_geneval: bool = False
    """If the GenEval detector / CLIP folders do not exist, build tiny random ones there (CPU demos);
    they must be `<dir>/mask2former` and `<dir>/clip` of one folder."""
    timeout_s: float = Field(120.0, gt=0)
    """Per request."""
    outage_budget_s: float = Field(300.0, gt=0)
    """A request failing with 5xx or a connection error (never 4xx) is retried with backoff for this
    long; past it the run checkpoints and stops with a message (resume with --resume)."""
    backoff_s: float = Field(0.5, ge=0)
    """First retry delay; doubles each retry (at most 10 s)."""
    mix: RewardMix | None = None
    """The rewards the run trains on and their weights (rl/scoring/reward_mix.py); None: the task reward of
    each prompt (OCR or GenEval), as before mixes existed."""

    @model_validator(mode="after")
    def _url_when_needed(self) -> "RewardsSection":
        if self.service == "url" and not self.url:
            raise ValueError("rewards.url is required when rewards.service is 'url'")
        geneval = self.server.geneval
        if self.make_tiny_geneval and (Path(geneval.detector).name, Path(geneval.clip).name, Path(geneval.detector).parent) != (
            "mask2former", "clip", Path(geneval.clip).parent
        ):
            raise ValueError("make_tiny_geneval needs server.geneval.detector = DIR/mask2former and clip = DIR/clip")
        if (self.service == "serve" and "geneval" in self.server.scorers and geneval.device.startswith("cuda")
                and self.num_gpus == 0):
            raise ValueError("rewards.server.geneval.device is cuda but rewards.num_gpus is 0: a Serve replica "
                             "without a GPU cannot load the GenEval models; set rewards.num_gpus (e.g. 1)")
        return self
