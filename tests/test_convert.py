"""Converting a BLIP3o-NEXT hub checkpoint: tiny checkpoints written in the hub's two layouts (one
blip3o_qwen save holding Qwen3 + model.diffusion_connector + model.sana + model.sana_vae, sharded,
with BLIP3o's config fields and token ids) convert back into our model directory bit for bit and
decode the same images (up to float rounding):

- SFT layout (BLIP3o/BLIP3o-NEXT-SFT-3B, ~5B): also the TA-Tok tower (model.vision_tower.vision_tower.*:
  the tiny model's TA-Tok under upstream's names; kept as the image tokenizer given a ta_tok.pth, else
  dropped),
  a tokenizer holding `<image>` beyond the embedding rows, `diffusion_name_or_path: DIFFUSION` (the
  public training scripts' literal), so `--sana` is needed.
- GRPO layout (BLIP3o/BLIP3o-NEXT-GRPO-Geneval-3B, ~4B): no tower, no extra token, a usable SANA path
  and a generation_config.json whose top-k / top-p become our sampling defaults.

Bad input fails cleanly, in one line, with nothing left on disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy.cli import main as cli_main
from policy.convert import (
    HF_SAMPLING_DEFAULTS,
    SANA_HUB_ID,
    TOWER_PREFIX,
    ConversionError,
    convert_blip3o_next,
    hub_sampling,
)
from policy.image_tokenizer import ImageTokenizerNotFoundError, TATokImageTokenizer, load_image_tokenizer
from policy.model_dir import CheckpointNotFoundError, ModelPaths, SamplingDefaults, resolve_model_dir
from rollout.decoder_config import DecoderConfig
from rollout.decoder_worker import DiffusionDecoderWorker
from tests.test_decoder import assert_images_close, random_codes, rollout_batch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
QWEN3_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                           "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
"""Qwen3's own generation_config.json (Qwen/Qwen3-1.7B): what a checkpoint trained from Qwen3 may carry."""


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `directory` (sharded or not)."""
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def hub_tensors(tiny: ModelPaths, with_sana: bool = True, vision_tower: bool = True) -> dict[str, torch.Tensor]:
    """Our tiny model's tensors under BLIP3o-NEXT's names (blip3oQwenForCausalLM.state_dict())."""
    tensors = dict(read_tensors(tiny.ar))  # Qwen3ForCausalLM names are the same in both
    tensors.update({f"model.diffusion_connector.{k.removeprefix('layers.')}": v for k, v in read_tensors(tiny.connector).items()})
    if with_sana:
        tensors.update({f"model.sana.{k}": v for k, v in read_tensors(tiny.sana_transformer).items()})
        tensors.update({f"model.sana_vae.{k}": v for k, v in read_tensors(tiny.sana_vae).items()})
    if vision_tower:  # TATokVisionTower keeps TA-Tok as its `.vision_tower` (upstream ta_tok_encoder.py line 41)
        tensors.update({TOWER_PREFIX + k: v for k, v in read_tensors(tiny.image_tokenizer).items()})
    return tensors


def tiny_tokenizer(tiny: ModelPaths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.ar)


def token_id_fields(tokenizer) -> dict[str, int]:
    """The token-id fields BLIP3o-NEXT writes into config.json (`initialize_vision_tokenizer`,
    blip3o_arch.py lines 356-383), with the ids of our tiny tokenizer."""
    table = tokenizer.get_vocab()
    codebook = sum(1 for token in table if re.fullmatch(r"<I\d+>", token))
    return {"image_start_tag_id": table["<im_start>"], "image_end_tag_id": table["<im_end>"],
            "scale_start_token_id": table["<S0>"], "scale_end_token_id": table["<S2>"], "num_scale_tokens": 3,
            "image_start_token_id": table["<I0>"], "image_end_token_id": table[f"<I{codebook - 1}>"],
            "num_image_tokens": codebook, "num_new_tokens": codebook}


def write_hub_checkpoint(tiny: ModelPaths, directory: Path, tensors: dict[str, torch.Tensor], sana_repo: Path | str, *,
                         extra_tokens: tuple[str, ...] = (), generation_config: dict | None = None,
                         chat_template: str | None = None, **config_changes) -> Path:
    """A checkpoint laid out like the hub's: config.json (model_type blip3o_qwen + BLIP3o fields),
    two model-0000i-of-00002.safetensors shards with model.safetensors.index.json, the tokenizer
    (with `extra_tokens` appended past the embedding rows, as upstream's SFT data code appends
    `<image>`; `chat_template` replacing the tiny one), and generation_config.json when given."""
    directory.mkdir(parents=True)
    ar_config = json.loads((tiny.ar / "config.json").read_text())
    tokenizer = tiny_tokenizer(tiny)
    config = {**ar_config, "model_type": "blip3o_qwen", "architectures": ["blip3oQwenForCausalLM"],
              "mm_vision_tower": "TA-Tok", "vision_tower_pretrained": "/ckpt/ta_tok.pth", "mm_use_im_start_end": True,
              "diffusion_name_or_path": str(sana_repo), **token_id_fields(tokenizer),
              "tokenizer_padding_side": "right", "mm_tunable_parts": "mm_language_model", **config_changes}
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n].contiguous() for n in shard_names}, str(directory / file), metadata={"format": "pt"})
    weight_map = {n: f for f, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if extra_tokens or chat_template:
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
        tokenizer.chat_template = chat_template or tokenizer.chat_template
        tokenizer.save_pretrained(directory)
    else:
        for name in TOKENIZER_FILES:
            if (tiny.ar / name).is_file():
                shutil.copy2(tiny.ar / name, directory / name)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def sft_checkpoint(tiny: ModelPaths, directory: Path, tensors: dict | None = None, **changes) -> Path:
    """BLIP3o-NEXT-SFT-3B's layout: TA-Tok tower, `<image>` past the rows, `DIFFUSION` as the SANA repo."""
    return write_hub_checkpoint(tiny, directory, tensors if tensors is not None else hub_tensors(tiny), "DIFFUSION",
                                extra_tokens=("<image>",), **changes)


