"""Synthetic edit sets for the CPU demos (`blip3o-rl prompts edit`): rendered words to rewrite.

Each edit is a row of two 3-letter words drawn by the glyph demo's own renderer (rollout/glyph.py,
the `glyph` tiny preset: 8 tiles of 32 x 64 px, a 256 x 64 image), e.g. "cat sun"; the instruction
asks to change one of them ("change the word cat to dog"); the mask covers that word's 3 tiles
(white) and `target.text` is the new word. The other word is the background the edit must keep.
Because the source is exactly what the glyph decoder draws for a token row, the glyph demo's
inverse (a tile -> its token) reads the source back into tokens without loss.

The three words of an edit are distinct, so the new word is never already in the source (a copy of
the source cannot pass the OCR check). Training sets draw from TRAIN_WORDS, evaluation sets from
EVAL_WORDS (rl/prompts/edit.py): disjoint lists, so no evaluation instruction, source or target word
is trained on, and the prompt sources refuse a training file holding an evaluation target.
Both are pure functions of (n, seed, split): the same arguments write the same files.

Files: the JSONL at `--out`; images under `images/` and masks under `masks/` beside it, named by
content (`images/cat_sun.png`, `masks/tiles_0_3.png`), so a train and an eval set may share a folder.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from rl.prompts.edit import EVAL_WORDS, TRAIN_WORDS
from rl.prompts.generators import Log, PromptSetError, write_lines
from rl.prompts.sources import PromptSourceConfig

if TYPE_CHECKING:
    from rl.evaluation.config import EvalSection

Split = Literal["train", "eval"]
INSTRUCTION = "change the word {word} to {new}"


@dataclass(frozen=True)
class SyntheticEdit:
    """Change `word` to `new` in the row "word context" (`word_first`) or "context word"."""

    word: str
    new: str
    context: str
    word_first: bool

    @property
    def text(self) -> str:
        """The source row, e.g. "cat sun"."""
        return f"{self.word} {self.context}" if self.word_first else f"{self.context} {self.word}"

    @property
    def tiles(self) -> tuple[int, int]:
        """(first tile, tile count) of the word to change."""
        return (0 if self.word_first else len(self.context) + 1), len(self.word)

    def line(self) -> dict:
        start, count = self.tiles
        return {"prompt": INSTRUCTION.format(word=self.word, new=self.new),
                "image": f"images/{self.text.replace(' ', '_')}.png",
                "mask": f"masks/tiles_{start}_{count}.png", "target": {"text": self.new}}


def edit_space(words: Sequence[str], targets: Sequence[str]) -> list[SyntheticEdit]:
    """Every edit of these words: three distinct words of `words` (no `targets`), or two distinct source
    words and a target that is neither."""
    if not targets:
        return [SyntheticEdit(w, new, c, first) for w, new, c in itertools.permutations(words, 3) for first in (True, False)]
    return [SyntheticEdit(w, new, c, first) for w, c in itertools.permutations(words, 2) for new in targets
            if new not in (w, c) for first in (True, False)]


def check_words(words: Sequence[str], targets: Sequence[str], split: Split, row_tiles: int) -> None:
    """PromptSetError unless every row fits the glyph row, every target fits its word's tiles (the mask)
    and a training set keeps clear of the evaluation words."""
    longest = sorted(words, key=len)[-2:]
    if len(words) < 2 or sum(map(len, longest)) + 1 > row_tiles:
        raise PromptSetError(f"two source words and a space must fit the {row_tiles} tiles of a row: {list(words)}")
    if targets and max(map(len, targets)) > min(map(len, words)):
        raise PromptSetError(f"a target must fit the tiles of the word it replaces (the mask): targets {list(targets)}, "
                             f"words {list(words)}")
    evaluated = sorted((set(words) | set(targets)) & set(EVAL_WORDS)) if split == "train" else []
    if evaluated:
        raise PromptSetError(f"{evaluated} are words of the synthetic edit evaluation set: a training set cannot use them")


def draw_edits(n: int, seed: int, split: Split, words: Sequence[str] = (), targets: Sequence[str] = ()) -> list[SyntheticEdit]:
    """n distinct edits drawn without replacement: of the split's words (three distinct words each), or of
    `words` changed to `targets`."""
    words = tuple(words) or (TRAIN_WORDS if split == "train" else EVAL_WORDS)
    space = edit_space(words, tuple(targets))
    if not 1 <= n <= len(space):
        raise PromptSetError(f"--n must be between 1 and {len(space)} (distinct {split} edits), got {n}")
    chosen = np.random.default_rng(seed).choice(len(space), size=n, replace=False)
    return [space[int(i)] for i in chosen]


def glyph_renderer():
    """The glyph demo's decoder (tiny preset `glyph`, default glyph config): its `render_text` draws a row."""
    from policy.tiny import PRESETS
    from rollout.decoder_config import GlyphConfig
    from rollout.glyph import GlyphDecoder

    spec = PRESETS["glyph"]
    return GlyphDecoder(GlyphConfig(), spec.codebook_size, spec.tokens_per_image)


