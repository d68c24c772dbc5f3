"""The rehearsal's models: the real model's code-path choices (read from its directory when it is
on this machine), and the tiny random model built with them."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from policy.model_dir import LAYOUT_FILE, ModelLayout, ModelPaths
from policy.vocab import IM_START, image_token
from rl.rehearsal.substitution import BLIP3O_NEXT_CHOICES, ModelChoices, tiny_spec


def read_model_choices(path: Path) -> ModelChoices:
    """The choices of the model directory at `path`; BLIP3o-NEXT's when it is not here (a GPU
    config names the cluster's converted checkpoint, which a development machine does not hold)."""
    paths = ModelPaths(Path(path))
    if not (paths.root / LAYOUT_FILE).is_file():
        return BLIP3O_NEXT_CHOICES
    layout = paths.layout()
    ar = json.loads((paths.ar / "config.json").read_text())
    vocab = json.loads((paths.ar / "tokenizer.json").read_text())
    ids = {entry["content"]: entry["id"] for entry in vocab.get("added_tokens", [])}
    qk_norm, stages = None, 0
    if layout.decoder == "sana":
        qk_norm = json.loads((paths.sana_transformer / "config.json").read_text()).get("qk_norm")
        stages = len(json.loads((paths.sana_vae / "config.json").read_text())["encoder_block_out_channels"])
    return ModelChoices(
        tied_head=bool(ar.get("tie_word_embeddings", False)),
        markers_first=ids.get(IM_START, 0) < ids.get(image_token(0), 0),
        sana_qk_norm=qk_norm, dcae_stages=stages,
        save_dtype=str(ar.get("torch_dtype") or ar.get("dtype") or "float32"),
        decoder=layout.decoder, sampling=layout.sampling,
        max_positions=int(ar.get("max_position_embeddings", 0)), source=str(paths.root))


def build_tiny_model(directory: Path, choices: ModelChoices) -> bool:
    """Write the tiny model of `choices` to `directory` unless it is already there (same spec and
    sampling); returns whether it was built. Its layout records the real model's sampling
    truncation, so the rollout and the learner truncate as they would on the real model."""
    from policy.tiny import make_tiny

    spec = tiny_spec(choices)
    wanted = {k: v for k, v in asdict(spec).items() if k != "extra"}
    if (directory / LAYOUT_FILE).is_file():
        layout = ModelLayout.load(directory)
        if json.loads(json.dumps(layout.tiny_spec)) == json.loads(json.dumps(wanted)) and \
                layout.sampling == choices.sampling:
            return False
        raise FileExistsError(f"{directory} holds another model than this rehearsal's; remove it or choose "
                              "another --workdir")
    make_tiny(directory, spec)
    layout = ModelLayout.load(directory)
    replace(layout, sampling=choices.sampling).save(directory)
    return True
