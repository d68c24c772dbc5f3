"""Converting a BLIP3o-NEXT hub checkpoint: a tiny checkpoint written in the hub's layout (one
blip3o_qwen save holding Qwen3 + model.diffusion_connector + model.sana + model.sana_vae +
model.vision_tower, sharded, with BLIP3o's config fields) converts back into our model directory
bit for bit, decodes the same images, and bad input fails cleanly with nothing left on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy.cli import main as cli_main
from policy.convert import ConversionError, convert_blip3o_next
from policy.model_dir import CheckpointNotFoundError, ModelPaths, resolve_model_dir
from rollout.decoder_config import DecoderConfig
from rollout.decoder_worker import DiffusionDecoderWorker
from tests.test_decoder import random_codes, rollout_batch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `directory` (sharded or not)."""
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def hub_tensors(tiny: ModelPaths, with_sana: bool = True) -> dict[str, torch.Tensor]:
    """Our tiny model's tensors under BLIP3o-NEXT's names (blip3oQwenForCausalLM.state_dict())."""
    tensors = dict(read_tensors(tiny.ar))  # Qwen3ForCausalLM names are the same in both
    tensors.update({f"model.diffusion_connector.{k.removeprefix('layers.')}": v for k, v in read_tensors(tiny.connector).items()})
    if with_sana:
        tensors.update({f"model.sana.{k}": v for k, v in read_tensors(tiny.sana_transformer).items()})
        tensors.update({f"model.sana_vae.{k}": v for k, v in read_tensors(tiny.sana_vae).items()})
    generator = torch.Generator().manual_seed(1)
    tensors["model.vision_tower.encoder.patch_embed.weight"] = torch.randn(8, 3, 2, 2, generator=generator)
    tensors["model.vision_tower.quantizer.codebook"] = torch.randn(16, 8, generator=generator)
    return tensors


