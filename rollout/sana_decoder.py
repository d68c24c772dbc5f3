"""BLIP3o-NEXT's decoder path: AR hidden states (current weights) -> connector -> SANA -> DC-AE -> RGB.

Per batch: one no-grad forward of the AR model over prompt + image tokens; the last-layer states
after `<im_start>` (the `<S0>` position and the N image tokens) go through the frozen connector into
SANA's cross-attention; SANA samples with classifier-free guidance for a configured number of
flow-matching Euler steps; the DC-AE turns latents into pixels.

Follows BLIP3o-NEXT's `generate_images` (blip3o_qwen_grpo.py), with these deliberate choices:
- Conditioning positions: `hidden_states[b, im_start + 1:]` there, i.e. `<S0>` + N image tokens;
  our rollout prompt always ends `<im_start><S0>` and is left-padded, so they are the last N+1.
- Null condition: all-zero AR hidden states, passed through the connector (as there), so the
  unconditional branch sees `connector(0)`, not a zero SANA caption.
- Sigmas `linspace(1, 1/steps, steps)` (the scheduler applies its shift), timesteps `sigma * 1000`,
  scaled by the transformer's `timestep_scale` as diffusers' SanaPipeline does (1.0 in SANA1.5).
- The AR forward runs the decoder stack only (`model.get_decoder()`): its last hidden state equals
  the causal LM's `hidden_states[-1]`, without computing logits over the whole vocabulary.
- Initial noise of row r comes from its own generator seeded `seed + r`, drawn on the CPU in
  float32: images do not depend on batch composition or device (BLIP3o-NEXT draws unseeded noise).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from policy.loading import load_ar_model, load_connector, torch_dtype
from policy.logprobs import left_padded_batch
from policy.model_dir import CheckpointNotFoundError, ModelPaths
from policy.vocab import ImageVocab
from rollout.decoder_config import DecoderConfig
from rollout.flow_sde import SdeTrajectory, sde_step, step_log_prob, step_noise


def load_sana_parts(paths: ModelPaths, dtype: torch.dtype, device: str):
    """The frozen SANA transformer, DC-AE and flow-matching scheduler of a model directory."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    if not paths.sana_transformer.is_dir() or not paths.sana_vae.is_dir():
        raise CheckpointNotFoundError(
            f"model directory {paths.root} has no SANA decoder (sana/transformer, sana/vae): "
            "use the glyph decoder for it, or a model directory with a SANA decoder."
        )
    transformer = SanaTransformer2DModel.from_pretrained(paths.sana_transformer, torch_dtype=dtype)
    vae = AutoencoderDC.from_pretrained(paths.sana_vae, torch_dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(paths.sana_scheduler)
    transformer = transformer.to(device).eval().requires_grad_(False)
    vae = vae.to(device).eval().requires_grad_(False)
    return transformer, vae, scheduler


def latents_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (BLIP3o-NEXT's `(x / 2 + 0.5).clamp(0, 1)`)."""
    unit = (pixels.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]


@dataclass(frozen=True)
class SdeDecode:
    """One SDE decode of a batch (`SanaDecoder.decode_sde`)."""

    images: np.ndarray
    """[B, H, W, 3] uint8."""
    hidden_states: torch.Tensor
    """[B, N+1, h] the AR states that conditioned SANA."""
    trajectory: SdeTrajectory
    timesteps: torch.Tensor
    """[T] the transformer's timesteps."""
    timings: dict[str, float]


def null_and_cond_captions(connector, hidden_states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SANA's cross-attention input for the null (all-zero AR states) and the real condition:
    [B, N+1, h] -> [2B, N+1, d], null rows first. Shared by the decoder and the diffusion learner,
    so both score a step with the same ops."""
    null_and_cond = torch.cat([torch.zeros_like(hidden_states), hidden_states])  # [2B, N+1, h]
    return connector(null_and_cond.to(dtype))  # [2B, N+1, d]


def guided_velocity(transformer, timestep_scale: float, latents: torch.Tensor, t: torch.Tensor,
                    captions: torch.Tensor, guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """v_null + w (v_cond - v_null) at timestep t: [B, C, h, w] -> [B, C, h, w] float32.
    `transformer` is the SANA module or any callable wrapping it (the learner's DeepSpeed engine).
    w = 1 is CFG-free sampling and training: the conditional branch alone (half the forwards)."""
    batch_size = latents.shape[0]
    if guidance_scale == 1.0:
        return transformer(
            latents.to(dtype),
            encoder_hidden_states=captions[batch_size:],  # the real condition (null rows first)
            timestep=(t * timestep_scale).expand(batch_size),
            return_dict=False,
        )[0].float()  # [B, C, h, w]
    model_input = torch.cat([latents, latents]).to(dtype)  # [2B, C, h, w]
    velocity = transformer(
        model_input,
        encoder_hidden_states=captions,
        timestep=(t * timestep_scale).expand(2 * batch_size),
        return_dict=False,
    )[0].float()  # [2B, C, h, w]
    v_null, v_cond = velocity.chunk(2)  # [B, C, h, w] each
    return v_null + guidance_scale * (v_cond - v_null)  # [B, C, h, w]


class SanaDecoder:
    """Holds the AR model (inference copy), connector, SANA, DC-AE and scheduler of one model dir."""

    conditions_on_ar_weights = True

    def __init__(self, paths: ModelPaths, vocab: ImageVocab, pad_id: int, config: DecoderConfig):
        self.vocab = vocab
        self.pad_id = pad_id
        self.device = config.device
        self.dtype = torch_dtype(config.dtype)
        self.num_inference_steps = config.num_inference_steps
        self.guidance_scale = config.guidance_scale
        self.ar = load_ar_model(paths, config.dtype, config.device).requires_grad_(False)
        self.connector = load_connector(paths, config.dtype, config.device)
        self.transformer, self.vae, self.scheduler = load_sana_parts(paths, self.dtype, config.device)
        self.image_size = paths.layout().image_size
        self.vae_scale = 2 ** (len(self.vae.config.decoder_block_out_channels) - 1)
        self.vae_micro_batch_size = config.vae_micro_batch_size

    @torch.no_grad()
    def load_ar_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy validated weights in place, cast to the served dtype and device (state_dict tensors
        share storage with the parameters; a tied lm_head is the embedding, updated through it)."""
        state = self.ar.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)

    # -- the three stages ------------------------------------------------------------------------
    @torch.no_grad()
    def ar_hidden_states(self, prompt_ids: list[list[int]], image_tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer states at `<S0>` and the N image positions: -> [B, N+1, h]."""
        for row, prompt in enumerate(prompt_ids):
            if len(prompt) < 2 or prompt[-2:] != [self.vocab.im_start_id, self.vocab.scale_ids[0]]:
                raise ValueError(f"row {row}: a rollout prompt must end with <im_start><S0>")
        input_ids, attention_mask, position_ids = left_padded_batch(prompt_ids, image_tokens, self.pad_id)  # [B, L]
        outputs = self.ar.get_decoder()(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
        )
        n_condition = image_tokens.shape[1] + 1
        return outputs.last_hidden_state[:, -n_condition:, :]  # [B, N+1, h]

    def initial_noise(self, batch_size: int, seed: int) -> torch.Tensor:
        """Row r's noise from a CPU generator seeded seed + r: -> [B, C, h, w] float32 on device."""
        side = self.image_size // self.vae_scale
        shape = (self.transformer.config.in_channels, side, side)
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + r)) for r in range(batch_size)]
        return torch.stack(rows).to(self.device)  # [B, C, h, w]

    def captions(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """SANA's cross-attention input for the null (all-zero AR states) and the real condition:
        [B, N+1, h] -> [2B, N+1, d], null rows first."""
        return null_and_cond_captions(self.connector, hidden_states, self.dtype)  # [2B, N+1, d]

    def schedule(self, steps: int) -> tuple[torch.Tensor, list[float]]:
        """Timesteps [T] and the T+1 sigmas (1 .. 1/T, then 0) of BLIP3o-NEXT's Euler schedule."""
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=self.device)
        return self.scheduler.timesteps, [float(s) for s in self.scheduler.sigmas]

    def guided_velocity(self, latents: torch.Tensor, t: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """v_null + w (v_cond - v_null) at timestep t: [B, C, h, w] -> [B, C, h, w] float32."""
        return guided_velocity(self.transformer, self.transformer.config.timestep_scale, latents, t, captions,
                               self.guidance_scale, self.dtype)

    @torch.no_grad()
    def sample_latents(self, hidden_states: torch.Tensor, seed: int) -> torch.Tensor:
        """Flow-matching Euler sampling with CFG: x <- x + (s' - s) * (v_null + w (v_cond - v_null))."""
        captions = self.captions(hidden_states)  # [2B, N+1, d]
        latents = self.initial_noise(hidden_states.shape[0], seed)  # [B, C, h, w]
        timesteps, _ = self.schedule(self.num_inference_steps)
        for t in timesteps:
            guided = self.guided_velocity(latents, t, captions)  # [B, C, h, w]
            latents = self.scheduler.step(guided, t, latents, return_dict=False)[0]  # [B, C, h, w]
        return latents

    @torch.no_grad()
    def sample_sde(self, hidden_states: torch.Tensor, seed: int, steps: int, noise_level: float,
                   sde_steps: list[int] | None = None) -> SdeTrajectory:
        """Flow-GRPO sampling (rollout/flow_sde.py): the steps in `sde_steps` (all by default) are
        SDE transitions with log-probs, the others Euler ODE steps (MixGRPO's window). Row r's
        noise at step t comes from (seed + r, t) alone, as its initial noise from seed + r."""
        batch_size = hidden_states.shape[0]
        captions = self.captions(hidden_states)  # [2B, N+1, d]
        latents = self.initial_noise(batch_size, seed).float()  # [B, C, h, w]
        timesteps, sigmas = self.schedule(steps)
        sde_steps = list(range(steps)) if sde_steps is None else sorted(sde_steps)
        trajectory, log_probs = [latents], torch.zeros(steps, batch_size)  # [T, B]
        for index, t in enumerate(timesteps):
            velocity = self.guided_velocity(latents, t, captions)  # [B, C, h, w]
            level = noise_level if index in sde_steps else 0.0
            noise = torch.stack([step_noise(seed + r, index, tuple(latents.shape[1:])) for r in range(batch_size)])
            step = sde_step(velocity, latents, sigmas[index], sigmas[index + 1], sigmas[1], level,
                            noise=noise.to(latents.device))
            if level > 0:
                log_probs[index] = step_log_prob(step).cpu()
            latents = step.next_latents  # [B, C, h, w]
            trajectory.append(latents)
        return SdeTrajectory(torch.stack(trajectory).cpu(), log_probs, sigmas, sde_steps, noise_level)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """DC-AE decode: latents / scaling_factor (+ shift_factor if any) -> [B, H, W, 3] uint8, in
        calls of `vae_micro_batch_size` images (all at once by default)."""
        scaled = latents / self.vae.config.scaling_factor  # [B, C, h, w]
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            scaled = scaled + shift
        step = self.vae_micro_batch_size or scaled.shape[0]
        # each part's pixels become uint8 before the next decode: only one part's maps are alive
        parts = [latents_to_uint8(self.vae.decode(part.to(self.dtype), return_dict=False)[0])  # [m, H, W, 3]
                 for part in scaled.split(step)]
        return np.concatenate(parts)  # [B, H, W, 3]

    def decode(self, prompt_ids: list[list[int]], image_tokens: torch.Tensor, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        """All three stages, with the seconds spent in each (for the benchmark and metrics)."""
        start = time.perf_counter()
        hidden_states = self.ar_hidden_states(prompt_ids, image_tokens)  # [B, N+1, h]
        after_ar = time.perf_counter()
        latents = self.sample_latents(hidden_states, seed)  # [B, C, h, w]
        after_diffusion = time.perf_counter()
        images = self.decode_latents(latents)  # [B, H, W, 3]
        end = time.perf_counter()
        timings = {"ar_forward": after_ar - start, "diffusion": after_diffusion - after_ar, "vae_decode": end - after_diffusion}
        return images, timings

    def decode_sde(self, prompt_ids: list[list[int]], image_tokens: torch.Tensor, seed: int, steps: int,
                   noise_level: float, sde_steps: list[int]) -> SdeDecode:
        """`decode` with the SDE sampler: images plus what the diffusion learner needs (the
        condition, the trajectory with its log-probs, the timesteps), and the seconds per stage."""
        start = time.perf_counter()
        hidden_states = self.ar_hidden_states(prompt_ids, image_tokens)  # [B, N+1, h]
        after_ar = time.perf_counter()
        trajectory = self.sample_sde(hidden_states, seed, steps, noise_level, sde_steps)
        timesteps, _ = self.schedule(steps)  # [T], the timesteps sample_sde used
        after_diffusion = time.perf_counter()
        images = self.decode_latents(trajectory.latents[-1].to(self.device))  # [B, H, W, 3]
        end = time.perf_counter()
        timings = {"ar_forward": after_ar - start, "diffusion": after_diffusion - after_ar, "vae_decode": end - after_diffusion}
        return SdeDecode(images, hidden_states, trajectory, timesteps, timings)

    @torch.no_grad()
    def load_transformer_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy validated SANA transformer weights (the diffusion learner's publish) in place, cast
        to the served dtype and device."""
        parameters = dict(self.transformer.named_parameters())
        for name, tensor in weights:
            parameters[name].copy_(tensor)
