"""Images in: every way of passing one, and a clear error naming the field for every bad one."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_image
from hardening import animated, png_claiming
from PIL import Image

from i2v.errors import InputError
from i2v.images import ImageLoader, decode_image

loader = ImageLoader(allow=("127.0.0.1",))  # the loopback test servers


def rule_for(data: bytes, field: str = "start_image") -> str:
    with pytest.raises(InputError) as info:
        decode_image(data, field)
    assert info.value.field == field
    return info.value.rule


def test_local_path_png_jpeg_webp(image_file) -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = loader.load(str(image_file(640, 360, fmt)), "start_image")
        assert image.size == (640, 360) and image.mode == "RGB"


def test_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(make_image(400, 300)).decode()
    assert loader.load(uri, "start_image").size == (400, 300)
    with pytest.raises(InputError, match="malformed data URI"):
        loader.load("data:image/png;base64,%%%notbase64", "end_image")


def test_data_uris_as_clients_write_them() -> None:
    """`;BASE64` in any case (RFC 2397 says case-insensitive), base64 broken into MIME lines (RFC 2045),
    and %-escaped base64 are the same image."""
    encoded = base64.b64encode(make_image(400, 300)).decode()
    lines = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for uri in (
        "data:image/png;BASE64," + encoded,
        "data:image/png;Base64," + lines,
        "data:image/png;base64," + lines.replace("\r\n", "\n"),
        "data:image/png;base64," + encoded.replace("+", "%2B").replace("/", "%2F"),
    ):
        assert loader.load(uri, "start_image").size == (400, 300)


def test_a_cameras_multi_picture_jpeg_is_read_as_its_main_image() -> None:
    main = Image.open(io.BytesIO(make_image(640, 480, "JPEG")))
    second = Image.open(io.BytesIO(make_image(640, 480, "JPEG", seed=3)))
    out = io.BytesIO()
    main.save(out, format="MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(out.getvalue())).format == "MPO"
    image = decode_image(out.getvalue(), "start_image")
    assert image.size == (640, 480)
    expected = decode_image(make_image(640, 480, "JPEG"), "start_image")
    assert abs(int(image.getpixel((10, 10))[0]) - int(expected.getpixel((10, 10))[0])) <= 8


def test_url_from_a_loopback_server(http_dir: tuple[Path, str]) -> None:
    root, base = http_dir
    (root / "a.jpg").write_bytes(make_image(500, 800, "JPEG"))
    assert loader.load(f"{base}/a.jpg", "start_image").size == (500, 800)
    with pytest.raises(InputError, match="HTTP 404") as info:
        loader.load(f"{base}/missing.jpg", "end_image")
    assert info.value.field == "end_image"


ODD_TARGETS = {
    "ftp": "ftp://127.0.0.1/a.png",
    "data": "data:image/png;base64,iVBORw0KGgo=",
    "mailto": "mailto:someone@example.com",
    "javascript": "javascript:alert(1)",
    "file": "file:///etc/passwd",
}


class _Redirects(http.server.BaseHTTPRequestHandler):
    """/hop/N redirects to /hop/N-1; /hop/0 serves an image; /big streams more than the cap."""

    def do_GET(self) -> None:
        if self.path.startswith("/hop/"):
            n = int(self.path.rsplit("/", 1)[1])
            if n > 0:
                self.send_response(302)
                self.send_header("Location", f"/hop/{n - 1}")
                self.end_headers()
                return
            body = make_image(320, 320)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.end_headers()
            for _ in range(12):
                self.wfile.write(b"\0" * 2**20)
        elif self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/hop/0")
            self.end_headers()
        elif self.path.startswith("/to/"):  # /to/<scheme>: a redirect to a URL of that scheme
            self.send_response(302)
            self.send_header("Location", ODD_TARGETS[self.path[4:]])
            self.end_headers()
        elif self.path == "/trickle":  # a byte now and then, for as long as the client waits
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirect_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_redirects_are_followed_up_to_three(redirect_server: str) -> None:
    assert loader.load(f"{redirect_server}/hop/3", "start_image").size == (320, 320)
    with pytest.raises(InputError, match="too many redirects"):
        loader.load(f"{redirect_server}/hop/4", "start_image")


@pytest.mark.parametrize("scheme", sorted(ODD_TARGETS))
def test_redirect_to_another_scheme_is_refused(redirect_server: str, scheme: str) -> None:
    with pytest.raises(InputError) as info:
        loader.load(f"{redirect_server}/to/{scheme}", "end_image")
    assert info.value.field == "end_image"
    assert info.value.rule.startswith(f"the image URL redirected to a {scheme}: URL")
    assert "only http(s) redirects are followed" in info.value.rule


def test_a_trickling_host_is_cut_off_at_the_deadline(redirect_server: str) -> None:
    """One byte every 0.3 s keeps every single read alive; the deadline for the whole fetch still holds."""
    clock = time.monotonic()
    with pytest.raises(InputError, match=r"took longer than 1\.5 s"):
        ImageLoader(allow=("127.0.0.1",), timeout=1.5).load(f"{redirect_server}/trickle", "start_image")
    assert time.monotonic() - clock < 1.5 + 5  # the deadline, plus at most one read's wait (0.3 s here)


def test_download_is_capped_while_streaming(redirect_server: str) -> None:
    with pytest.raises(InputError, match="larger than 10 MB"):
        loader.load(f"{redirect_server}/big", "start_image")


def test_local_paths_can_be_refused(image_file) -> None:
    with pytest.raises(InputError, match="http"):
        ImageLoader(allow_local_paths=False).load(str(image_file(400, 400)), "start_image")
    with pytest.raises(InputError, match="no such image file"):
        loader.load("/nonexistent/a.png", "start_image")
    with pytest.raises(InputError, match="unsupported URL scheme 'file'"):
        loader.load("file:///etc/passwd", "start_image")


def test_exif_orientation_is_applied() -> None:
    image = Image.open(io.BytesIO(make_image(600, 400, "JPEG")))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), "start_image").size == (400, 600)


def test_alpha_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (400, 400), (255, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), "start_image")
    assert image.mode == "RGB" and image.getpixel((10, 10)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a decodable image"),
        (make_image(640, 480, "PNG")[:3000], "corrupt or truncated"),
        (make_image(640, 480, "GIF"), "unsupported image format GIF"),
        (make_image(640, 480, "BMP"), "unsupported image format BMP"),
        (png_claiming(100_000, 100_000), "dimensions are too large"),
        (make_image(299, 400), "at least 300 px"),
        (make_image(400, 299), "at least 300 px"),
        (make_image(1000, 399), "aspect ratio 2.51:1 is outside"),
        (make_image(399, 1000), "aspect ratio 0.40:1 is outside"),
    ],
    ids=["empty", "text", "truncated", "gif", "bmp", "bomb", "narrow", "short", "too-wide", "too-tall"],
)
def test_bad_images_each_get_their_own_error(data: bytes, expected: str) -> None:
    assert expected in rule_for(data)


def test_animated_images_are_refused() -> None:
    assert "animated" in rule_for(animated("WEBP"), "end_image")


def test_limits_are_inclusive() -> None:
    assert decode_image(make_image(300, 300), "start_image").size == (300, 300)
    assert decode_image(make_image(750, 300), "start_image").size == (750, 300)  # exactly 2.5:1


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/a.png", "loopback"),
        ("http://localhost/a.png", "loopback"),
        ("http://[::1]/a.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.5/a.png", "private"),
        ("http://192.168.1.1/a.png", "private"),
        ("http://172.16.0.1/a.png", "private"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[fd00::1]/a.png", "private"),
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://100.64.0.1/a.png", "not a public address"),
        # IPv6 addresses that carry an IPv4 one: the IPv4 address decides
        ("http://[2002:a9fe:a9fe::1]/", "carries the IPv4 address 169.254.169.254, a link-local"),  # 6to4
        ("http://[2002:0a00:0001::]/", "carries the IPv4 address 10.0.0.1, a private"),  # 6to4
        ("http://[64:ff9b::a9fe:a9fe]/", "carries the IPv4 address 169.254.169.254"),  # NAT64
        ("http://[64:ff9b:1::a00:1]/", "carries the IPv4 address 10.0.0.1"),  # local-use NAT64
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "carries the IPv4 address 192.0.2.45"),  # Teredo
        ("http://[::a00:1]/", "carries the IPv4 address 10.0.0.1"),  # IPv4-compatible
        ("http://[::ffff:7f00:1]/", "carries the IPv4 address 127.0.0.1, a loopback"),  # IPv4-mapped
    ],
)
def test_private_and_special_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        ImageLoader(allow=()).load(url, "end_image")  # nothing is sent: the check runs before connecting
    assert info.value.field == "end_image"
    assert "refusing to fetch" in info.value.rule and reason in info.value.rule


def test_every_redirect_hop_is_checked(redirect_server: str) -> None:
    """The first hop is trusted loopback; a redirect to another loopback address is not."""
    with pytest.raises(InputError, match=r"refusing to fetch from 127\.0\.0\.2"):
        ImageLoader(allow=("127.0.0.1",)).load(f"{redirect_server}/elsewhere", "start_image")


def test_allowlist_by_host_name_or_network(http_dir: tuple[Path, str]) -> None:
    root, base = http_dir
    (root / "a.png").write_bytes(make_image(320, 320))
    port = base.rsplit(":", 1)[1]
    assert ImageLoader(allow=("localhost",)).load(f"http://localhost:{port}/a.png", "start_image").size == (
        320,
        320,
    )
    assert ImageLoader(allow=("127.0.0.0/8",)).load(f"{base}/a.png", "start_image").size == (320, 320)


class FakeResolver:
    """Stands in for public DNS (unreachable here): answers a public address, then a private one."""

    def __init__(self) -> None:
        self.answers = ["93.184.215.14", "127.0.0.1"]
        self.calls = 0

    def __call__(self, host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(2, 1, 6, "", (answer, port))]


def test_the_checked_address_is_the_one_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS rebinding: the host is resolved once and the request goes to that checked address."""
    resolver = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    pinned = ImageLoader().pin("https://images.example.com/a.png?x=1", "start_image")
    assert pinned.url == "https://93.184.215.14:443/a.png?x=1"
    assert (pinned.host, pinned.host_header) == ("images.example.com", "images.example.com")
    assert resolver.calls == 1


def test_a_host_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (2, 1, 6, "", ("93.184.215.14", port)),
            (2, 1, 6, "", ("10.0.0.1", port)),
        ],
    )
    with pytest.raises(InputError, match=r"10\.0\.0\.1"):
        ImageLoader().pin("http://mixed.example.com/", "start_image")