def grpo_checkpoint(tiny: ModelPaths, directory: Path, sana_repo: Path, **changes) -> Path:
    """BLIP3o-NEXT-GRPO-*-3B's layout: no tower, no extra token, Qwen3's generation config."""
    changes.setdefault("generation_config", QWEN3_GENERATION_CONFIG)
    return write_hub_checkpoint(tiny, directory, hub_tensors(tiny, vision_tower=False), sana_repo, **changes)


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
    """The SFT layout converted with --sana (its config says DIFFUSION)."""
    work = tmp_path_factory.mktemp("convert")
    source = sft_checkpoint(tiny, work / "hub")
    lines: list[str] = []
    # a small shard size makes the AR part come out in several shards, as a real 3B one does
    convert_blip3o_next(str(source), work / "out", sana=str(sana_repo), tokens_per_image=16, max_shard_bytes=200_000,
                        log=lines.append)
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


def test_converted_directory_is_a_plain_qwen3_model_dir(tiny, sana_repo, converted):
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
    assert provenance["sana_transformer_from"] == "checkpoint" and provenance["sana"] == str(sana_repo)
    tower = sorted(TOWER_PREFIX + name for name in read_tensors(tiny.image_tokenizer))
    assert provenance["dropped"] == tower and provenance["image_tokenizer_from"] is None
    assert any(f"dropping {len(tower)} tensors" in line for line in lines) and lines[-1].startswith("[convert] done")
    assert any(f"TA-Tok tower ({len(tower)} tensors) dropped: pass --ta-tok csuhan/TA-Tok" in line for line in lines)
    assert any("SANA repo from --sana" in line and "'DIFFUSION'" in line for line in lines)


def loaded_decoder_state(worker: DiffusionDecoderWorker) -> dict[str, torch.Tensor]:
    """Every tensor a SANA decoder worker decodes with, as loaded: AR model, connector, SANA, DC-AE."""
    decoder = worker.decoder
    parts = {"ar": decoder.ar, "connector": decoder.connector, "transformer": decoder.transformer, "vae": decoder.vae}
    return {f"{part}.{name}": tensor for part, module in parts.items() for name, tensor in module.state_dict().items()}


