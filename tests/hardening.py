"""Shared pieces of the hardening tests: a server on the fault-injection backend, and bad images."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from conftest import make_image
from PIL import Image
from serverproc import ServerProcess

TESTS = Path(__file__).parent
FAULT_ENV = {
    "I2V_EXTRA_BACKENDS": "fault_backends:FaultInjection",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")])),
}
NO_LIMITS = {"I2V_CREATE_RATE": "0", "I2V_REQUEST_RATE": "0", "I2V_MAX_UNFINISHED": "0"}


def fault_server(data_dir: Path, log_pipe: bool = False, **env: str) -> ServerProcess:
    """`i2v serve --model fault-injection`: black frames at once, or the fault its prompt asks for."""
    return ServerProcess(data_dir, env={**FAULT_ENV, **env}, model="fault-injection", log_pipe=log_pipe)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image, with one tiny compressed row: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (400, 400), color) for color in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (400, 400), "green").save(out, format="BMP")
    return out.getvalue()


# name -> (bytes, the words the field's error must contain)
BAD_IMAGES: dict[str, tuple[bytes, str]] = {
    "zero-byte": (b"", "empty (0 bytes)"),
    "text": (b"hello, this is not an image\n" * 10, "not a decodable image"),
    "html": (b"<!doctype html><html><body>404</body></html>", "not a decodable image"),
    "truncated-png": (make_image(640, 400)[:2000], "corrupt or truncated"),
    "truncated-jpeg": (make_image(640, 400, fmt="JPEG")[:1500], "corrupt or truncated"),
    "bomb-png": (png_claiming(100_000, 100_000), "too large"),
    "animated-gif": (animated("GIF"), "unsupported image format GIF"),
    "animated-webp": (animated("WEBP"), "animated images are not accepted"),
    "bmp": (bmp(), "unsupported image format BMP"),
    "too-small": (make_image(200, 200), "at least 300 px"),
    "too-wide": (make_image(1200, 300), "aspect ratio"),
}
