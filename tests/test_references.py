"""Safe fetching, decoding and preparation of reference images, against a real HTTP server."""

from __future__ import annotations

import base64
import io
import time
from textwrap import dedent

import numpy as np
import pytest
from helpers import netns
from helpers.refserver import RefServer, png_bytes
from PIL import Image

from wan_worker.contract.settings import Settings
from wan_worker.stages import references as R


@pytest.fixture(scope="module")
def server():
    srv = RefServer()
    yield srv
    srv.close()


def settings(**overrides) -> Settings:
    base = dict(allow_private_reference_urls=True, reference_timeout_s=2.0, reference_max_bytes=2 * 1024 * 1024)
    return Settings(**{**base, **overrides})


def test_fetches_and_decodes_png(server):
    image = R.load_reference(server.url("/red.png"), settings())
    assert image.mode == "RGB" and image.size == (320, 200)
    assert image.getpixel((100, 50)) == (220, 30, 30)


def test_alpha_is_flattened_onto_white(server):
    image = R.load_reference(server.url("/alpha.png"), settings())
    assert image.mode == "RGB"
    r, _g, b = image.getpixel((100, 50))
    assert r > 100 and b > 100  # half-transparent green over white, not over black


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    decoded = R.decode_image(buf.getvalue(), settings())
    assert decoded.size == (20, 40)


def test_data_uri_is_accepted_and_bad_base64_refused():
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((1, 2, 3))).decode()
    assert R.load_reference(uri, settings()).size == (320, 200)
    with pytest.raises(R.ReferenceFetchError, match="base64"):
        R.load_reference("data:image/png;base64,!!notbase64!!", settings())


def test_private_address_refused_by_default(server):
    with pytest.raises(R.ReferenceFetchError, match="non-public"):
        R.load_reference(server.url("/red.png"), settings(allow_private_reference_urls=False))


@pytest.mark.skipif(not netns.available(), reason="needs unshare -n (root) for a loopback-only network namespace")
def test_redirect_target_is_checked_too():
    """A public host's redirect to 127.0.0.1 must still be refused.

    The public host is a server on ``netns.PUBLIC`` inside a loopback-only network namespace:
    the connection goes to the checked address, so the public host must really be there.
    """
    result = netns.run_isolated(
        dedent(
            f"""
            import json
            from helpers.refserver import RefServer
            from wan_worker.stages import references as R
            from wan_worker.contract.settings import Settings

            server = RefServer(host="{netns.PUBLIC}")
            url = server.url("/redirect?to=http://127.0.0.1:1/red.png")
            try:
                R.load_reference(url, Settings(allow_private_reference_urls=False, reference_timeout_s=5))
                error = None
            except R.ReferenceFetchError as exc:
                error = str(exc)
            print(json.dumps({{"error": error, "hits": server.hits}}))
            """
        )
    )
    with pytest.raises(R.ReferenceFetchError, match="non-public"):
        if result["error"] is not None:
            raise R.ReferenceFetchError(result["error"])
    assert any(hit.startswith("/redirect") for hit in result["hits"])


def test_scheme_other_than_http_refused():
    with pytest.raises(R.ReferenceFetchError, match="scheme"):
        R.load_reference("file:///etc/passwd", settings())


def test_oversize_body_refused(server):
    with pytest.raises(R.ReferenceFetchError, match="byte cap"):
        R.load_reference(server.url("/big.png"), settings())


def test_non_image_refused(server):
    with pytest.raises(R.ReferenceFetchError, match="not a decodable image"):
        R.load_reference(server.url("/notimage"), settings())


def test_decompression_bomb_refused_before_decoding(server):
    with pytest.raises(R.ReferenceFetchError, match="over the cap"):
        R.load_reference(server.url("/bomb.png"), settings(reference_max_bytes=20 * 1024 * 1024))


@pytest.mark.parametrize("path", ["/hang", "/drip"])
def test_slow_hosts_are_bounded_in_time(server, path):
    started = time.monotonic()
    with pytest.raises(R.ReferenceFetchError, match=r"timed out|longer than"):
        R.load_reference(server.url(path), settings(reference_timeout_s=1.0))
    assert time.monotonic() - started < 4.0


def test_prepare_center_crops_to_target_aspect():
    # 320x200 image with a white diagonal from the top-left; target is portrait 64x128.
    source = Image.open(io.BytesIO(png_bytes((200, 10, 10))))
    fitted = R.prepare(source.convert("RGB"), 64, 128)
    assert fitted.size == (64, 128)
    # Center crop keeps the middle columns: the left edge of the source (x=0) is cut away.
    assert fitted.getpixel((0, 0))[0] > 150


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = (np.arange(64, dtype=np.uint32).reshape(1, 64).repeat(8, 0) * 1024).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode in ("I;16", "I")
    decoded = R.decode_image(buf.getvalue(), settings())
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (0, 0, 0)
    assert decoded.getpixel((32, 0)) == (127, 127, 127)  # 32768 of 65535 is mid-gray
    assert decoded.getpixel((63, 0)) == (251, 251, 251)  # 64512 // 257


@pytest.mark.parametrize("prefix", ["DATA:IMAGE/PNG;BASE64,", "Data:Image/Png;Base64,", "data:image/PNG;base64,"])
def test_data_uri_scheme_and_media_type_are_case_insensitive(prefix):
    uri = prefix + base64.b64encode(png_bytes((1, 2, 3))).decode()
    image = R.load_reference(uri, settings())
    assert image.size == (320, 200) and image.getpixel((100, 50)) == (1, 2, 3)
