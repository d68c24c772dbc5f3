"""The demo benchmark's bookkeeping (bench/bench_demo.py): the seeded config copy, the last-5 mean, and
the read-modify-write of a results file another benchmark writes too. No run is started."""

from __future__ import annotations

import json

import pytest
import yaml

from bench.bench_demo import last_mean, merge_results, seeded_config, write_merged


def outcome(curve):
    return {"curve": curve, "wall_s": 1.0, "exit_code": 0, "run_id": "r", "load_before": 0.0, "load_after": 0.0,
            "date": "2026-12-05 14:00"}


def test_last_mean_needs_every_last_step():
    assert last_mean([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)
    assert last_mean([0.1, 0.2, 0.3, 0.4]) is None  # fewer than 5 steps
    assert last_mean([0.1, 0.2, None, 0.4, 0.5, 0.6]) is None  # a step that logged no reward


def test_seeded_config_changes_only_the_seed(tmp_path):
    source = tmp_path / "demo.yaml"
    source.write_text("name: demo\nseed: 0\nsteps: 60\ndata:\n  group_size: 16\n")
    copy = yaml.safe_load(seeded_config(source, 2, tmp_path).read_text())
    assert copy == {"name": "demo", "seed": 2, "steps": 60, "data": {"group_size": 16}}


def test_merge_keeps_other_keys_and_earlier_seeds_of_the_same_run():
    other = {"glyph_steps_to_0_9": {"scalar": [40, 50, 60]}}
    first = merge_results(other, "c.yaml", 6, 1, outcome([0.0, 0.5, 1.0, 1.0, 1.0, 1.0]))
    both = merge_results(first, "c.yaml", 6, 0, outcome([0.0, 0.0, 0.5, 0.5, 0.5, 0.5]))
    assert both["glyph_steps_to_0_9"] == {"scalar": [40, 50, 60]}
    assert list(both["demo_reward_curves"]) == ["0", "1"]  # seed order, whatever order they ran in
    assert both["demo_reward_last5"] == pytest.approx([0.4, 0.9])  # (0+0.5*4)/5, (0.5+1*4)/5
    assert both["demo_runs"]["seeds"] == [0, 1] and set(both["demo_runs"]["per_seed"]) == {"0", "1"}
    # another config (or length): the earlier seeds no longer compare and are dropped
    other_config = merge_results(both, "lora.yaml", 6, 2, outcome([1.0] * 6))
    assert list(other_config["demo_reward_curves"]) == ["2"] and other_config["demo_reward_last5"] == [1.0]


def test_write_merged_reads_the_file_as_it_is_now(tmp_path):
    out = tmp_path / "spatial.json"
    out.write_text(json.dumps({"sana_jpeg_drop_30": {"scalar": [1.0]}}))
    write_merged(out, "c.yaml", 5, 0, outcome([0.2] * 5))
    written = json.loads(out.read_text())
    assert written["sana_jpeg_drop_30"] == {"scalar": [1.0]} and written["demo_reward_last5"] == [pytest.approx(0.2)]
