"""Uploaded images: bounded in bytes before they are read, in pixels before they are decoded.

Anyone who can reach the server can send anything, so an upload is refused with its own HTTP
status as early as the problem can be seen: a body larger than the limit before it is
buffered (413, see finegrain.serve.guards), bytes that are not one of the common photo formats from their
header (415; PIL's rarer plugins, some of which call out to other programs, are never tried),
and a small file that would decode to gigabytes from the size its header declares (413),
before a pixel is decoded. The decoding itself is the one the index used for its images
(finegrain.data.images.decode_rgb), so a query is read exactly as the indexed copy was.
"""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from finegrain.data.images import decode_rgb
from finegrain.errors import FinegrainError
from finegrain.serve.config import UploadLimits

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone photos)
MULTIPART_OVERHEAD = 64 << 10  # form fields and part headers beside the image


class UploadRefused(FinegrainError):
    """An upload the server will not read; `status` is the HTTP answer, `code` a short name for clients."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def read_upload(data: bytes, limits: UploadLimits) -> np.ndarray:
    """HxWx3 uint8 RGB of an uploaded image, or UploadRefused (413 / 415) saying why not."""
    if len(data) > limits.max_bytes:
        raise UploadRefused(413, "too_large", f"The image has {len(data):,} bytes, more than the limit of "
                                              f"{limits.max_bytes:,}. Send a smaller file.")
    if not data:
        raise UploadRefused(415, "not_an_image", "The upload is empty. Send a JPEG, PNG, WebP, GIF, BMP or TIFF image.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit decides below
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            raise _too_many_pixels("more than PIL's own limit", limits) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):  # PIL's header parsers
            raise UploadRefused(415, "not_an_image", "The upload is not an image in a supported format. Send a "
                                                     "JPEG, PNG, WebP, GIF, BMP or TIFF image.") from None
    if width * height > limits.max_pixels:
        raise _too_many_pixels(f"{width}x{height} = {width * height:,} pixels", limits)
    buffer = io.BytesIO(data)
    try:
        return decode_rgb(buffer)  # type: ignore[arg-type] - PIL opens a file object as it opens a path
    except Exception as error:  # noqa: BLE001 - any decoder failure on an untrusted upload means "not an image"
        text = str(error).replace(str(buffer), "the image")
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        raise UploadRefused(415, "not_an_image", f"The image cannot be decoded ({reason}). Send an intact image "
                                                 "file.") from None


def _too_many_pixels(what: str, limits: UploadLimits) -> UploadRefused:
    return UploadRefused(413, "too_many_pixels", f"The image declares {what}, more than the limit of "
                                                 f"{limits.max_pixels:,} pixels (a small file can decode to "
                                                 "gigabytes). Downscale it and send it again.")
