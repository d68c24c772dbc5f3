"""Base64 PNG/JPEG -> uint8 RGB array, refusing anything odd before it costs memory."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from rewards.app.errors import ApiError
from rewards.scorer import EditSource, mask_of

FORMATS = ["PNG", "JPEG"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (PIL refuses a 0x0 PNG without saying why)."""
    if raw.startswith(PNG_SIGNATURE) and len(raw) >= 24 and raw[12:16] == b"IHDR":
        return struct.unpack(">II", raw[16:24])
    return None


def decode_image(data: str, max_pixels: int, item: int) -> np.ndarray:
    """Decode one item's image; every failure is an ApiError naming the item."""
    if data.startswith("data:"):  # accept data URLs: "data:image/png;base64,...."
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(422, "bad_base64", f"image is not valid base64: {error}", item) from None
    if not raw:
        raise ApiError(422, "bad_image", "image is empty", item)
    size = _png_size(raw)
    if size is not None and 0 in size:
        raise ApiError(422, "bad_image", f"image is {size[0]}x{size[1]}: no pixels", item)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = picture.size  # read from the header; nothing decoded yet
            if width == 0 or height == 0:
                raise ApiError(422, "bad_image", f"image is {width}x{height}: no pixels", item)
            if width * height > max_pixels:
                raise ApiError(
                    413, "image_too_large", f"image is {width}x{height}, more than {max_pixels} pixels", item
                )
            picture.load()
            # Honour EXIF orientation, as GenEval's loaders do.
            return np.asarray(ImageOps.exif_transpose(picture).convert("RGB"))
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ApiError(413, "image_too_large", f"image refused: {error}", item) from None
    except Image.UnidentifiedImageError:
        raise ApiError(422, "bad_image", "image is not a PNG or JPEG (unrecognised data)", item) from None
    except Exception as error:  # PIL raises many types for corrupt data; all mean the same to a client
        raise ApiError(422, "bad_image", f"image is corrupt or truncated: {error}", item) from None


def decode_source(source_image: str | None, mask: str | None, max_pixels: int, item: int) -> EditSource | None:
    """An edit item's source image and mask (None without a source); a mask must be the source's size."""
    if source_image is None:
        return None
    source = decode_image(source_image, max_pixels, item)
    if mask is None:
        return EditSource(source)
    region = mask_of(decode_image(mask, max_pixels, item))  # [H, W] True = edit
    if region.shape != source.shape[:2]:
        raise ApiError(422, "mask_size", f"mask is {region.shape[1]}x{region.shape[0]} but source_image is "
                                         f"{source.shape[1]}x{source.shape[0]}", item)
    return EditSource(source, region)
