"""The decoder worker (a Ray actor): rollout batches in, images out, with the current AR weights.

One worker owns one decoder, chosen once from config at setup: `SanaDecoder` (BLIP3o-NEXT's path)
or `GlyphTokenDecoder` (CPU demos). Both serve the same version contract as the AR rollout workers:
`update_weights(version, weights)` validates the whole update against the served AR parameters
before touching anything, refuses a bad or stale update with `WeightUpdateError` (the old version
keeps serving) and returns the version served afterwards.

A batch is rendered only by the weights its tokens were sampled with: the hidden states that
condition SANA come from the served AR weights, so tokens of version v decoded after a publish of
v+1 would be images of neither policy. Such a batch is refused at once (`DecoderVersionError`,
before any work) and the driver samples the chunk again (rl/run/pipeline.py).

    driver --decode.remote(batch, seed)--> DiffusionDecoderActor --> DecodedImages (row for row)
    pipeline --decode_split.remote(batch, seed)--> (DecodeInfo -> driver, images -> scoring task)
    learner --update_weights.remote(v, weights)--> DiffusionDecoderActor --> v

For Flow-GRPO on the decoder (SANA only), a second, independently versioned stream:

    driver --decode_sde.remote(batch, seed, sampling)--> (DecodedImages, DiffusionRollout)
    diffusion learner --update_decoder_weights(v, transformer weights)--> v (rollout/decoder_weights.py)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import ray
import torch

from policy.loading import load_tokenizer, load_vocab, torch_dtype
from policy.lora import UnmergedAdapter, adapter_specs
from policy.model_dir import ModelPaths, resolve_model_dir
from policy.vocab import ImageVocab
from policy.weights import AR_STREAM, TRANSFORMER_STREAM, VersionedWeights, WeightStream
from rollout.decoder_config import DecoderConfig
from rollout.decoder_weights import transformer_stream
from rollout.diffusion_rollout import DiffusionRollout, SdeSampling
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
    decoder_version: int = 0
    """SANA transformer version that rendered the images (0 = the weights on disk)."""


class TokenDecoder(Protocol):
    """What the worker needs from a decoder kind."""

    vocab: ImageVocab
    conditions_on_ar_weights: bool
    """Whether its images depend on the AR weights (SANA: the hidden states; glyph: no)."""

    def load_ar_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

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

    weight_stream = AR_STREAM
    """`update_weights` loads the AR policy; the transformer stream is rollout/decoder_weights.py's
    TransformerReceiver (rl/weight_sync.py: one broadcast group per stream)."""

    def __init__(self, config: DecoderConfig):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.paths = resolve_model_dir(config.model)
        self.decoder = build_decoder(config, self.paths)
        # the same contract as the AR rollout workers: names and shapes of the served checkpoint, or
        # under LoRA of the adapter, served beside the AR copy's base weights, never merged into them
        # (policy/lora.py: a bfloat16 merge rounds most of a small update away); the glyph decoder
        # does not depend on the AR weights: it reads an update and drops it
        dtype = torch_dtype(config.dtype)
        if config.lora is None:
            self._weights = VersionedWeights.from_checkpoint(self.paths.ar, dtype)
        else:
            self._weights = VersionedWeights(adapter_specs(self.paths.ar, config.lora, dtype))
        self._adapters: dict[str, UnmergedAdapter] = {}
        """By weight stream: the LoRA adapters served beside the base weights."""
        self._load_ar = self.decoder.load_ar_weights
        if config.lora is not None and self.decoder.conditions_on_ar_weights:
            self._adapters[AR_STREAM] = UnmergedAdapter(self._sana().ar, self._weights.specs, config.lora)
            self._load_ar = self._adapters[AR_STREAM].load
        # the second stream: SANA's transformer, trained by the diffusion learner (sana decoder only);
        # under transformer_lora its updates are adapters, likewise served beside the base
        self._transformer_weights = None
        if getattr(self.decoder, "transformer", None) is not None:
            sana = self._sana()
            self._transformer_weights, adapter = transformer_stream(sana.transformer, config.transformer_lora)
            self._load_transformer = sana.load_transformer_weights
            if adapter is not None:
                self._adapters[TRANSFORMER_STREAM], self._load_transformer = adapter, adapter.load

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
        tokens = self._checked_tokens(batch)  # [B*G, N]
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

    def _checked_tokens(self, batch: RolloutBatch) -> torch.Tensor:
        """The batch's image tokens [B*G, N] after the shape and range checks (ValueError); refused
        too (WeightUpdateError) while a failed streamed update left this decoder half-updated."""
        self._weights.require_serviceable()
        if self._transformer_weights is not None:
            self._transformer_weights.require_serviceable()
        vocab = self.decoder.vocab
        tokens = batch.image_tokens  # [B*G, N]
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != vocab.tokens_per_image:
            raise ValueError(f"image_tokens must be [rows > 0, {vocab.tokens_per_image}], got {tuple(tokens.shape)}")
        if len(batch.prompt_ids) != tokens.shape[0]:
            raise ValueError(f"batch has {len(batch.prompt_ids)} prompts for {tokens.shape[0]} token rows")
        if not bool(vocab.is_image_token(tokens).all()):
            raise ValueError("image_tokens holds ids outside the image-token range (pass vocabulary ids, not codes)")
        return tokens

    def _sana(self):
        """The SANA decoder; the SDE sampler and the transformer weights exist only there."""
        from rollout.sana_decoder import SanaDecoder

        if not isinstance(self.decoder, SanaDecoder):
            raise TypeError(f"the SDE sampler and transformer weights need the sana decoder, this worker runs "
                            f"{type(self.decoder).__name__}")
        return self.decoder

    def decode_sde(self, batch: RolloutBatch, seed: int, sampling: SdeSampling) -> tuple[DecodedImages, DiffusionRollout]:
        """Flow-GRPO sampling for the diffusion learner: the images (for the rewards) and, row for
        row, what the learner needs to recompute every SDE step's log-prob exactly. Row r's initial
        and step noises come from seed + r (any micro-batching gives the same rows). The same
        version rule as `decode` (DecoderVersionError); the rollout records both versions."""
        decoder = self._sana()
        served = self._weights.version
        if batch.policy_version != served:
            raise DecoderVersionError(served, batch.policy_version)
        tokens = self._checked_tokens(batch)  # [B*G, N]
        start = time.perf_counter()
        rows, sde_steps = tokens.shape[0], sampling.sde_steps()
        step = self.config.micro_batch_size or rows
        images, parts = [], []
        for first in range(0, rows, step):
            out = decoder.decode_sde(batch.prompt_ids[first:first + step], tokens[first:first + step], seed + first,
                                     sampling.steps, sampling.noise_level, sde_steps)
            images.append(out.images)  # [m, H, W, 3]
            part = DiffusionRollout.from_trajectory(
                out.trajectory, out.hidden_states, out.timesteps, decoder.guidance_scale,
                batch.group_index[first:first + step], seed + first, served, self._transformer_weights.version)
            part.timings = out.timings
            parts.append(part)
        rollout = DiffusionRollout.concat(parts)
        rollout.seed = seed
        rollout.timings["decode_total"] = time.perf_counter() - start
        return DecodedImages(np.concatenate(images), served, dict(rollout.timings)), rollout

    def update_decoder_weights(self, version: int, weights: dict[str, torch.Tensor] | WeightStream) -> int:
        """Load SANA transformer weights `{parameter name: tensor}` (the diffusion learner's; under
        `transformer_lora` its adapter, served beside the base) as `version`; refuse whole, keeping the
        old version serving, if anything is off."""
        self._sana()
        return self._transformer_weights.update(version, weights, self._load_transformer)

    def served_adapter(self, stream: str) -> dict[str, torch.Tensor]:
        """The LoRA adapter `stream` (AR_STREAM, TRANSFORMER_STREAM) serves beside its base weights, in
        PEFT names (empty at version 0); KeyError if that stream's updates are not adapters."""
        return self._adapters[stream].served()

    def served_decoder_version(self) -> int:
        """Version of the SANA transformer served (0 = the weights on disk)."""
        self._sana()
        return self._transformer_weights.version

    @ray.method(num_returns=2)
    def decode_split(self, batch: RolloutBatch, seed: int) -> tuple[DecodeInfo, np.ndarray]:
        """`decode` as two Ray objects: the small `DecodeInfo` the driver reads, and the images
        [B*G, H, W, 3], which only the scoring task reads (they never travel to the driver).
        An error raises from both."""
        decoded = self.decode(batch, seed)
        transformer = self._transformer_weights.version if self._transformer_weights is not None else 0
        return DecodeInfo(len(decoded.images), decoded.policy_version, decoded.timings, transformer), decoded.images

    @ray.method(num_returns=3)
    def decode_sde_split(self, batch: RolloutBatch, seed: int,
                         sampling: SdeSampling) -> tuple[DecodeInfo, np.ndarray, DiffusionRollout]:
        """`decode_sde` as three Ray objects: the small `DecodeInfo` the driver reads, the images
        (read by the scoring task) and the `DiffusionRollout` (read by the diffusion learner); neither
        of the two large ones travels to the driver. An error raises from all three."""
        decoded, rollout = self.decode_sde(batch, seed, sampling)
        info = DecodeInfo(len(decoded.images), decoded.policy_version, decoded.timings, rollout.decoder_version)
        return info, decoded.images, rollout

    def update_weights(self, version: int, weights: dict[str, torch.Tensor] | WeightStream) -> int:
        """Load full AR weights `{hf_name: tensor}` or a `WeightStream` of them (or under LoRA an
        adapter, served beside the base) as `version`; refuse (and keep serving) if bad
        (`VersionedWeights`: the same checks as the AR rollout workers)."""
        return self._weights.update(version, weights, self._load_ar)


# The same class as a Ray actor (one decoder per actor process).
DiffusionDecoderActor = ray.remote(DiffusionDecoderWorker)


def decoder_actor(config: DecoderConfig, max_restarts: int = 0, resources: dict[str, float] | None = None):
    """Start a `DiffusionDecoderActor` with the resources from `config` (Ray must be initialised),
    plus custom `resources` (the decoder role's, rl/run/placement.py). With `max_restarts`, Ray
    restarts a dead one (serving the weights on disk, version 0)."""
    return DiffusionDecoderActor.options(num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                         resources=resources or {}, max_restarts=max_restarts,
                                         max_task_retries=0).remote(config)