def write_hub_checkpoint(tiny: ModelPaths, directory: Path, tensors: dict[str, torch.Tensor], sana_repo: Path, **config_changes) -> Path:
    """A checkpoint laid out like the hub's: config.json (model_type blip3o_qwen + BLIP3o fields),
    two model-0000i-of-00002.safetensors shards with model.safetensors.index.json, the tokenizer."""
    directory.mkdir(parents=True)
    ar_config = json.loads((tiny.ar / "config.json").read_text())
    config = {**ar_config, "model_type": "blip3o_qwen", "architectures": ["blip3oQwenForCausalLM"],
              "mm_vision_tower": "TA-Tok", "vision_tower_pretrained": "/ckpt/ta_tok.pth",
              "diffusion_name_or_path": str(sana_repo), "image_start_tag_id": 1, "image_end_tag_id": 2,
              "num_image_tokens": 1024, "use_tar_siglip_features": False, **config_changes}
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n].contiguous() for n in shard_names}, str(directory / file), metadata={"format": "pt"})
    weight_map = {n: f for f, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (tiny.ar / name).is_file():
            shutil.copy2(tiny.ar / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> ModelPaths:
    return ModelPaths(tiny_model_dir)


@pytest.fixture(scope="module")
def sana_repo(tiny, tmp_path_factory) -> Path:
    """A SANA diffusers repo with the tiny model's configs but DIFFERENT (re-seeded) transformer
    weights, so a test can tell which source the converted weights came from."""
    from diffusers import SanaTransformer2DModel

    repo = tmp_path_factory.mktemp("sana-repo")
    shutil.copytree(tiny.sana_vae, repo / "vae")
    shutil.copytree(tiny.sana_scheduler, repo / "scheduler")
    torch.manual_seed(123)
    SanaTransformer2DModel.from_config(SanaTransformer2DModel.load_config(tiny.sana_transformer)).save_pretrained(repo / "transformer")
    return repo


@pytest.fixture(scope="module")
def converted(tiny, sana_repo, tmp_path_factory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("convert")
    source = write_hub_checkpoint(tiny, work / "hub", hub_tensors(tiny), sana_repo)
    lines: list[str] = []
    # a small shard size makes the AR part come out in several shards, as a real 3B one does
    convert_blip3o_next(str(source), work / "out", tokens_per_image=16, max_shard_bytes=200_000, log=lines.append)
    return work / "out", lines


def assert_same_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name


def test_every_tensor_round_trips_bit_for_bit(tiny, sana_repo, converted):
    out, _ = converted
    repo_weights = read_tensors(sana_repo / "transformer")["proj_out.weight"]
    assert not torch.equal(repo_weights, read_tensors(tiny.sana_transformer)["proj_out.weight"])
    paths = resolve_model_dir(str(out))
    assert_same_tensors(read_tensors(tiny.ar), read_tensors(paths.ar))
    assert_same_tensors(read_tensors(tiny.connector), read_tensors(paths.connector))
    # the checkpoint's SANA weights win over the (different) SANA repo's
    assert_same_tensors(read_tensors(tiny.sana_transformer), read_tensors(paths.sana_transformer))
    assert_same_tensors(read_tensors(tiny.sana_vae), read_tensors(paths.sana_vae))
    assert len(list(paths.ar.glob("model-*-of-*.safetensors"))) >= 2
    assert (paths.ar / "model.safetensors.index.json").is_file()


def test_converted_directory_is_a_plain_qwen3_model_dir(tiny, converted):
    out, lines = converted
    paths = resolve_model_dir(str(out))
    layout = paths.layout()
    # image size = SANA sample_size 8 latents x DC-AE downsampling 2**(4 blocks - 1) = 64
    assert (layout.tokens_per_image, layout.image_size, layout.decoder) == (16, 64, "sana")
    config = json.loads((paths.ar / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert not {"mm_vision_tower", "diffusion_name_or_path", "image_start_tag_id"} & set(config)
    assert not (paths.ar / "generation_config.json").exists()
    assert json.loads((paths.connector / "connector.json").read_text()) == {"ar_hidden_size": 128, "out_dim": 64}
    provenance = json.loads((out / "converted_from.json").read_text())
    assert provenance["sana_transformer_from"] == "checkpoint"
    assert provenance["dropped"] == ["model.vision_tower.encoder.patch_embed.weight", "model.vision_tower.quantizer.codebook"]
    assert any("dropping 2 tensors" in line for line in lines) and lines[-1].startswith("[convert] done")


def test_converted_dir_decodes_the_same_images(tiny_model_dir, converted):
    out, _ = converted
    codes = random_codes(tiny_model_dir, 2, seed=3)
    images = {}
    for name, directory in (("original", tiny_model_dir), ("converted", out)):
        worker = DiffusionDecoderWorker(DecoderConfig(model=str(directory), num_inference_steps=2))
        images[name] = worker.decode(rollout_batch(directory, ["a cat", "a red bus"], codes), seed=7).images
    assert images["original"].shape == (2, 64, 64, 3)
    assert np.array_equal(images["original"], images["converted"])


def test_sana_comes_from_the_repo_when_the_checkpoint_has_none(tiny, sana_repo, tmp_path):
    source = write_hub_checkpoint(tiny, tmp_path / "hub", hub_tensors(tiny, with_sana=False), sana_repo)
    # no --sana: the checkpoint's diffusion_name_or_path names the repo
    paths = convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    assert_same_tensors(read_tensors(sana_repo / "transformer"), read_tensors(paths.sana_transformer))
    assert_same_tensors(read_tensors(sana_repo / "vae"), read_tensors(paths.sana_vae))
    assert (paths.ar / "model.safetensors").is_file()  # under the default shard size: one file


def test_tied_embeddings_keep_no_lm_head(tiny, sana_repo, tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = hub_tensors(tiny)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["lm_head.weight"])  # ignored when tied
    source = write_hub_checkpoint(tiny, tmp_path / "hub", tensors, sana_repo, tie_word_embeddings=True)
    paths = convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    assert "lm_head.weight" not in read_tensors(paths.ar)
    model = AutoModelForCausalLM.from_pretrained(paths.ar)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def assert_nothing_written(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == ["hub"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"model.latent_queries": torch.zeros(1, 4)}), "unexpected tensors: model.latent_queries"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith("model.diffusion_connector.")], "no diffusion connector"),
        (lambda t: t.pop("model.diffusion_connector.3.weight"), "missing tensors: 3.weight"),
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
        (lambda t: t.pop("model.sana.proj_out.weight"), "missing tensors: proj_out.weight"),
    ],
)
def test_bad_checkpoint_fails_clearly_and_writes_nothing(tiny, sana_repo, tmp_path, edit, message):
    tensors = hub_tensors(tiny)
    edit(tensors)
    source = write_hub_checkpoint(tiny, tmp_path / "hub", tensors, sana_repo)
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    assert_nothing_written(tmp_path)


def test_failure_while_writing_leaves_no_output(tiny, sana_repo, tmp_path, monkeypatch):
    source = write_hub_checkpoint(tiny, tmp_path / "hub", hub_tensors(tiny), sana_repo)

    def full_disk(self, directory):
        raise OSError("No space left on device")

    monkeypatch.setattr("policy.connector.Connector.save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    assert_nothing_written(tmp_path)


def test_missing_hub_ids_offline_raise_checkpoint_not_found(tiny, sana_repo, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="'BLIP3o/no-such-checkpoint' not found"):
        convert_blip3o_next("BLIP3o/no-such-checkpoint", tmp_path / "out", local_files_only=True, log=lambda _: None)
    source = write_hub_checkpoint(tiny, tmp_path / "hub", hub_tensors(tiny), sana_repo)
    with pytest.raises(CheckpointNotFoundError, match="'Efficient-Large-Model/no-such-sana' not found"):
        convert_blip3o_next(str(source), tmp_path / "out", sana="Efficient-Large-Model/no-such-sana",
                            local_files_only=True, log=lambda _: None)
    assert_nothing_written(tmp_path)


def test_cli_converts_and_reports_errors_in_one_line(tiny, sana_repo, tmp_path, capsys):
    source = write_hub_checkpoint(tiny, tmp_path / "hub", hub_tensors(tiny), sana_repo)
    cli_main(["convert-blip3o-next", str(source), str(tmp_path / "out"), "--sana", str(sana_repo), "--tokens-per-image", "16"])
    assert resolve_model_dir(str(tmp_path / "out")).layout().tokens_per_image == 16
    for argv in (["convert-blip3o-next", str(source), str(tmp_path / "out")],  # exists
                 ["convert-blip3o-next", str(tmp_path / "nowhere"), str(tmp_path / "out2")]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("blip3o-rl: error: ") and "\n" not in err
