"""Vocabulary layout of an AR image generator (BLIP3o-NEXT style).

The text tokenizer is extended with a contiguous block of image tokens `<I0>..<I{K-1}>` (one per
VQ-SigLIP2 codebook entry) and the markers `<im_start>`, `<im_end>`, `<S0>`, `<S1>`, `<S2>`.
An image is `tokens_per_image` image tokens sampled after `<im_start><S0>`. A source image in a prompt is
its tokenizer's codes shifted into the same block (`to_token_ids`), placed where the chat text has
`<image>` (`IMAGE_PLACEHOLDER`; upstream replaces it by the embedded ids, so it is never a token itself).
Contiguity is what lets every log-prob in the project be a slice of the logits, never a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_PLACEHOLDER = "<image>"
"""Where a source image goes in a chat turn (BLIP3o-NEXT's DEFAULT_IMAGE_TOKEN, blip3o/constants.py)."""
IM_START = "<im_start>"
IM_END = "<im_end>"
SCALE_TOKENS = ("<S0>", "<S1>", "<S2>")


def image_token(index: int) -> str:
    return f"<I{index}>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens sit in the AR vocabulary."""

    image_token_start: int
    """Token id of `<I0>`."""
    codebook_size: int
    """Number of image tokens (65,536 for BLIP3o-NEXT's TA-Tok codebook)."""
    tokens_per_image: int
    """Image tokens sampled per image (729 = 27x27 at scale `<S0>` in BLIP3o-NEXT)."""
    im_start_id: int
    im_end_id: int
    scale_ids: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.codebook_size <= 0 or self.tokens_per_image <= 0:
            raise ValueError("codebook_size and tokens_per_image must be positive")

    @property
    def image_token_end(self) -> int:
        """One past the id of the last image token."""
        return self.image_token_start + self.codebook_size

    def image_token_ids(self) -> list[int]:
        return list(range(self.image_token_start, self.image_token_end))

    def is_image_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        return (token_ids >= self.image_token_start) & (token_ids < self.image_token_end)

    def to_codebook(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids -> codebook indices; refuses anything that is not an image token."""
        if not bool(self.is_image_token(token_ids).all()):
            raise ValueError("to_codebook got ids outside the image-token range")
        return token_ids - self.image_token_start

    def to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        if bool(((codes < 0) | (codes >= self.codebook_size)).any()):
            raise ValueError(f"codebook indices must lie in [0, {self.codebook_size})")
        return codes + self.image_token_start

    @classmethod
    def from_tokenizer(cls, tokenizer, tokens_per_image: int) -> "ImageVocab":
        """Read the layout from a tokenizer, checking the image tokens are contiguous."""
        first = tokenizer.convert_tokens_to_ids(image_token(0))
        unk = getattr(tokenizer, "unk_token_id", None)
        if first is None or first == unk:
            raise ValueError(f"tokenizer has no {image_token(0)} token: not an image-generator vocabulary")
        size = 0
        vocab = tokenizer.get_vocab()
        while image_token(size) in vocab:
            if vocab[image_token(size)] != first + size:
                raise ValueError(f"image tokens are not contiguous at {image_token(size)}")
            size += 1
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END, *SCALE_TOKENS)]
        missing = [t for t, i in zip((IM_START, IM_END, *SCALE_TOKENS), ids) if i is None or i == unk]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        return cls(
            image_token_start=first,
            codebook_size=size,
            tokens_per_image=tokens_per_image,
            im_start_id=ids[0],
            im_end_id=ids[1],
            scale_ids=(ids[2], ids[3], ids[4]),
        )
