"""The one weight-update contract (policy.weights.VersionedWeights) that the AR rollout worker, the
decoder worker and the test receiver share: checks run before the worker's load, in order."""

from __future__ import annotations

import pytest
import torch

from policy.weights import UNSERVICEABLE, ParamSpec, VersionedWeights, WeightStream, WeightUpdateError

SPECS = {"embed.weight": ParamSpec((4, 2), torch.bfloat16), "norm.weight": ParamSpec((2,), torch.bfloat16)}


def good() -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.ones(4, 2), "norm.weight": torch.zeros(2)}  # float32: cast allowed


def recorder(loads: list[dict]):
    """A load that keeps what it was handed (the pairs, read as the worker's load reads them)."""
    return lambda pairs: loads.append(dict(pairs))


def test_a_good_update_is_loaded_once_and_becomes_the_served_version():
    loads: list[dict] = []
    weights = VersionedWeights(SPECS, tied=True)
    # a tied lm_head (the embedding, in no checkpoint) is dropped before the checks and the load
    assert weights.update(3, {**good(), "lm_head.weight": torch.ones(4, 2)}, recorder(loads)) == 3
    assert weights.version == 3 and [sorted(w) for w in loads] == [["embed.weight", "norm.weight"]]
    assert weights.update(3, good(), recorder(loads)) == 3  # the same version again is allowed (a reload)
    assert len(loads) == 2


@pytest.mark.parametrize("version, weights, message", [
    (2, good(), "version 2 is older than the served 3"),
    (-1, good(), "version must be a non-negative int, got -1"),
    ("4", good(), "version must be a non-negative int, got '4'"),
    (4, {"embed.weight": torch.ones(4, 2)}, "missing names ['norm.weight']"),
    (4, {**good(), "norm.weight": torch.full((2,), float("nan"))}, "norm.weight: contains NaN"),
])
def test_a_refused_update_never_reaches_the_load_and_keeps_the_version(version, weights, message):
    loads: list[dict] = []
    served = VersionedWeights(SPECS, version=3)
    with pytest.raises(WeightUpdateError) as refused:
        served.update(version, weights, recorder(loads))
    assert message in str(refused.value) and str(refused.value).startswith("weight update refused: ")
    assert loads == [] and served.version == 3


def test_an_untied_model_keeps_its_lm_head_and_a_failed_load_keeps_the_old_version():
    specs = {**SPECS, "lm_head.weight": ParamSpec((4, 2), torch.bfloat16)}
    served = VersionedWeights(specs, tied=False, version=1)

    def broken_load(pairs):
        assert "lm_head.weight" in dict(pairs)
        raise RuntimeError("engine said no")

    with pytest.raises(RuntimeError, match="engine said no"):
        served.update(2, {**good(), "lm_head.weight": torch.ones(4, 2)}, broken_load)
    assert served.version == 1


def stream(*buckets: dict[str, torch.Tensor], specs: dict[str, ParamSpec] | None = None) -> WeightStream:
    declared = specs or {name: ParamSpec(tuple(t.shape), t.dtype) for bucket in buckets for name, t in bucket.items()}
    return WeightStream(declared, iter(buckets))


def test_a_stream_reaches_the_load_bucket_by_bucket_and_becomes_the_served_version():
    seen: list[tuple[str, int]] = []  # (name, buckets the stream had handed out when the load read it)
    handed = []

    def buckets():
        for bucket in ({"embed.weight": torch.ones(4, 2)}, {"lm_head.weight": torch.ones(4, 2), "norm.weight": torch.zeros(2)}):
            handed.append(bucket)
            yield bucket

    served = VersionedWeights(SPECS, tied=True, version=1)
    declared = {"embed.weight": ParamSpec((4, 2), torch.float32), "lm_head.weight": ParamSpec((4, 2), torch.float32),
                "norm.weight": ParamSpec((2,), torch.float32)}
    assert served.update(2, WeightStream(declared, buckets()), lambda pairs: seen.extend((n, len(handed)) for n, _ in pairs)) == 2
    # the first tensor is loaded before the second bucket is read; the tied lm_head never reaches the load
    assert seen == [("embed.weight", 1), ("norm.weight", 2)] and served.version == 2 and served.serviceable


@pytest.mark.parametrize("declared, message", [
    ({"embed.weight": ParamSpec((4, 3), torch.float32), "norm.weight": ParamSpec((2,), torch.float32)},
     "embed.weight: shape (4, 3) != served (4, 2)"),
    ({"embed.weight": ParamSpec((4, 2), torch.float32)}, "missing names ['norm.weight']"),
    ({**{n: ParamSpec(s.shape, torch.float32) for n, s in SPECS.items()}, "extra.weight": ParamSpec((1,), torch.float32)},
     "unknown names ['extra.weight']"),
    ({"embed.weight": ParamSpec((4, 2), torch.int64), "norm.weight": ParamSpec((2,), torch.float32)},
     "embed.weight: dtype torch.int64 != served torch.bfloat16"),
])
def test_a_stream_with_a_wrong_declaration_is_refused_before_any_bucket_is_read(declared, message):
    read = []
    served = VersionedWeights(SPECS, version=3)
    with pytest.raises(WeightUpdateError, match="weight update refused") as refused:
        served.update(4, WeightStream(declared, (read.append(1) or b for b in [good()])), recorder([]))
    assert message in str(refused.value) and read == [] and served.version == 3 and served.serviceable


def test_a_stream_refused_in_its_first_bucket_keeps_the_version_and_one_refused_later_leaves_it_unserviceable():
    nan = {"norm.weight": torch.full((2,), float("nan"))}
    loads: list[dict] = []
    served = VersionedWeights(SPECS, version=3)
    with pytest.raises(WeightUpdateError, match="norm.weight: contains NaN"):
        served.update(4, stream(nan, {"embed.weight": torch.ones(4, 2)}), recorder(loads))
    assert served.version == 3 and served.serviceable and loads == []  # nothing reached the model
    with pytest.raises(WeightUpdateError, match="norm.weight: contains NaN"):
        served.update(4, stream({"embed.weight": torch.ones(4, 2)}, nan), recorder(loads))
    # the embedding is loaded, the norm is not: neither version is what the model holds
    assert served.version == UNSERVICEABLE and not served.serviceable
    with pytest.raises(WeightUpdateError, match="half-updated"):
        served.require_serviceable()
    # a bucket that is not what the stream declared is refused the same way
    with pytest.raises(WeightUpdateError, match="differ from the stream's declaration"):
        served.update(5, stream({"embed.weight": torch.ones(4, 2)}, {"norm.weight": torch.zeros(3)},
                                specs={"embed.weight": ParamSpec((4, 2), torch.float32),
                                       "norm.weight": ParamSpec((2,), torch.float32)}), recorder(loads))
    # a full update (any version) makes it serve again
    assert served.update(5, good(), recorder(loads)) == 5 and served.serviceable


def test_a_stream_whose_transport_fails_part_way_leaves_the_worker_unserviceable():
    def buckets():
        yield {"embed.weight": torch.ones(4, 2)}
        raise ConnectionError("peer closed")

    served = VersionedWeights(SPECS, version=3)
    with pytest.raises(ConnectionError):
        served.update(4, WeightStream({n: ParamSpec(s.shape, torch.float32) for n, s in SPECS.items()}, buckets()),
                      recorder([]))
    assert served.version == UNSERVICEABLE