def tile_mask(shape: tuple[int, ...], tile_width: int, start: int, count: int) -> np.ndarray:
    """uint8 [H, W]: 255 over tiles start..start+count-1 (every row), 0 elsewhere."""
    mask = np.zeros(shape[:2], dtype=np.uint8)
    mask[:, start * tile_width : (start + count) * tile_width] = 255
    return mask


def write_edit_set(out: Path, n: int, seed: int, split: Split = "train", log: Log = print,
                   words: Sequence[str] = (), targets: Sequence[str] = ()) -> list[str]:
    """Draw n edits of `split` (or of `words` changed to `targets`), write their images, masks and the
    JSONL at `out`; the lines written."""
    if out.is_dir():
        raise PromptSetError(f"cannot write {out}: it is a directory")
    glyphs = glyph_renderer()
    if words or targets:
        check_words(tuple(words) or (TRAIN_WORDS if split == "train" else EVAL_WORDS), targets, split,
                    glyphs.tokens_per_image)
    edits = draw_edits(n, seed, split, words, targets)
    log(f"edit ({split}): {n} edits of {len(words or (TRAIN_WORDS if split == 'train' else EVAL_WORDS))} words "
        f"(seed {seed})")
    lines = [edit.line() for edit in edits]
    files: dict[str, np.ndarray] = {}
    for edit, line in zip(edits, lines):
        if line["image"] not in files:
            files[line["image"]] = glyphs.render_text(edit.text)  # [H, W, 3]
        if line["mask"] not in files:
            files[line["mask"]] = tile_mask(glyphs.image_shape, glyphs.config.tile_width, *edit.tiles)  # [H, W]
    try:
        for name, pixels in files.items():
            (out.parent / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out.parent / name)
    except OSError as error:
        raise PromptSetError(f"cannot write the images beside {out}: {error.strerror or error}") from None
    encoded = [json.dumps(line) for line in lines]
    write_lines(out, encoded)
    log(f"wrote {len(lines)} edits to {out} ({len(files)} images and masks under {out.parent})")
    return encoded


def ensure_synthetic_sources(sources: Sequence[PromptSourceConfig], log: Log = print) -> None:
    """Write the synthetic edit set of every edit source that asks for one (`synthetic`) and whose file
    does not exist yet (as `model.make_tiny` builds the model): the CPU edit demos need no command first."""
    for source in sources:
        if source.kind == "edit" and source.synthetic is not None and not source.path.exists():
            spec = source.synthetic
            write_edit_set(source.path, spec.n, spec.seed, "train", log, spec.words, spec.targets)


def ensure_synthetic_eval(section: EvalSection | None, log: Log = print) -> None:
    """Write the in-run edit eval's synthetic set (`eval.synthetic_edits`: evaluation words) at
    `eval.edit_data.path` where it does not exist yet."""
    if section is None or section.synthetic_edits is None or section.edit_data.path.exists():
        return
    spec = section.synthetic_edits
    write_edit_set(section.edit_data.path, spec.n, spec.seed, "eval", log, spec.words, spec.targets)
