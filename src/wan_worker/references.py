"""Reference images: fetched safely, decoded defensively, and fitted to the job's size.

Fetching refuses anything but http(s), refuses private, loopback, link-local and reserved
addresses (after DNS resolution, and again at every redirect), caps the body size and
bounds the connect and read time. Decoding accepts PNG, JPEG and WEBP, refuses images
over a pixel cap before decoding them, applies EXIF orientation and flattens alpha onto
white. Preparation is one documented policy: center-crop to the target aspect, then resize.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import Settings

RESIZE_POLICY = "center_crop"
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


class ReferenceFetchError(Exception):
    """A reference could not be fetched or decoded; the message is safe to show the user."""


def load_reference(source: str, settings: Settings, deadline: float | None = None) -> Image.Image:
    """Fetch (or decode a data URI) and decode one reference image to RGB."""
    data = _decode_data_uri(source, settings) if source.startswith("data:") else _fetch(source, settings, deadline)
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
    return image.convert("RGB")


def _decode_data_uri(source: str, settings: Settings) -> bytes:
    header, _, payload = source.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ReferenceFetchError("data URI must look like data:image/<type>;base64,<data>")
    if len(payload) > settings.reference_max_bytes * 4 // 3 + 4:
        raise ReferenceFetchError(f"data URI is over the {settings.reference_max_bytes} byte cap")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceFetchError("data URI is not valid base64") from None


def check_host(url: str, settings: Settings) -> None:
    """Refuse non-http(s) URLs and hosts that resolve to non-public addresses."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ReferenceFetchError(f"invalid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ReferenceFetchError(f"URL scheme '{parts.scheme}' is not allowed; use http(s)")
    if not parts.hostname:
        raise ReferenceFetchError("URL has no host")
    if settings.allow_private_reference_urls:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError):
        raise ReferenceFetchError(f"host {parts.hostname} does not resolve") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise ReferenceFetchError(
                f"host {parts.hostname} resolves to a non-public address; private, loopback and "
                "link-local hosts are refused (ALLOW_PRIVATE_REFERENCE_URLS=1 allows them)"
            )


def _fetch(url: str, settings: Settings, deadline: float | None) -> bytes:
    timeout = settings.reference_timeout_s
    overall = time.monotonic() + timeout if deadline is None else min(deadline, time.monotonic() + timeout)
    with requests.Session() as session:
        session.trust_env = False  # no proxies or .netrc credentials from the environment
        for _ in range(settings.reference_max_redirects + 1):
            check_host(url, settings)
            remaining = max(0.05, overall - time.monotonic())  # the job's deadline bounds each request too
            try:
                response = session.get(
                    url, stream=True, timeout=(min(remaining, 5.0), remaining), allow_redirects=False
                )
            except requests.Timeout:
                if deadline is not None and deadline <= overall:
                    raise ReferenceFetchError("timed out at the job deadline (JOB_TIMEOUT_S)") from None
                raise ReferenceFetchError(f"timed out after {timeout:g}s") from None
            except requests.RequestException as exc:
                raise ReferenceFetchError(f"could not connect ({type(exc).__name__})") from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ReferenceFetchError(f"HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > settings.reference_max_bytes:
                    raise ReferenceFetchError(
                        f"body of {declared} bytes is over the {settings.reference_max_bytes} byte cap"
                    )
                return _read_capped(response, settings.reference_max_bytes, overall, timeout)
        raise ReferenceFetchError(f"more than {settings.reference_max_redirects} redirects")


def _read_capped(response: requests.Response, cap: int, overall_deadline: float, timeout: float) -> bytes:
    """Read at most ``cap`` bytes before ``overall_deadline``.

    ``read1`` returns whatever has arrived, so a server that drips a byte at a time still
    meets the overall deadline instead of only the per-read timeout.
    """
    body = bytearray()
    try:
        while chunk := response.raw.read1(64 * 1024):
            body.extend(chunk)
            if len(body) > cap:
                raise ReferenceFetchError(f"body is over the {cap} byte cap")
            if time.monotonic() > overall_deadline:
                raise ReferenceFetchError(f"download took longer than {timeout:g}s")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, urllib3.exceptions.TimeoutError) or "timed out" in str(exc).lower():
            raise ReferenceFetchError(f"timed out after {timeout:g}s") from None
        raise ReferenceFetchError(f"download failed ({type(exc).__name__})") from None
    return bytes(body)
