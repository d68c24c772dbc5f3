"""The decoder worker (a Ray actor): rollout batches in, images out, with the current AR weights.

One worker owns one decoder, chosen once from config at setup: `SanaDecoder` (BLIP3o-NEXT's path)
or `GlyphTokenDecoder` (CPU demos). Both serve the same version contract as the AR rollout workers:
`update_weights(version, weights)` validates the whole update against the served AR parameters
before touching anything, refuses a bad or stale update with `WeightUpdateError` (the old version
keeps serving) and returns the version served afterwards.

A batch is rendered only by the weights its tokens were sampled with: the hidden states that
condition SANA come from the served AR weights, so tokens of version v decoded after a publish of
v+1 would be images of neither policy. Such a batch is refused at once (`DecoderVersionError`,
before any work) and the driver samples the chunk again (rl/pipeline.py).

    driver --decode.remote(batch, seed)--> DiffusionDecoderActor --> DecodedImages (row for row)
    pipeline --decode_split.remote(batch, seed)--> (DecodeInfo -> driver, images -> scoring task)
    learner --update_weights.remote(v, weights)--> DiffusionDecoderActor --> v
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import ray
import torch

from policy.loading import load_tokenizer, load_vocab, torch_dtype
from policy.model_dir import ModelPaths, resolve_model_dir
from policy.vocab import ImageVocab
from policy.weights import VersionedWeights
from rollout.decoder_config import DecoderConfig
from rollout.records import DecodedImages, RolloutBatch


class DecoderVersionError(RuntimeError):
    """The batch's tokens were sampled with another version than the one this decoder serves."""

    def __init__(self, served: int, sampled: int):
        super().__init__(served, sampled)  # the args rebuild it when Ray pickles it to the driver
        self.served, self.sampled = served, sampled

    def __str__(self) -> str:
        return f"decoder serves v{self.served}, the tokens were sampled at v{self.sampled}"


@dataclass(frozen=True)
class DecodeInfo:
    """What the driver reads of a decode (`decode_split`); the images stay in the object store."""

    rows: int
    policy_version: int
    timings: dict[str, float]


class TokenDecoder(Protocol):
    """What the worker needs from a decoder kind."""

    vocab: ImageVocab
    conditions_on_ar_weights: bool
    """Whether its images depend on the AR weights (SANA: the hidden states; glyph: no)."""

    def load_ar_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...

    def decode(self, prompt_ids: list[list[int]], image_tokens: torch.Tensor, seed: int) -> tuple[np.ndarray, dict[str, float]]: ...


def build_decoder(config: DecoderConfig, paths: ModelPaths) -> TokenDecoder:
    """The decoder object for `config.kind` (or the kind recorded in the model directory)."""
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    kind = config.kind or paths.layout().decoder
    if kind == "sana":
        from rollout.sana_decoder import SanaDecoder

        return SanaDecoder(paths, vocab, tokenizer.pad_token_id, config)
    if kind == "glyph":
        from rollout.glyph import GlyphTokenDecoder

        return GlyphTokenDecoder(vocab, config.glyph)
    raise ValueError(f"unknown decoder kind '{kind}' in {paths.root}; expected 'sana' or 'glyph'")


def decoded_image_shape(config: DecoderConfig) -> tuple[int, int]:
    """(height, width) of the images this decoder config makes, read from the model directory's
    layout without loading any model (the run checks them against the reward service's limits)."""
    layout = resolve_model_dir(config.model).layout()
    if (config.kind or layout.decoder) == "glyph":
        return config.glyph.height, layout.tokens_per_image * config.glyph.tile_width
    return layout.image_size, layout.image_size


class DiffusionDecoderWorker:
    """Decodes rollout batches with the AR weights of the version it serves (initially 0)."""

    def __init__(self, config: DecoderConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.paths = resolve_model_dir(config.model)
        self.decoder = build_decoder(config, self.paths)
        # the same contract as the AR rollout workers: names and shapes of the served checkpoint
        self._weights = VersionedWeights.from_checkpoint(self.paths.ar, torch_dtype(config.dtype))

    def served_version(self) -> int:
        return self._weights.version

    def decode(self, batch: RolloutBatch, seed: int) -> DecodedImages:
        """Images for every row of `batch`; row r's sampling noise is seeded with seed + r.
        Raises DecoderVersionError unless this worker serves `batch.policy_version` (for a decoder
        whose images depend on the AR weights: the glyph decoder's do not)."""
        served = self._weights.version
        if self.decoder.conditions_on_ar_weights and batch.policy_version != served:
            raise DecoderVersionError(served, batch.policy_version)
        if not self.decoder.conditions_on_ar_weights:
            served = batch.policy_version  # the images are the tokens' own, whatever weights it holds
        vocab = self.decoder.vocab
        tokens = batch.image_tokens  # [B*G, N]
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != vocab.tokens_per_image:
            raise ValueError(f"image_tokens must be [rows > 0, {vocab.tokens_per_image}], got {tuple(tokens.shape)}")
        if len(batch.prompt_ids) != tokens.shape[0]:
            raise ValueError(f"batch has {len(batch.prompt_ids)} prompts for {tokens.shape[0]} token rows")
        if not bool(vocab.is_image_token(tokens).all()):
            raise ValueError("image_tokens holds ids outside the image-token range (pass vocabulary ids, not codes)")
        start = time.perf_counter()
        rows = tokens.shape[0]
        step = self.config.micro_batch_size or rows
        parts, timings = [], {}
        for first in range(0, rows, step):  # row r keeps its seed, seed + r, in any micro-batch
            images, part_timings = self.decoder.decode(batch.prompt_ids[first:first + step],
                                                       tokens[first:first + step], seed + first)  # [m, H, W, 3]
            parts.append(images)
            for name, seconds in part_timings.items():
                timings[name] = timings.get(name, 0.0) + seconds
        timings["decode_total"] = time.perf_counter() - start
        return DecodedImages(images=np.concatenate(parts), policy_version=served, timings=timings)  # [B*G, H, W, 3]

    @ray.method(num_returns=2)
    def decode_split(self, batch: RolloutBatch, seed: int) -> tuple[DecodeInfo, np.ndarray]:
        """`decode` as two Ray objects: the small `DecodeInfo` the driver reads, and the images
        [B*G, H, W, 3], which only the scoring task reads (they never travel to the driver).
        An error raises from both."""
        decoded = self.decode(batch, seed)
        return DecodeInfo(len(decoded.images), decoded.policy_version, decoded.timings), decoded.images

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load full AR weights `{hf_name: tensor}` as `version`; refuse (and keep serving) if bad
        (`VersionedWeights`: the same checks as the AR rollout workers)."""
        return self._weights.update(version, weights, self.decoder.load_ar_weights)


# The same class as a Ray actor (one decoder per actor process).
DiffusionDecoderActor = ray.remote(DiffusionDecoderWorker)


def decoder_actor(config: DecoderConfig, max_restarts: int = 0, resources: dict[str, float] | None = None):
    """Start a `DiffusionDecoderActor` with the resources from `config` (Ray must be initialised),
    plus custom `resources` (the decoder role's, rl/placement.py). With `max_restarts`, Ray
    restarts a dead one (serving the weights on disk, version 0)."""
    return DiffusionDecoderActor.options(num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                         resources=resources or {}, max_restarts=max_restarts,
                                         max_task_retries=0).remote(config)