def test_converted_dir_decodes_the_same_images(tiny_model_dir, converted):
    """The two directories load bit-identical tensors (compared exactly) and decode the same images
    up to float reassociation: max |difference| <= 1 on uint8 and under 1% of the values differing
    (tests.test_decoder.assert_images_close). Exact image equality is not what conversion promises:
    the two loads are separate models whose weights sit at other addresses (SANA's are memory-mapped
    from files of different layouts) and CPU kernels (MKL / oneDNN) may sum in another order for
    another alignment or thread schedule; measured here, decoding the converted directory with 1
    instead of 2 threads changed 1 of 24576 values by 1. A conversion error is no rounding: the
    exact tensor comparison catches it, and the images would too (measured: the re-seeded SANA
    transformer moves 97% of the values by more than 1; one weight scaled by 1.01 changes 25%)."""
    out, _ = converted
    codes = random_codes(tiny_model_dir, 2, seed=3)
    images, states, schedulers = {}, {}, {}
    for name, directory in (("original", tiny_model_dir), ("converted", out)):
        worker = DiffusionDecoderWorker(DecoderConfig(model=str(directory), num_inference_steps=2))
        states[name] = loaded_decoder_state(worker)
        schedulers[name] = dict(worker.decoder.scheduler.config)
        images[name] = worker.decode(rollout_batch(directory, ["a cat", "a red bus"], codes), seed=7).images
    assert_same_tensors(states["original"], states["converted"])
    assert schedulers["converted"] == schedulers["original"]
    assert images["original"].shape == (2, 64, 64, 3)
    assert_images_close(images["original"], images["converted"])


def test_sft_tokenizer_keeps_image_past_the_rows(tiny, converted):
    """Upstream's SFT data code adds `<image>` after the embedding was resized: its id is the row
    count, one past the last row. The converted tokenizer keeps it; every id the policy uses fits."""
    from transformers import AutoTokenizer

    out, lines = converted
    paths = resolve_model_dir(str(out))
    rows = read_tensors(paths.ar)["model.embed_tokens.weight"].shape[0]
    tokenizer = AutoTokenizer.from_pretrained(paths.ar)
    assert len(tokenizer) == rows + 1 == len(tiny_tokenizer(tiny)) + 1
    assert tokenizer.convert_tokens_to_ids("<image>") == rows
    assert f"[convert] tokenizer: 1 entry past the embedding's {rows} rows, never emitted nor in the prompt, kept: <image>" in lines


def test_sampling_defaults_without_generation_config_are_transformers_defaults(converted):
    out, _ = converted
    sampling = resolve_model_dir(str(out)).layout().sampling
    assert (sampling.top_k, sampling.top_p, sampling.temperature) == (50, 1.0, 1.0)
    assert sampling.source == (f"no generation_config.json in {out.parent / 'hub'}: transformers' generate() defaults, "
                               "which upstream's generate(do_sample=True) then samples with")
    assert not (out / "ar" / "generation_config.json").exists()


def test_transformers_defaults_are_the_installed_ones():
    """The values generate() falls back to for a field the model's generation config leaves unset."""
    from transformers import GenerationConfig

    if hasattr(GenerationConfig, "_get_default_generation_params"):  # transformers >= 5
        defaults = GenerationConfig._get_default_generation_params()
    else:  # 4.x (upstream's): the constructor's defaults
        defaults = GenerationConfig().to_dict()
    assert {name: defaults[name] for name in HF_SAMPLING_DEFAULTS} == {"top_k": 50, "top_p": 1.0, "temperature": 1.0}
    assert HF_SAMPLING_DEFAULTS == {"top_k": 50, "top_p": 1.0, "temperature": 1.0}


def test_grpo_layout_converts_and_carries_its_generation_config(tiny, sana_repo, tmp_path):
    source = grpo_checkpoint(tiny, tmp_path / "hub", sana_repo)
    lines: list[str] = []
    paths = convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lines.append)
    assert_same_tensors(read_tensors(tiny.ar), read_tensors(paths.ar))
    assert_same_tensors(read_tensors(tiny.sana_transformer), read_tensors(paths.sana_transformer))
    assert json.loads((paths.root / "converted_from.json").read_text())["dropped"] == []
    assert paths.layout().sampling == SamplingDefaults(top_k=20, top_p=0.95, temperature=0.6,
                                                       source=f"generation_config.json of {source}")
    assert not (paths.ar / "generation_config.json").exists()  # vLLM would apply it on its own
    assert sum(line.startswith("[convert] note: recorded temperature 0.6") for line in lines) == 1
    assert not any("past the embedding" in line for line in lines)


