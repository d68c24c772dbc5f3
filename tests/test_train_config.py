"""The run's YAML config: validated, unknown keys and bad values named, model path shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rl.run.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    learners = [learner.model for learner in (config.learner, config.diffusion_learner) if learner is not None]
    assert {config.rollout.engine.model, config.decoder.decoder.model, *learners} == {config.model.path}
    assert ("ar" in config.train) == (config.learner is not None)
    assert ("diffusion" in config.train) == (config.diffusion_learner is not None)


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


def joint() -> dict:
    return yaml.safe_load((CONFIGS / "tiny-cpu-sana-joint.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.pop("diffusion_learner"), "train has 'diffusion': the 'diffusion_learner' section is required"),
    (lambda raw: raw.update(train=["diffusion"]), "'learner' is set but train \\(\\['diffusion'\\]\\) does not"),
    (lambda raw: raw.update(train=["ar", "ar"]), "names a policy twice"),
    (lambda raw: raw.update(train=["ar"]), "'diffusion_learner' is set but train"),
    (lambda raw: raw.update(schedule={"mode": "async"}), "schedule.mode must be 'sync'"),
    (lambda raw: raw["model"].update(make_tiny="glyph"), "the glyph decoder \\(no diffusion model\\)"),
    (lambda raw: (raw.update(train=["diffusion"]), raw.pop("learner"), raw.update(schedule={"alternate": True})),
     "schedule.alternate takes turns between two policies"),
    (lambda raw: raw["decoder"]["decoder"].update(transformer_lora={"rank": 4}),
     "transformer_lora .* must equal diffusion_learner.lora"),
])
def test_train_names_learners_that_exist_and_fit(tmp_path, change, message):
    """`train` and the learner sections agree; a diffusion learner needs the sync schedule and a SANA decoder."""
    raw = joint()
    change(raw)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, raw))


def test_diffusion_lora_reaches_the_decoders_and_the_alternate_schedule_takes_turns(tmp_path):
    from types import SimpleNamespace

    from rl.run.train import Trainer

    raw = joint()
    raw["diffusion_learner"]["lora"] = {"rank": 4, "alpha": 8}
    raw["schedule"]["alternate"] = True
    config = load_config(write(tmp_path, raw))
    assert config.decoder.decoder.transformer_lora == config.diffusion_learner.lora
    assert config.decoder.decoder.transformer_lora.rank == 4
    turns = [Trainer._updates(SimpleNamespace(config=config), step) for step in (1, 2, 3, 4)]
    assert turns == [("ar",), ("diffusion",), ("ar",), ("diffusion",)]
    together = load_config(write(tmp_path, joint()))
    assert Trainer._updates(SimpleNamespace(config=together), 1) == ("ar", "diffusion")
