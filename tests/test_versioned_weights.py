"""The one weight-update contract (policy.weights.VersionedWeights) that the AR rollout worker, the
decoder worker and the test receiver share: checks run before the worker's load, in order."""

from __future__ import annotations

import pytest
import torch

from policy.weights import ParamSpec, VersionedWeights, WeightUpdateError

SPECS = {"embed.weight": ParamSpec((4, 2), torch.bfloat16), "norm.weight": ParamSpec((2,), torch.bfloat16)}


def good() -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.ones(4, 2), "norm.weight": torch.zeros(2)}  # float32: cast allowed


def test_a_good_update_is_loaded_once_and_becomes_the_served_version():
    loads: list[dict] = []
    weights = VersionedWeights(SPECS, tied=True)
    # a tied lm_head (the embedding, in no checkpoint) is dropped before the checks and the load
    assert weights.update(3, {**good(), "lm_head.weight": torch.ones(4, 2)}, loads.append) == 3
    assert weights.version == 3 and [sorted(w) for w in loads] == [["embed.weight", "norm.weight"]]
    assert weights.update(3, good(), loads.append) == 3  # the same version again is allowed (a reload)
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
        served.update(version, weights, loads.append)
    assert message in str(refused.value) and str(refused.value).startswith("weight update refused: ")
    assert loads == [] and served.version == 3


def test_an_untied_model_keeps_its_lm_head_and_a_failed_load_keeps_the_old_version():
    specs = {**SPECS, "lm_head.weight": ParamSpec((4, 2), torch.bfloat16)}
    served = VersionedWeights(specs, tied=False, version=1)

    def broken_load(weights):
        assert "lm_head.weight" in weights
        raise RuntimeError("engine said no")

    with pytest.raises(RuntimeError, match="engine said no"):
        served.update(2, {**good(), "lm_head.weight": torch.ones(4, 2)}, broken_load)
    assert served.version == 1
