"""Checking a weight update before it touches a serving model.

Every worker that serves the AR policy (vLLM rollout workers, decoder workers) receives full AR
weights as `{hf_parameter_name: tensor}` with a version number. A partial load is worse than none
(vLLM is left half-loaded and the next generate crashes), so all names, shapes and dtypes are
checked against the served model first and a bad update is refused whole.

An update arrives either whole (a mapping: the shared-memory and object-store transports, whose
buffers the whole model already lives in) or as a `WeightStream` (the broadcast transport: every
name, shape and dtype declared up front, then the values bucket by bucket, so no worker holds a
whole-model receive buffer). A stream's declaration is checked whole before any value is read;
each bucket's values are checked before any of them reaches the load. A bucket that fails after
earlier ones were loaded (NaN, or the transport broke) leaves the model half-updated: the worker
is then unserviceable (`served_version()` = UNSERVICEABLE, generate refuses) until a full update
or a restart (rl/run/fleet.py restarts it during recovery).

`VersionedWeights` is that contract, written once: every worker keeps one and hands it the load
function of its own model (vLLM's reload, the decoder's AR model, a plain transformers model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class WeightUpdateError(ValueError):
    """A weight update was refused; the worker keeps serving its previous version (unless a stream
    failed after part of it was loaded: then the worker is unserviceable)."""


UNSERVICEABLE = -1
"""`served_version()` of a worker whose streamed update failed half-way (it must not serve)."""

AR_STREAM = "ar"
"""The weight stream of the AR policy (HF Qwen3 names): rollout workers and the decoders' AR copy."""
TRANSFORMER_STREAM = "transformer"
"""The weight stream of SANA's transformer, a decoder worker's second one (rollout/decoder_weights.py).
A worker process keeps one broadcast group per stream (rl/weight_sync.py)."""


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def param_specs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, ParamSpec]:
    return {name: ParamSpec(tuple(t.shape), t.dtype) for name, t in state_dict.items()}


