"""Reference images: fetched safely, decoded defensively, and fitted to the job's size.

Fetching goes through ``net.fetch``: one strict URL parser, one DNS lookup whose checked
address is the one connected to (private, loopback, link-local and reserved addresses refused
unless ALLOW_PRIVATE_REFERENCE_URLS), every redirect hop checked again, a byte cap, and one
deadline for the whole download. Data URIs are matched case-insensitively. Decoding accepts
PNG, JPEG and WEBP, refuses images over a pixel cap before decoding them, applies EXIF
orientation, scales 16-bit grayscale to 8 bits and flattens alpha onto white. Preparation is one documented policy: center-crop to the target aspect, then resize.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_worker.contract.settings import Settings
from wan_worker.infra import net

RESIZE_POLICY = "center_crop"
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


class ReferenceFetchError(Exception):
    """A reference could not be fetched or decoded; the message is safe to show the user."""


def load_reference(source: str, settings: Settings, deadline: float | None = None) -> Image.Image:
    """Fetch (or decode a data URI) and decode one reference image to RGB."""
    is_data = source[:5].lower() == "data:"
    data = _decode_data_uri(source, settings) if is_data else _fetch(source, settings, deadline)
    return decode_image(data, settings)


def prepare(image: Image.Image, width: int, height: int) -> Image.Image:
    """Center-crop to the target aspect, then resize to exactly width x height."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            pixels = probe.size[0] * probe.size[1]
            if fmt not in ALLOWED_FORMATS:
                raise ReferenceFetchError(f"unsupported image format {fmt}; allowed: PNG, JPEG, WEBP")
            if pixels > settings.reference_max_pixels:
                raise ReferenceFetchError(
                    f"image is {probe.size[0]}x{probe.size[1]} pixels, over the cap of {settings.reference_max_pixels}"
                )
            probe.load()
            image = ImageOps.exif_transpose(probe)
    except ReferenceFetchError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ReferenceFetchError(f"not a decodable image ({type(exc).__name__})") from None
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode.startswith("I"):  # 16/32-bit grayscale: Pillow's own convert clips to white
        return _wide_gray_to_l(image).convert("RGB")
    return image.convert("RGB")


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale (``I;16*``, or ``I`` holding 0-65535) to 8 bits."""
    wide = np.asarray(image.convert("I"), dtype=np.int64)
    return Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8), "L")


def _decode_data_uri(source: str, settings: Settings) -> bytes:
    header, _, payload = source.partition(",")
    header = header.lower()  # scheme and media type are case-insensitive (RFC 2397), as the schema accepts
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ReferenceFetchError("data URI must look like data:image/<type>;base64,<data>")
    if len(payload) > settings.reference_max_bytes * 4 // 3 + 4:
        raise ReferenceFetchError(f"data URI is over the {settings.reference_max_bytes} byte cap")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceFetchError("data URI is not valid base64") from None


def _fetch(url: str, settings: Settings, deadline: float | None) -> bytes:
    try:
        return net.fetch(
            url,
            max_bytes=settings.reference_max_bytes,
            timeout_s=settings.reference_timeout_s,
            deadline=deadline,
            allow_private=settings.allow_private_reference_urls,
            max_redirects=settings.reference_max_redirects,
        )
    except net.OutboundError as exc:
        raise ReferenceFetchError(_with_hint(str(exc))) from None


def _with_hint(message: str) -> str:
    if "non-public" in message:
        return message + " (ALLOW_PRIVATE_REFERENCE_URLS=1 allows them)"
    return message
