"""Edit prompts in the AR rollout worker: a source image -> its image-token codes -> the prompt's `<image>` span.

Which reader turns a source into codes is chosen once, from the rollout config (a run config copies the
decoder's kind), else from the decoder recorded in the model directory:

    ta_tok   BLIP3o-NEXT's TA-Tok (policy/image_tokenizer.py), from the model directory's image_tokenizer/,
             in the engine's dtype on its device (upstream runs it in the model's dtype)
    glyph    the glyph decoder's exact inverse (rollout/glyph.py `GlyphImageEncoder`): a tile -> its token

Both are an `ImageToIds`. The worker loads its reader at the first edit prompt, so a text-to-image run
never loads TA-Tok. The prompt is `policy.prompt.edit_prompt_ids` (upstream's `<image>` turn); a row
without a source keeps the text-to-image prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from policy.image_tokenizer import ImageToIds
from policy.model_dir import ModelPaths
from policy.prompt import edit_prompt_ids, rollout_prompt_ids
from policy.vocab import ImageVocab
from rollout.config import RolloutConfig


def source_reader(config: RolloutConfig, paths: ModelPaths, vocab: ImageVocab, dtype: torch.dtype) -> ImageToIds:
    """The reader of source images for this engine (module docstring)."""
    kind = config.source_tokenizer or ("glyph" if paths.layout().decoder == "glyph" else "ta_tok")
    if kind == "glyph":
        from rollout.glyph import GlyphDecoder, GlyphImageEncoder

        return GlyphImageEncoder(GlyphDecoder(config.glyph, vocab.codebook_size, vocab.tokens_per_image))
    from policy.image_tokenizer import load_image_tokenizer

    return load_image_tokenizer(paths, vocab, dtype=dtype, device=config.device)


def prompt_rows(tokenizer, vocab: ImageVocab, config: RolloutConfig, captions: Sequence[str],
                sources: Sequence[np.ndarray | None], reader) -> list[list[int]]:
    """The prompt ids of each caption: the edit prompt around its source's codes, or the text-to-image
    prompt where its source is None. `reader()` gives the `ImageToIds` (called only if some row is an edit)."""
    if len(sources) != len(captions):
        raise ValueError(f"{len(sources)} sources for {len(captions)} captions: give one per caption (None: text to image)")
    edits = [row for row, source in enumerate(sources) if source is not None]
    codes = reader().encode([np.asarray(sources[row]) for row in edits]) if edits else None  # [E, N]
    position = {row: k for k, row in enumerate(edits)}
    return [
        rollout_prompt_ids(tokenizer, caption, config.instruction, config.system_prompt) if row not in position
        else edit_prompt_ids(tokenizer, vocab, caption, codes[position[row]], config.edit_turn, config.system_prompt)
        for row, caption in enumerate(captions)
    ]