@pytest.mark.parametrize(
    ("generation_config", "expected"),
    [
        ({"top_p": 0.9, "bos_token_id": 1}, (50, 0.9, 1.0)),  # unset fields take transformers' defaults
        ({"top_k": None, "top_p": None, "temperature": None}, (0, 1.0, 1.0)),  # null turns the processor off
        ({"top_k": 1200, "top_p": 0.95, "temperature": 1}, (1200, 0.95, 1.0)),  # upstream inference.py's values
    ],
)
def test_generation_config_fields(tmp_path, generation_config, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    sampling = hub_sampling(tmp_path, "BLIP3o/BLIP3o-NEXT-SFT-3B")
    assert (sampling.top_k, sampling.top_p, sampling.temperature) == expected
    assert sampling.source == "generation_config.json of BLIP3o/BLIP3o-NEXT-SFT-3B"


def test_invalid_generation_config_is_refused(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": -1, "top_p": 1.5}))
    with pytest.raises(ConversionError, match=r"invalid sampling values: top_k -1, top_p 1\.5"):
        hub_sampling(tmp_path, "x")


def test_sana_comes_from_the_repo_when_the_checkpoint_has_none(tiny, sana_repo, tmp_path):
    source = write_hub_checkpoint(tiny, tmp_path / "hub", hub_tensors(tiny, with_sana=False), sana_repo)
    # no --sana: the checkpoint's diffusion_name_or_path names the repo
    paths = convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    assert_same_tensors(read_tensors(sana_repo / "transformer"), read_tensors(paths.sana_transformer))
    assert_same_tensors(read_tensors(sana_repo / "vae"), read_tensors(paths.sana_vae))
    assert (paths.ar / "model.safetensors").is_file()  # under the default shard size: one file


@pytest.mark.parametrize(("stored", "warned"), [("zeros", True), ("embedding", False)])
def test_tied_embeddings_keep_the_embedding_and_warn_when_lm_head_differs(tiny, sana_repo, tmp_path, stored, warned):
    from transformers import AutoModelForCausalLM

    tensors = hub_tensors(tiny)
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = torch.zeros_like(embedding) if stored == "zeros" else embedding.clone()
    source = write_hub_checkpoint(tiny, tmp_path / "hub", tensors, sana_repo, tie_word_embeddings=True)
    lines: list[str] = []
    paths = convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lines.append)
    assert "lm_head.weight" not in read_tensors(paths.ar)
    model = AutoModelForCausalLM.from_pretrained(paths.ar)
    assert torch.equal(model.lm_head.weight, embedding)
    warnings = [line for line in lines if "warning" in line]
    if warned:
        max_difference = embedding.abs().max().item()
        assert warnings == [
            "[convert] warning: config.json ties the embeddings but the stored lm_head.weight differs from "
            f"model.embed_tokens.weight (max |difference| {max_difference:.3g}); keeping the embedding as the output "
            "layer, as upstream's transformers (re-ties after loading) and vLLM (skips a tied lm_head.weight) do"
        ]
    else:
        assert warnings == []


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


def shrink_vocab(tensors: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The same checkpoint with an embedding (and lm_head) of only `rows` rows."""
    return {**tensors, "model.embed_tokens.weight": tensors["model.embed_tokens.weight"][:rows],
            "lm_head.weight": tensors["lm_head.weight"][:rows]}


def test_a_marker_beyond_the_rows_is_refused(tiny, sana_repo, tmp_path):
    """Tiny vocabulary: text, then <I0>..<I1023>, then <im_start> <im_end> <S0> <S1> <S2> (the last ids).
    Upstream puts the markers first; either way each used id needs a row."""
    s2 = tiny_tokenizer(tiny).get_vocab()["<S2>"]
    # one row short: only <S2> falls off
    source = sft_checkpoint(tiny, tmp_path / "hub", shrink_vocab(hub_tensors(tiny), s2), vocab_size=s2)
    with pytest.raises(ConversionError) as info:
        convert_blip3o_next(str(source), tmp_path / "out", sana=str(sana_repo), tokens_per_image=16, log=lambda _: None)
    assert str(info.value) == (f"the embedding has {s2} rows but the policy emits or its prompt uses ids beyond them: "
                               f"<S2> id {s2}")
    assert_nothing_written(tmp_path)


def test_a_prompt_token_beyond_the_rows_is_refused(tiny, sana_repo, tmp_path):
    """`<image>` may lie past the rows only while nothing uses it: a chat template that puts it in
    every prompt would feed the model an id without an embedding row."""
    tokenizer = tiny_tokenizer(tiny)
    rows = len(tokenizer)
    source = sft_checkpoint(tiny, tmp_path / "hub", chat_template="<image>" + tokenizer.chat_template)
    with pytest.raises(ConversionError) as info:
        convert_blip3o_next(str(source), tmp_path / "out", sana=str(sana_repo), tokens_per_image=16, log=lambda _: None)
    assert str(info.value) == (f"the embedding has {rows} rows but the policy emits or its prompt uses ids beyond them: "
                               f"<image> (in the rollout prompt) id {rows}")
    assert_nothing_written(tmp_path)


def test_image_tokens_beyond_the_rows_are_refused(tiny, sana_repo, tmp_path):
    table = tiny_tokenizer(tiny).get_vocab()
    rows = table["<I1000>"]
    source = write_hub_checkpoint(tiny, tmp_path / "hub", shrink_vocab(hub_tensors(tiny), rows), sana_repo, vocab_size=rows)
    with pytest.raises(ConversionError) as info:
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)
    message = str(info.value)
    assert message.startswith(f"the embedding has {rows} rows but the policy emits or its prompt uses ids beyond them: "
                              f"image tokens <I1000>..<I1023> (ids {rows}..{table['<I1023>']}), <im_start> id {table['<im_start>']}")
    assert "<im_end>" in message and "<S0>" in message and "\n" not in message
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"image_start_tag_id": 7}, "image_start_tag_id is 7 but the tokenizer has <im_start> at id {<im_start>}"),
        ({"image_end_token_id": 9}, "image_end_token_id is 9 but the tokenizer has <I1023> at id {<I1023>}"),
        ({"scale_start_token_id": 3}, "scale_start_token_id is 3 but the tokenizer has <S0> at id {<S0>}"),
        ({"num_image_tokens": 65536}, "num_image_tokens is 65536 but the tokenizer has 1024 image tokens <I0>, <I1>, ..."),
        ({"image_token_index": 5}, "image_token_index is 5 but the tokenizer has <image> at id {<image>}"),
    ],
)
def test_config_token_ids_must_match_the_tokenizer(tiny, sana_repo, tmp_path, changes, expected):
    source = sft_checkpoint(tiny, tmp_path / "hub", **changes)
    table = {**tiny_tokenizer(tiny).get_vocab(), "<image>": len(tiny_tokenizer(tiny))}
    expected = re.sub(r"\{(<[^>]+>)\}", lambda m: str(table[m.group(1)]), expected)
    with pytest.raises(ConversionError) as info:
        convert_blip3o_next(str(source), tmp_path / "out", sana=str(sana_repo), tokens_per_image=16, log=lambda _: None)
    assert str(info.value) == ("config.json and the tokenizer disagree (the config holds the ids the checkpoint was "
                               f"trained with): {expected}")
    assert_nothing_written(tmp_path)


def test_upstream_image_token_index_sentinel_is_not_an_id(tiny, sana_repo, tmp_path):
    """BLIP3o-NEXT marks images with the constant -200 (blip3o/constants.py), not a token id."""
    source = sft_checkpoint(tiny, tmp_path / "hub", image_token_index=-200)
    paths = convert_blip3o_next(str(source), tmp_path / "out", sana=str(sana_repo), tokens_per_image=16, log=lambda _: None)
    assert paths.layout().tokens_per_image == 16


@pytest.mark.parametrize(
    ("diffusion", "why"),
    [
        ("DIFFUSION", "is neither a local directory nor a hub id that can be fetched here"),  # the public scripts'
        (SANA_HUB_ID, "is neither a local directory nor a hub id that can be fetched here"),  # offline, not cached
        ("/fsx/home/sana", "is neither a local directory nor a hub id that can be fetched here"),  # their cluster
        (None, "names no SANA repo"),
    ],
)
def test_unusable_sana_without_flag_is_one_clear_line(tiny, tmp_path, monkeypatch, diffusion, why):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing resolves offline
    source = sft_checkpoint(tiny, tmp_path / "work" / "hub", diffusion_name_or_path=diffusion)
    with pytest.raises(ConversionError) as info:
        convert_blip3o_next(str(source), tmp_path / "work" / "out", tokens_per_image=16, local_files_only=True,
                            log=lambda _: None)
    message = str(info.value)
    assert why in message and repr(diffusion) in message and "\n" not in message
    assert message.endswith(f"pass --sana {SANA_HUB_ID} (the hub id, or a local copy of that repo)")
    assert_nothing_written(tmp_path / "work")


def test_diffusion_path_that_is_not_a_sana_repo_asks_for_sana(tiny, tmp_path):
    source = sft_checkpoint(tiny, tmp_path / "hub", diffusion_name_or_path=str(tmp_path))
    missing = r"is not a SANA diffusers repo \(SANA diffusers repo .*scheduler_config\.json is missing\): pass --sana"
    with pytest.raises(ConversionError, match=missing):
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, log=lambda _: None)


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
    source = sft_checkpoint(tiny, tmp_path / "hub")
    cli_main(["convert-blip3o-next", str(source), str(tmp_path / "out"), "--sana", str(sana_repo), "--tokens-per-image", "16"])
    assert resolve_model_dir(str(tmp_path / "out")).layout().tokens_per_image == 16
    for argv, says in (([str(source), str(tmp_path / "out")], "already exists"),
                       ([str(tmp_path / "nowhere"), str(tmp_path / "out2")], "not found"),
                       ([str(source), str(tmp_path / "out3")], f"'DIFFUSION' is neither a local directory nor a hub id "
                                                               f"that can be fetched here: pass --sana {SANA_HUB_ID}")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert-blip3o-next", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("blip3o-rl: error: ") and "\n" not in err and says in err


def test_hub_id_hints_carry_the_3b_suffix():
    """Every hub id our code names for BLIP3o-NEXT is a published one (`-3B`, GRPO-TexT spelled as on the hub)."""
    root = Path(__file__).resolve().parents[1]
    texts = {path: path.read_text() for path in [*sorted((root / "policy").glob("*.py")), root / "deploy" / "cli.py"]}
    named = {(path.name, m.group(0)) for path, text in texts.items() for m in re.finditer(r"BLIP3o/BLIP3o-NEXT-[\w-]+", text)}
    assert named, "no hub id named at all"
    published = {"BLIP3o/BLIP3o-NEXT-SFT-3B", "BLIP3o/BLIP3o-NEXT-GRPO-Geneval-3B", "BLIP3o/BLIP3o-NEXT-GRPO-TexT-3B",
                 "BLIP3o/BLIP3o-NEXT-Pretrain-3B"}
    assert {(file, hub_id) for file, hub_id in named if hub_id not in published} == set()


# -- the TA-Tok tower, kept as the image tokenizer -------------------------------------------------


def write_ta_tok_pth(tiny: ModelPaths, path: Path, seed: int | None = None) -> Path:
    """TA-Tok's own checkpoint format (csuhan/TA-Tok ta_tok.pth: {"model": {"args", "sd"}}, the sd with the
    distillation `teacher.*`), from the tiny model's TA-Tok; `seed` re-draws every weight (same shapes), so
    a test can tell which source the converted weights came from. Its teacher is a local folder whose
    config.json is the tiny SigLIP config (what AutoConfig.from_pretrained(teacher) would read)."""
    directory = tiny.image_tokenizer
    teacher = path.parent / "teacher"
    teacher.mkdir(parents=True)
    shutil.copy2(directory / "encoder_config.json", teacher / "config.json")
    state = read_tensors(directory)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(v.shape, generator=generator) for k, v in state.items()}
    args = {**json.loads((directory / "ta_tok_args.json").read_text()), "teacher": str(teacher)}
    torch.save({"model": {"args": args, "sd": {**state, "teacher.proj.weight": torch.zeros(2, 2)}}}, path)
    return path


def test_sft_tower_is_kept_bit_for_bit_and_gives_the_same_ids(tiny, sana_repo, tmp_path):
    """With a ta_tok.pth the checkpoint's tower (not ta_tok.pth's re-drawn weights) becomes image_tokenizer/
    under upstream's names, decode side included, and tokenizes an image exactly as the tiny model's does."""
    source = sft_checkpoint(tiny, tmp_path / "hub")
    ta_tok = write_ta_tok_pth(tiny, tmp_path / "ta" / "ta_tok.pth", seed=5)
    lines: list[str] = []
    convert_blip3o_next(str(source), tmp_path / "out", sana=str(sana_repo), tokens_per_image=16,
                        ta_tok=str(ta_tok.parent), log=lines.append)
    paths = resolve_model_dir(str(tmp_path / "out"))
    assert_same_tensors(read_tensors(tiny.image_tokenizer), read_tensors(paths.image_tokenizer))
    for name in ("ta_tok_args.json", "encoder_config.json"):
        assert (paths.image_tokenizer / name).is_file()
    provenance = json.loads((paths.root / "converted_from.json").read_text())
    assert provenance["image_tokenizer_from"] == "checkpoint" and provenance["dropped"] == []
    assert any("image tokenizer: TA-Tok args from" in line and "weights from the checkpoint" in line for line in lines)
    image = torch.arange(40 * 50 * 3).reshape(40, 50, 3).remainder(251).to(torch.uint8).numpy()
    expected = TATokImageTokenizer.from_dir(tiny.image_tokenizer).encode([image])
    assert torch.equal(load_image_tokenizer(paths).encode([image]), expected)


def test_grpo_layout_takes_the_tower_from_ta_tok_pth(tiny, sana_repo, tmp_path):
    """GRPO checkpoints carry no tower: its weights come from ta_tok.pth (as upstream builds the tower from
    it), without the distillation teacher."""
    source = grpo_checkpoint(tiny, tmp_path / "hub", sana_repo)
    ta_tok = write_ta_tok_pth(tiny, tmp_path / "ta" / "ta_tok.pth", seed=5)
    convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, ta_tok=str(ta_tok), log=lambda _: None)
    stored = torch.load(ta_tok, weights_only=True)["model"]["sd"]
    stored.pop("teacher.proj.weight")
    paths = ModelPaths(tmp_path / "out")
    assert_same_tensors(stored, read_tensors(paths.image_tokenizer))
    assert json.loads((paths.root / "converted_from.json").read_text())["image_tokenizer_from"] == str(ta_tok)


def test_a_tower_that_does_not_fit_ta_tok_pth_is_refused(tiny, sana_repo, tmp_path):
    tensors = hub_tensors(tiny)
    name = TOWER_PREFIX + "bottleneck.in_linear.weight"
    tensors[name] = tensors[name][:, :-1]
    source = write_hub_checkpoint(tiny, tmp_path / "hub", tensors, sana_repo)
    ta_tok = write_ta_tok_pth(tiny, tmp_path / "ta" / "ta_tok.pth")
    with pytest.raises(ConversionError, match=r"TA-Tok tower in the checkpoint .* wrong shapes: bottleneck\.in_linear\.weight"):
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, ta_tok=str(ta_tok), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "ta"]
    with pytest.raises(ConversionError, match=f"TA-Tok checkpoint '{tmp_path / 'nowhere'}': no such file"):
        convert_blip3o_next(str(source), tmp_path / "out", tokens_per_image=16, ta_tok=str(tmp_path / "nowhere"),
                            log=lambda _: None)


def test_without_the_tower_loading_the_image_tokenizer_is_one_clear_error(converted):
    out, _ = converted
    with pytest.raises(ImageTokenizerNotFoundError, match=r"no TA-Tok image tokenizer in .*image_tokenizer .*--ta-tok csuhan/TA-Tok"):
        load_image_tokenizer(ModelPaths(out))
