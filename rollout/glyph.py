"""The glyph decoder: each image token drawn as a character tile, so a token row is a line of text.

For CPU demos and learning tests (DESIGN.md, "The CPU learning demo is feasible"): deterministic,
no network weights, and a real OCR model can read what the policy "drew". A fixed table maps code
c < len(alphabet) to alphabet[c] and every higher code to a blank tile; with the glyph preset
(64 codes, 8 per image) that is 36 characters + 28 blanks, one line on a 256x64 image. Enough
blanks matter: random rows must earn partial OCR credit for GRPO to get a signal at all.

Characters are drawn on a common baseline at their tile's centre (anchor "ms"), so the row reads
as a word rather than as letters in boxes; wide letters may overhang their tile a little.

The inverse (`images_to_codes`, `GlyphImageEncoder`) reads a drawn row back, tile by tile: each tile's
nearest character template. On the images this decoder draws it is exact (every blank code reads back
as the one `blank_code`), so the edit demo's source image -> ids plays the part TA-Tok plays for
BLIP3o-NEXT (`policy.image_tokenizer.ImageToIds`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from functools import cached_property

import numpy as np
import torch

from policy.vocab import ImageVocab
from rollout.decoder_config import GlyphConfig

BLANK = " "


class GlyphDecoder:
    """Token codes <-> text, and text -> one line of tiles, an RGB image (white background, black text)."""

    def __init__(self, config: GlyphConfig, codebook_size: int, tokens_per_image: int):
        from PIL import ImageFont

        if codebook_size <= len(config.alphabet):
            raise ValueError(
                f"glyph decoder needs blank codes: codebook {codebook_size} <= alphabet {len(config.alphabet)}"
            )
        if not config.font_path.is_file():
            raise FileNotFoundError(
                f"glyph font {config.font_path} not found: install the Debian package fonts-dejavu-core "
                "(scripts/setup.sh does) or set glyph.font_path to a TrueType font"
            )
        self.config = config
        self.codebook_size = codebook_size
        self.tokens_per_image = tokens_per_image
        self.font = ImageFont.truetype(str(config.font_path), config.font_size)
        self.characters = list(config.alphabet) + [BLANK] * (codebook_size - len(config.alphabet))
        self.blank_code = len(config.alphabet)
        # baseline a little below the middle: x-height letters sit centred, descenders still fit
        self.baseline = config.height // 2 + round(0.35 * config.font_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.height, self.tokens_per_image * self.config.tile_width, 3)

    def codes_to_text(self, codes: list[int]) -> str:
        """Codebook indices -> the string they draw (blank codes become spaces)."""
        bad = [c for c in codes if not 0 <= c < self.codebook_size]
        if bad:
            raise ValueError(f"codes {bad} outside the codebook [0, {self.codebook_size})")
        return "".join(self.characters[c] for c in codes)

    def text_to_codes(self, text: str) -> list[int]:
        """The inverse: a string of at most tokens_per_image characters, right-padded with blanks."""
        if len(text) > self.tokens_per_image:
            raise ValueError(f"'{text}' is longer than the {self.tokens_per_image} tokens of an image")
        unknown = sorted({c for c in text if c != BLANK and c not in self.config.alphabet})
        if unknown:
            raise ValueError(f"characters {unknown} are not in the glyph alphabet '{self.config.alphabet}'")
        padded = text.ljust(self.tokens_per_image, BLANK)
        return [self.blank_code if c == BLANK else self.config.alphabet.index(c) for c in padded]

    def render_text(self, text: str) -> np.ndarray:
        """Draw one row of up to tokens_per_image characters: -> [H, W, 3] uint8."""
        from PIL import Image, ImageDraw

        self.text_to_codes(text)  # same checks as a token row
        height, width, _ = self.image_shape
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        tile = self.config.tile_width
        for index, character in enumerate(text):
            if character != BLANK:
                draw.text((index * tile + tile / 2, self.baseline), character, font=self.font, fill="black", anchor="ms")
        return np.asarray(image)  # [H, W, 3]

    @cached_property
    def templates(self) -> np.ndarray:
        """Each character's tile, then the blank tile: [len(alphabet) + 1, H, tile, 3] uint8. Drawn in a
        middle tile (the second), where an overhang into a neighbour is cut off as in any row."""
        position = min(1, self.tokens_per_image - 1)
        tile = self.config.tile_width
        rows = [self.render_text(BLANK * position + c) for c in (*self.config.alphabet, BLANK)]
        return np.stack([row[:, position * tile:(position + 1) * tile] for row in rows])

    def images_to_codes(self, images: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 -> [B, N] codes of their tiles: for each tile the template at the least summed
        squared pixel difference; the blank template reads as `blank_code`. Exact on rows this decoder
        draws (a neighbour's overhang changes a tile by a column of anti-aliased pixels, far less than
        any two characters differ by); the nearest characters on anything else."""
        images = np.asarray(images)
        if images.shape[1:] != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected glyph images of shape [B, {shape}], got {images.shape}")
        height, _, channels = self.image_shape
        count, tile = len(images), self.config.tile_width
        tiles = images.reshape(count, height, self.tokens_per_image, tile, channels).transpose(0, 2, 1, 3, 4)  # [B, N, H, T, 3]
        flat = tiles.reshape(count * self.tokens_per_image, -1).astype(np.int64)  # [B*N, P]
        templates = self.templates.reshape(len(self.templates), -1).astype(np.int64)  # [C, P]
        # |t - c|^2 = |t|^2 + |c|^2 - 2 t.c in integers (exact; numpy's integer product runs no BLAS threads)
        distance = (flat**2).sum(1)[:, None] + (templates**2).sum(1)[None] - 2 * flat @ templates.T  # [B*N, C]
        nearest = distance.argmin(axis=1).reshape(count, self.tokens_per_image)  # [B, N]
        return np.where(nearest < len(self.config.alphabet), nearest, self.blank_code)

    def render_codes(self, codes: torch.Tensor) -> np.ndarray:
        """[B, N] codebook indices -> [B, H, W, 3] uint8."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected [B, {self.tokens_per_image}] codes, got {tuple(codes.shape)}")
        rows = [self.render_text(self.codes_to_text(row)) for row in codes.tolist()]
        return np.stack(rows) if rows else np.zeros((0, *self.image_shape), dtype=np.uint8)


class GlyphTokenDecoder:
    """The glyph decoder behind the worker's decoder interface; AR weights are checked, not used."""

    conditions_on_ar_weights = False
    """A token's tile is the same whatever the weights: tokens of any version render correctly."""

    def __init__(self, vocab: ImageVocab, config: GlyphConfig):
        self.vocab = vocab
        self.glyphs = GlyphDecoder(config, vocab.codebook_size, vocab.tokens_per_image)

    def load_ar_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Glyphs do not depend on the AR weights: nothing to load (the worker tracks the version); the
        weights are still read, so a stream is received whole."""
        for _ in weights:
            pass

    def decode(self, prompt_ids: list[list[int]], image_tokens: torch.Tensor, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()
        images = self.glyphs.render_codes(self.vocab.to_codebook(image_tokens))  # [B, H, W, 3]
        return images, {"render": time.perf_counter() - start}


class GlyphImageEncoder:
    """The glyph decoder's inverse behind `policy.image_tokenizer.ImageToIds` (the glyph demo has no TA-Tok)."""

    def __init__(self, glyphs: GlyphDecoder):
        self.glyphs = glyphs
        self.tokens_per_image = glyphs.tokens_per_image
        self.codebook_size = glyphs.codebook_size

    def encode(self, images: Sequence) -> torch.Tensor:
        """B glyph images ([H, W, 3] uint8) -> [B, N] codebook indices."""
        empty = np.zeros((0, *self.glyphs.image_shape), np.uint8)
        batch = np.stack([np.asarray(image) for image in images]) if len(images) else empty  # [B, H, W, 3]
        return torch.from_numpy(self.glyphs.images_to_codes(batch)).long()  # [B, N]
