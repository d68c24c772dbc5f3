"""The decoder worker (a Ray actor): rollout batches in, images out, with the current AR weights.

One worker owns one decoder, chosen once from config at setup: `SanaDecoder` (BLIP3o-NEXT's path)
or `GlyphTokenDecoder` (CPU demos). Both serve the same version contract as the AR rollout workers:
`update_weights(version, weights)` validates the whole update against the served AR parameters
before touching anything, refuses a bad or stale update with `WeightUpdateError` (the old version
keeps serving) and returns the version served afterwards.

    driver --decode.remote(batch, seed)--> DiffusionDecoderActor --> DecodedImages (row for row)
    learner --update_weights.remote(v, weights)--> DiffusionDecoderActor --> v
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import ray
import torch

from policy.loading import load_tokenizer, load_vocab, torch_dtype
from policy.model_dir import ModelPaths, resolve_model_dir
from policy.vocab import ImageVocab
from policy.weights import WeightUpdateError, served_param_specs, tied_embeddings, validate_weights
from rollout.decoder_config import DecoderConfig
from rollout.records import DecodedImages, RolloutBatch


class TokenDecoder(Protocol):
    """What the worker needs from a decoder kind."""

    vocab: ImageVocab

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


class DiffusionDecoderWorker:
    """Decodes rollout batches with the AR weights of the version it serves (initially 0)."""

    def __init__(self, config: DecoderConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.paths = resolve_model_dir(config.model)
        self.decoder = build_decoder(config, self.paths)
        # the same checks as the AR rollout workers: names and shapes of the served checkpoint
        self._specs = served_param_specs(self.paths.ar, torch_dtype(config.dtype))
        self._tied = tied_embeddings(self.paths.ar)
        self._version = 0

    def served_version(self) -> int:
        return self._version

    def decode(self, batch: RolloutBatch, seed: int) -> DecodedImages:
        """Images for every row of `batch`; row r's sampling noise is seeded with seed + r."""
        vocab = self.decoder.vocab
        tokens = batch.image_tokens  # [B*G, N]
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != vocab.tokens_per_image:
            raise ValueError(f"image_tokens must be [rows > 0, {vocab.tokens_per_image}], got {tuple(tokens.shape)}")
        if len(batch.prompt_ids) != tokens.shape[0]:
            raise ValueError(f"batch has {len(batch.prompt_ids)} prompts for {tokens.shape[0]} token rows")
        if not bool(vocab.is_image_token(tokens).all()):
            raise ValueError("image_tokens holds ids outside the image-token range (pass vocabulary ids, not codes)")
        start = time.perf_counter()
        images, timings = self.decoder.decode(batch.prompt_ids, batch.image_tokens, seed)  # [B*G, H, W, 3]
        timings["decode_total"] = time.perf_counter() - start
        return DecodedImages(images=images, policy_version=self._version, timings=timings)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load full AR weights `{hf_name: tensor}` as `version`; refuse (and keep serving) if bad."""
        if not isinstance(version, int) or version < 0:
            raise WeightUpdateError(f"weight update refused: version must be a non-negative int, got {version!r}")
        if version < self._version:
            raise WeightUpdateError(f"weight update refused: version {version} is older than the served {self._version}")
        if self._tied:  # a tied lm_head is the embedding (not in the checkpoint), as in the AR worker
            weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
        validate_weights(self._specs, weights, allow_cast=True)
        self.decoder.load_ar_weights(weights)
        self._version = version
        return self._version


# The same class as a Ray actor (one decoder per actor process).
DiffusionDecoderActor = ray.remote(DiffusionDecoderWorker)


def decoder_actor(config: DecoderConfig, max_restarts: int = 0):
    """Start a `DiffusionDecoderActor` with the resources from `config` (Ray must be initialised).
    With `max_restarts`, Ray restarts a dead one (serving the weights on disk, version 0)."""
    return DiffusionDecoderActor.options(num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                         max_restarts=max_restarts, max_task_retries=0).remote(config)
