"""The SANA transformer's weights on a decoder worker, as a second versioned weight stream.

A decoder worker serves two policies with two versions: the AR weights (whose hidden states
condition SANA; `update_weights` / `served_version`) and, when the diffusion learner trains the
decoder, SANA's transformer (`update_decoder_weights` / `served_decoder_version`). Both go through
`policy.weights.VersionedWeights`: every name, shape, dtype and value is checked before a tensor
is copied, and a refused update leaves the old version serving.
With `DecoderConfig.transformer_lora` the transformer stream carries the diffusion learner's LoRA
adapter only (kilobytes to megabytes): validated the same way, then served beside the frozen base
weights (`policy.lora.UnmergedAdapter`: s B (A x) added to each adapted layer's output, as the
learner's peft layers compute it), never merged into them (a bfloat16 merge rounds most of a small
update away; policy/lora.py).

rl/weight_sync.py's senders speak to `WeightReceiver`s (`update_weights`, `served_version`) through
actor handles. `TransformerWeightsHandle` wraps a decoder actor so the same senders, transports and
confirmation publish the transformer instead, without a second copy of the sync code:

    learner rank 0 --sender.publish(v, weights)--> TransformerWeightsHandle(decoder actor)
        .__ray_call__.remote(fn, ...)   -> fn(TransformerReceiver(worker), ...)   inside the worker
                                            -> worker.update_decoder_weights(v, weights)
        .served_version.remote()        -> worker.served_decoder_version()

Over the broadcast transport a decoder process is then in two weight-sync groups at once, one per
stream (`TransformerReceiver.weight_stream` names the second; rl/weight_sync.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from policy.lora import LoRAConfig, UnmergedAdapter, module_adapter_specs
from policy.weights import TRANSFORMER_STREAM, ParamSpec, VersionedWeights


def transformer_stream(transformer: torch.nn.Module,
                       lora: LoRAConfig | None = None) -> tuple[VersionedWeights, UnmergedAdapter | None]:
    """What a transformer update must hold (version 0 = the weights on disk): every parameter's name,
    shape and served dtype (the learner publishes `named_parameters()`; they are copied into the
    transformer); or under `lora` the adapter's PEFT names and shapes, with the `UnmergedAdapter` that
    serves each version beside the transformer's base weights (its hooks installed here)."""
    if lora is None:
        specs = {name: ParamSpec(tuple(p.shape), p.dtype) for name, p in transformer.named_parameters()}
        return VersionedWeights(specs, tied=False), None
    specs = module_adapter_specs(transformer, lora, next(transformer.parameters()).dtype)
    return VersionedWeights(specs), UnmergedAdapter(transformer, specs, lora)


class TransformerReceiver:
    """A decoder worker seen as a receiver of transformer weights (runs inside the worker process)."""

    weight_stream = TRANSFORMER_STREAM

    def __init__(self, worker):
        self.worker = worker

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        return self.worker.update_decoder_weights(version, weights)

    def served_version(self) -> int:
        return self.worker.served_decoder_version()


def _on_transformer(worker, fn: Callable, *args):
    """Run a weight-sync receive function against the worker's transformer stream."""
    return fn(TransformerReceiver(worker), *args)


class _RayCall:
    def __init__(self, actor):
        self.actor = actor

    def remote(self, fn: Callable, *args):
        return self.actor.__ray_call__.remote(_on_transformer, fn, *args)


class _ServedVersion:
    def __init__(self, actor):
        self.actor = actor

    def remote(self):
        return self.actor.served_decoder_version.remote()


class TransformerWeightsHandle:
    """A decoder actor handle as rl/weight_sync.py's senders use it (`__ray_call__`,
    `served_version`), pointed at the transformer stream instead of the AR weights."""

    def __init__(self, actor):
        self.actor = actor
        self.__ray_call__ = _RayCall(actor)  # a dunder name: not mangled
        self.served_version = _ServedVersion(actor)
