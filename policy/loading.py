"""Load the pieces of a model directory (tiny or real) onto a device in a dtype from config."""

from __future__ import annotations

import torch

from policy.connector import Connector
from policy.model_dir import ModelPaths
from policy.vocab import ImageVocab

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(paths: ModelPaths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths.ar)


def load_vocab(paths: ModelPaths, tokenizer=None) -> ImageVocab:
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(paths)
    return ImageVocab.from_tokenizer(tokenizer, paths.layout().tokens_per_image)


def load_ar_model(paths: ModelPaths, dtype: str = "float32", device: str = "cpu"):
    """The AR policy as a transformers causal LM (eval mode; callers switch to train)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths.ar, dtype=torch_dtype(dtype))
    return model.to(device).eval()


def load_connector(paths: ModelPaths, dtype: str = "float32", device: str = "cpu") -> Connector:
    return Connector.load(paths.connector).to(device=device, dtype=torch_dtype(dtype))
