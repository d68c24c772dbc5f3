"""The receiving side of weight sync on a plain transformers model (tests/test_learner.py, bench)."""

from __future__ import annotations

import torch

from policy.loading import load_ar_model
from policy.model_dir import resolve_model_dir
from policy.weights import AR_STREAM, VersionedWeights, WeightStream, param_specs


class TransformersReceiver:
    """The smallest correct worker of the `WeightReceiver` contract (rl/weight_sync.py): the same
    `VersionedWeights` checks as the rollout and decoder workers, over a transformers AR model."""

    weight_stream = AR_STREAM

    def __init__(self, model_dir: str, torch_threads: int | None = None):
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model = load_ar_model(resolve_model_dir(model_dir))
        # the model's own state dict; a tied lm_head is the embedding (updated through it), as in
        # the rollout and decoder workers' contract
        tied = bool(self.model.config.tie_word_embeddings)
        specs = param_specs(self.model.state_dict())
        self.weights = VersionedWeights({k: v for k, v in specs.items() if not (tied and k == "lm_head.weight")}, tied)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor] | WeightStream) -> int:
        return self.weights.update(version, weights, self._load)

    @torch.no_grad()
    def _load(self, weights) -> None:
        state = self.model.state_dict()  # shares storage with the parameters
        for name, tensor in weights:
            state[name].copy_(tensor)  # copies out of the receive buffer

    def served_version(self) -> int:
        return self.weights.version

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}
