"""The trainer benchmark's bookkeeping (bench/bench_trainer.py): run names, a run's figures from its
store's rows, the ratios against the issue's targets, and the read-modify-write of trainer.json.
No run is started."""

from __future__ import annotations

import pytest

from bench.bench_trainer import BenchRun, figures, merge, parse_run, rise, summarize, target_lines

STEPS = 10


def test_run_names_parse_and_print_back():
    assert parse_run("sync") == BenchRun("sync")
    assert parse_run("async-k2") == BenchRun("async", 2)
    assert parse_run("async-k1@1.5s") == BenchRun("async", 1, 1.5)
    assert parse_run("sync@10s") == BenchRun("sync", 1, 10.0)
    for name in ("sync", "async-k4", "async-k1@1.5s", "async-k2@10s", "sync@1.5s"):
        assert parse_run(name).name == name
    for bad in ("async", "async-k0", "sync-k2", "async-k1@1.5", "vlm"):
        with pytest.raises(ValueError, match="unknown run"):
            parse_run(bad)


def store_rows(rewards: list[float], seconds_per_step: float, staleness: float = 0.0) -> dict[int, dict[str, float]]:
    """What read_store gives for a run: step s logged at 1000 + seconds_per_step * s; each step's own
    time/step 12 s (with steps in flight it is less than the pace); step 1 took 60 s (warm-up), which no
    figure may see."""
    return {s: {"reward/mean": r, "time/step": 12.0 if s > 1 else 60.0, "time/reward": 1.0,
                "policy/staleness": staleness, "_logged_at": 1000.0 + seconds_per_step * s}
            for s, r in enumerate(rewards, start=1)}


def test_a_runs_figures_from_its_store():
    rewards = [0.1 * s for s in range(STEPS)]  # 0.0 .. 0.9
    summary = summarize(store_rows(rewards, 20.0, staleness=1.0), STEPS)
    # steps 2..10 logged 9 * 20 s after step 1: 3600 * 9 / 180 = 180 steps/hour
    assert summary["steps_per_hour"] == pytest.approx(180.0, abs=1e-9)
    assert summary["step_s"] == pytest.approx(20.0, abs=1e-12)  # the pace, not the steps' own time/step
    assert summary["stages_s"] == {"reward": 1.0, "step": 12.0}
    # mean of 0.5..0.9 minus mean of 0.0..0.4 = 0.7 - 0.2
    assert summary["reward_rise"] == pytest.approx(0.5, abs=1e-12) == rise(rewards)
    assert summary["max_staleness_seen"] == 1.0 and summary["max_in_flight_seen"] is None
    assert rise([0.1] * 9) is None  # fewer than 2 x 5 steps: the two ends would overlap
    with pytest.raises(RuntimeError, match="not 1..10"):
        summarize(store_rows(rewards[:9], 12.0), STEPS)  # a run that stopped early


def run(steps_per_hour: float, reward_rise: float, steps: int = STEPS) -> dict:
    return {"steps": steps, "steps_per_hour": steps_per_hour, "reward_rise": reward_rise,
            "step_s": 3600 / steps_per_hour,
            "stages_s": {}, "rewards": [0.0] * 5 + [reward_rise] * 5, "max_staleness_seen": 1.0,
            "load_average_before": [1.0, 1.0, 1.0]}


RUNS = {"sync": run(100, 0.5), "async-k1": run(200, 0.45), "async-k2": run(250, 0.5), "async-k1@1.5s": run(190, 0.4),
        "sync@1.5s": run(90, 0.5), "async-k1@10s": run(60, 0.5), "async-k2@10s": run(120, 0.3),
        "async-k4@10s": run(150, 0.45)}


def test_the_figures_against_the_issues_targets():
    out = figures(RUNS, STEPS)
    assert out["judge_1_5s_over_zero_latency"] == pytest.approx(190 / 200)  # async-k1 behind 1.5 s / async-k1 local
    # the best staleness behind 10 s (k = 4: 150) over async-k1 local (200); over the best local async run (250)
    assert out["judge_10s_best_staleness"] == 4
    assert out["judge_10s_over_zero_latency"] == pytest.approx(150 / 200)
    assert out["judge_10s_over_best_zero_latency"] == pytest.approx(150 / 250)
    assert out["reward_rise_over_sync"]["async-k1"] == pytest.approx(0.9) and \
        out["reward_rise_over_sync"]["async-k2@10s"] == pytest.approx(0.6)
    assert out["async_speedup"] == pytest.approx(2.0) and out["remote_reward_async_speedup"] == pytest.approx(190 / 90)
    assert out["reward_first_steps"] == 0.0 and out["reward_last_steps"] == 0.5 and out["first_last_window"] == 5
    lines = target_lines(out)
    assert lines[:2] == ["judge_1_5s_over_zero_latency: 0.950 (met, target >= 0.9)",
                         "judge_10s_over_zero_latency: 0.750 (met, target >= 0.7) at k = 4"]
    assert "reward rise of async-k2@10s over sync's: 0.600 (MISSED, target >= 0.8)" in lines
    # without the runs a figure needs, it is left out, not made up
    assert "judge_10s_over_zero_latency" not in figures({"sync": RUNS["sync"], "async-k1": RUNS["async-k1"]}, STEPS)


def test_merge_keeps_other_keys_and_runs_and_compares_only_runs_of_the_same_length():
    earlier = {"async_speedup": 2.68, "remote_reward_async_speedup": 1.14, "someone_else": {"x": 1},
               "runs": {"sync": RUNS["sync"], "async-k1": RUNS["async-k1"]}}
    merged = merge(earlier, {"async-k1@1.5s": RUNS["async-k1@1.5s"]}, STEPS, None)
    assert set(merged["runs"]) == {"sync", "async-k1", "async-k1@1.5s"} and merged["someone_else"] == {"x": 1}
    assert merged["judge_1_5s_over_zero_latency"] == pytest.approx(0.95)
    assert merged["remote_reward_async_speedup"] == 1.14  # its runs (sync@1.5s) did not run: the old figure stays
    assert merged["async_speedup"] == pytest.approx(2.0)  # recomputed from the runs it now has
    # a 3-step smoke run of the same name replaces the run but enters no 10-step figure
    smoke = merge(merged, {"async-k1": run(400, 0.0, steps=3)}, STEPS, {"judge_latency_s": {"p50": 0.03}})
    assert smoke["runs"]["async-k1"]["steps"] == 3 and "async-k1" not in smoke["steps_per_hour"]
    assert smoke["vlm_judge_latency"] == {"judge_latency_s": {"p50": 0.03}}
