"""A CPU run on a reward mix: the real OCR reward (Ray Serve) + an external HTTP scorer started by the
test + a user's Python scorer loaded inside the Serve deployment + a scorer stuck at a constant.
Every component is in the store (metrics, sample records, versions); the constant one raises its
warning; then the HTTP scorer starts answering 503 and the run stops cleanly on its own outage
budget (checkpoint, exit 3) while OCR, scored through its own client, never failed."""

from __future__ import annotations

import pytest

from rewards.local_server import serve_in_thread
from tests.support.http_scorers import ControlledScorer
from tests.train_support import RunningTrain, metric_table, only_run, small_config

pytestmark = pytest.mark.slow


def test_a_run_on_ocr_plus_http_and_python_scorers_stops_cleanly_when_the_http_scorer_fails(tmp_path, glyph_model_dir):
    # 2 prompts a step, one prompt a chunk: each step sends the http scorer 2 requests (16 rows each),
    # so steps 1-2 are scored and step 3's first request is the first 503
    scorer = ControlledScorer(fail_from=5, constant=0.25)
    with serve_in_thread(scorer.app) as url:
        mix = [
            {"name": "ocr", "scorer": "ocr"},
            {"name": "bright", "scorer": "http", "url": f"{url}/score", "weight": 0.5, "normalize": "group",
             "outage_budget_s": 3},
            {"name": "red", "scorer": "python", "function": "tests.support.python_scorers:redness", "weight": 0.0},
            {"name": "flat", "scorer": "http", "url": f"{url}/constant", "weight": 0.0},
        ]
        config = small_config(tmp_path, glyph_model_dir, steps=4, **{"rewards.mix": mix, "checkpoint.every": 100})
        run = RunningTrain(config)
        try:
            code = run.finish(timeout=600)
        finally:
            run.kill()
    assert code == 3, run.output[-4000:]
    assert "reward bright (http): " in run.output
    ocr_lines = [line for line in run.output.splitlines() if "reward ocr" in line]  # no failure of OCR's:
    assert all("on every sample of the step" in line for line in ocr_lines), ocr_lines  # at most all-0 steps
    assert "warning: step 1: reward flat (http) is 0.25 on every sample" in run.output
    store, record = only_run(tmp_path / "runs")
    assert record.status == "stopped"
    table = metric_table(store, record.id)
    assert sorted(table) == [1, 2]
    for step in (1, 2):
        assert {"reward/ocr", "reward/bright", "reward/red", "reward/flat", "reward/mean"} <= set(table[step])
        assert 0 < table[step]["reward/bright"] < 1 and table[step]["reward/flat"] == 0.25
        # group-normalized brightness is centred in every group: the mean total is the mean OCR reward
        assert table[step]["reward/mean"] == pytest.approx(table[step]["reward/ocr"], abs=1e-5)
        samples = store.samples(record.id, step)
        assert samples and all(set(s.components) == {"ocr", "bright", "red", "flat"} for s in samples)
    events = store.events(record.id)
    versions = [e.message for e in events if e.kind == "reward_version"]
    assert any("reward bright (http) version mean-brightness-1" in m for m in versions), versions
    assert any(m.startswith("step 1: reward red (python) version python:tests.support.python_scorers:redness@")
               for m in versions), versions
    assert len(versions) == 4  # each once: nothing changed during the run
    constant = [e.message for e in events if e.kind == "reward_constant"]  # OCR may be all 0 too, early on
    assert sum("reward flat (http) is 0.25" in m for m in constant) == 2, constant  # steps 1 and 2
    retried = [e.message for e in events if e.kind == "reward_retry"]
    assert not any("ocr:" in m for m in retried)
    stopped = events[-1]
    assert stopped.kind == "stopped" and "checkpoint" in stopped.message and "reward bright (http)" in stopped.message
