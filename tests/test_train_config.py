"""The run's YAML config: validated, unknown keys and bad values named, model path shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rl.train_config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.rollout.engine.model == config.decoder.decoder.model == config.learner.model == config.model.path


def write(tmp_path, raw) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def base() -> dict:
    return yaml.safe_load((CONFIGS / "tiny-cpu-glyph-ocr.yaml").read_text())


def test_unknown_key_is_named(tmp_path):
    raw = base()
    raw["learner"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"learner\.learning_rate: Extra inputs are not permitted"):
        load_config(write(tmp_path, raw))


def test_bad_value_is_named(tmp_path):
    raw = base()
    raw["data"]["group_size"] = 1
    with pytest.raises(ConfigError, match=r"data\.group_size: Input should be greater than or equal to 2"):
        load_config(write(tmp_path, raw))


def test_sampling_temperature_must_match_learner(tmp_path):
    raw = base()
    raw["rollout"]["engine"]["sampling"] = {"temperature": 0.7}
    with pytest.raises(ConfigError, match="temperature"):
        load_config(write(tmp_path, raw))


def test_async_needs_staleness_and_url_service_needs_url(tmp_path):
    raw = base()
    raw["schedule"] = {"mode": "async", "max_staleness": 0}
    with pytest.raises(ConfigError, match="max_staleness must be >= 1"):
        load_config(write(tmp_path, raw))
    raw = base()
    raw["rewards"] = {"service": "url"}
    with pytest.raises(ConfigError, match="rewards.url is required"):
        load_config(write(tmp_path, raw))


def test_overrides_and_missing_or_broken_files(tmp_path):
    config = load_config(CONFIGS / "tiny-cpu-glyph-ocr.yaml", {"steps": 3, "logging.runs_dir": str(tmp_path)})
    assert config.steps == 3 and config.logging.runs_dir == tmp_path
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_a_key_written_twice_is_an_error_naming_it(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("name: x\nsteps: 2\nlearner:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        load_config(config)