@dataclass
class WeightStream:
    """An update that arrives bucket by bucket: what every tensor will be, then the values.
    `buckets` is read once; a bucket's tensors may be views of a buffer the load keeps referencing
    (vLLM holds a layer's weights until the layer is complete), so no bucket reuses another's buffer."""

    specs: dict[str, ParamSpec]
    """Every tensor of the update, in order: name -> shape and dtype as sent."""
    buckets: Iterable[Mapping[str, torch.Tensor]]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. Any NaN/inf element makes the float32 sum non-finite, so one
    reduction (~14x faster than an elementwise isfinite on CPU) clears the normal case; only a
    non-finite sum (a real NaN/inf, or finite values so huge the sum overflows) pays the exact check."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def declaration_problems(expected: Mapping[str, ParamSpec], declared: Mapping[str, ParamSpec], *,
                         require_all: bool = True, allow_cast: bool = False) -> list[str]:
    """Every unknown, missing, mis-shaped or mis-typed name of an update described by `declared`."""
    problems: list[str] = []
    unknown = sorted(set(declared) - set(expected))
    if unknown:
        problems.append(f"unknown names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if require_all:
        missing = sorted(set(expected) - set(declared))
        if missing:
            problems.append(f"missing names {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, spec in declared.items():
        served = expected.get(name)
        if served is None:
            continue
        if spec.shape != served.shape:
            problems.append(f"{name}: shape {spec.shape} != served {served.shape}")
        if not (spec.dtype == served.dtype
                or (allow_cast and spec.dtype.is_floating_point and served.dtype.is_floating_point)):
            problems.append(f"{name}: dtype {spec.dtype} != served {served.dtype}")
    return problems


def validate_weights(
    expected: Mapping[str, ParamSpec],
    weights: Mapping[str, torch.Tensor],
    *,
    require_all: bool = True,
    allow_cast: bool = False,
) -> None:
    """Raise WeightUpdateError naming every unknown, missing, mis-shaped or mis-typed tensor, and
    every floating one holding NaN or inf.

    `allow_cast` accepts floating dtypes other than the served one (the receiver casts), e.g. a
    float32 learner publishing to a bfloat16 engine.
    """
    problems = [f"{name}: not a tensor ({type(t).__name__})" for name, t in weights.items()
                if name in expected and not isinstance(t, torch.Tensor)]
    declared = {name: ParamSpec(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
                else expected.get(name, ParamSpec((), torch.float32))  # not a tensor: reported above, or unknown
                for name, t in weights.items()}
    problems += declaration_problems(expected, declared, require_all=require_all, allow_cast=allow_cast)
    if not problems:  # values only once the structure is right
        problems = [f"{name}: contains NaN or inf" for name, t in weights.items()
                    if t.dtype.is_floating_point and not all_finite(t)]
    if problems:
        raise WeightUpdateError("weight update refused: " + "; ".join(problems))


def served_param_specs(ar_dir: Path, dtype: torch.dtype) -> dict[str, ParamSpec]:
    """HF parameter names and shapes of the checkpoint vLLM loaded (from the safetensors headers;
    no second model in memory), with the dtype the engine serves them in."""
    files = sorted(Path(ar_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {ar_dir}")
    specs = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                specs[name] = ParamSpec(tuple(handle.get_slice(name).get_shape()), dtype)
    return specs


def tied_embeddings(ar_dir: Path) -> bool:
    config = json.loads((Path(ar_dir) / "config.json").read_text())
    return bool(config.get("tie_word_embeddings", False))


class VersionedWeights:
    """The version a worker serves and the checks every update passes before the worker's own
    `load` sees a tensor: a non-negative version not older than the served one, a tied lm_head
    dropped (it is the embedding; no checkpoint stores it), then `validate_weights` on the whole
    update (a stream: on its declaration, then on each bucket). `load` receives `(name, tensor)`
    pairs, once per update. A refused update raises WeightUpdateError and the served version is
    unchanged. A whole update whose load fails keeps the old version; a stream that fails once
    values went to the load leaves the worker UNSERVICEABLE."""

    def __init__(self, specs: Mapping[str, ParamSpec], tied: bool = False, version: int = 0):
        self.specs = dict(specs)
        """What an update must contain: HF name -> shape and served dtype."""
        self.tied = tied
        self.version = version

    @classmethod
    def from_checkpoint(cls, ar_dir: Path, dtype: torch.dtype) -> VersionedWeights:
        """The contract of the AR checkpoint in `ar_dir` served in `dtype`, at version 0."""
        return cls(served_param_specs(ar_dir, dtype), tied_embeddings(ar_dir))

    @property
    def serviceable(self) -> bool:
        return self.version != UNSERVICEABLE

    def require_serviceable(self) -> None:
        if not self.serviceable:
            raise WeightUpdateError("this worker's weights are half-updated (a streamed weight update failed "
                                    "part-way): it serves nothing until a full update or a restart")

    def update(self, version: int, weights: Mapping[str, torch.Tensor] | WeightStream,
               load: Callable[[Iterator[tuple[str, torch.Tensor]]], None]) -> int:
        """Check `weights` as `version`, hand them to `load`, and return the version now served."""
        if not isinstance(version, int) or version < 0:
            raise WeightUpdateError(f"weight update refused: version must be a non-negative int, got {version!r}")
        if version < self.version:
            raise WeightUpdateError(f"weight update refused: version {version} is older than the served {self.version}")
        if isinstance(weights, WeightStream):
            return self._update_streamed(version, weights, load)
        weights = self._untied(weights)
        validate_weights(self.specs, weights, allow_cast=True)
        load(iter(weights.items()))
        self.version = version  # only after the load returned: a failed load keeps the old version
        return version

    def _untied(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.tied and "lm_head.weight" in weights:
            return {k: v for k, v in weights.items() if k != "lm_head.weight"}
        return weights

    def _update_streamed(self, version: int, stream: WeightStream,
                         load: Callable[[Iterator[tuple[str, torch.Tensor]]], None]) -> int:
        declared = self._untied(stream.specs)
        problems = declaration_problems(self.specs, declared, allow_cast=True)
        if problems:  # refused before a single value was read
            raise WeightUpdateError("weight update refused: " + "; ".join(problems))
        started = False

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal started
            for bucket in stream.buckets:
                bucket = self._untied(bucket)
                wrong = declaration_problems(declared, param_specs(bucket), require_all=False)
                if wrong:
                    raise WeightUpdateError("weight update refused: values differ from the stream's declaration: "
                                            + "; ".join(wrong))
                validate_weights(self.specs, bucket, require_all=False, allow_cast=True)  # values: NaN, inf
                started = True
                yield from bucket.items()

        try:
            load(checked())
        except BaseException:
            if started:  # earlier buckets are loaded, later ones are not: neither version is served
                self.version = UNSERVICEABLE
            raise
        self.version = version
        return version
