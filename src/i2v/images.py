"""Images in: fetch (http/https URL, data URI, local path), decode, normalise and check against Kling's rules.

Every failure is an `InputError` naming the field (`start_image`, `end_image`) and the rule.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, InputError

MAX_BYTES = 10 * 1024 * 1024
MIN_SIDE = 300
MAX_ASPECT = 2.5
MAX_PIXELS = 40_000_000  # decompression-bomb guard: far above any real photo we could use
FORMATS = {"JPEG", "PNG", "WEBP"}
# A camera's multi-picture JPEG (stereo or depth views after the main image): read as its first, main image.
MULTI_PICTURE = "MPO"
MAX_REDIRECTS = 3
FETCH_TIMEOUT = 30.0  # seconds for a whole fetch: every redirect hop, the connection and the body
READ_TIMEOUT = 10.0  # seconds any one network operation may wait (never past the fetch's deadline)
_WHITESPACE = re.compile(rb"[ \t\r\n\f\v]+")
# IPv6 forms that carry an IPv4 address the packet is really for (RFC 6052 NAT64, its local-use prefix of
# RFC 8215, and the deprecated IPv4-compatible form); 6to4, Teredo and IPv4-mapped have ipaddress helpers.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class RedirectRefused(httpx.HTTPError):
    """A response redirected to something that is not http(s) (`data:`, `mailto:`, `javascript:` ...)."""


def refuse_odd_redirects(response: httpx.Response) -> None:
    """An httpx response hook: a redirect to a non-http(s) URL is refused before httpx reads the Location
    (httpx cannot build a request for `data:` and would raise an error that is not an HTTPError)."""
    if response.has_redirect_location:
        location = response.headers["location"]
        scheme = urlsplit(location).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            shown = location if len(location) <= 60 else location[:57] + "..."
            raise RedirectRefused(
                f"redirected to a {scheme}: URL ({shown}); only http(s) redirects are followed"
            )


def embedded_ipv4(address: IPAddress) -> Iterator[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (IPv4-mapped and -compatible, 6to4, Teredo, NAT64)."""
    if address.version != 6:
        return
    assert isinstance(address, ipaddress.IPv6Address)
    if address.ipv4_mapped is not None:
        yield address.ipv4_mapped
    if address.sixtofour is not None:
        yield address.sixtofour
    if address.teredo is not None:
        yield from address.teredo  # (server, client)
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in net for net in _NAT64):
        yield last32
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1
        yield last32


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Pinned:
    """A URL rewritten to the one address that was checked, with what the server must still see."""

    url: str
    host: str  # for the Host header and TLS (SNI and certificate checks)
    host_header: str


@dataclass(frozen=True)
class ImageLoader:
    """How image references are resolved. The CLI and library allow local paths; the server does not.

    URLs may only reach public addresses: private, loopback, link-local (cloud metadata), multicast and
    reserved ranges are refused, for the first request and every redirect. `allow` lists trusted hosts or
    networks an operator opens anyway (setting `I2V_FETCH_ALLOW`, comma-separated: `files.lan,10.0.0.0/8`).
    """

    allow_local_paths: bool = True
    timeout: float = FETCH_TIMEOUT  # for the whole fetch, not per read: a host trickling bytes is cut off
    max_bytes: int = MAX_BYTES
    allow: tuple[str, ...] = ()

    def load(self, ref: str, field: str) -> Image.Image:
        """Fetch, decode and check one image; returns an RGB image, EXIF orientation applied."""
        return decode_image(self.read_bytes(ref, field), field)

    def read_bytes(self, ref: str, field: str) -> bytes:
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch(ref, field)
        if scheme == "data":
            return self._data_uri(ref, field)
        if len(scheme) > 1:  # single letters are Windows drive names, not schemes
            raise InputError(field, f"unsupported URL scheme '{scheme}': use http, https or a data URI")
        if not self.allow_local_paths:
            raise InputError(field, "must be an http(s) URL, a data URI or an uploaded file's URL")
        return self._local(Path(ref), field)

    def _local(self, path: Path, field: str) -> bytes:
        if not path.is_file():
            raise InputError(field, f"no such image file: {path}")
        if path.stat().st_size > self.max_bytes:
            raise too_large(field, self.max_bytes)
        return path.read_bytes()

    def _data_uri(self, uri: str, field: str) -> bytes:
        """RFC 2397: `;base64` in any case; the base64 may be broken into lines (RFC 2045) or %-escaped."""
        header, sep, payload = uri.partition(",")
        if not sep:
            raise InputError(field, "malformed data URI: no ',' before the data")
        try:
            if header.lower().endswith(";base64"):
                text = _WHITESPACE.sub(b"", payload.encode("ascii"))
                if b"%" in text:
                    text = unquote_to_bytes(text)
                if len(text) > self.max_bytes * 4 // 3 + 4:
                    raise too_large(field, self.max_bytes)
                return base64.b64decode(text, validate=True)
            if len(payload) > self.max_bytes * 3:
                raise too_large(field, self.max_bytes)
            return unquote_to_bytes(payload)
        except UnicodeEncodeError:
            raise InputError(field, "malformed data URI: base64 data is ASCII") from None
        except (binascii.Error, ValueError) as exc:
            raise InputError(field, f"malformed data URI: {exc}") from None

    def _fetch(self, url: str, field: str) -> bytes:
        """GET with the SSRF guard on every hop, under one deadline for the whole fetch."""
        deadline = time.monotonic() + self.timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InputError(field, f"fetching the image took longer than {self.timeout:g} s")
            return remaining

        # Redirects are followed by hand so that every hop is checked the same way as the first.
        hooks = {"response": [refuse_odd_redirects]}
        with httpx.Client(follow_redirects=False, trust_env=False, event_hooks=hooks) as client:
            for _ in range(MAX_REDIRECTS + 1):
                pinned = self.pin(url, field)
                try:
                    # Connect to the address that was checked (no second DNS lookup to rebind), while the
                    # server still sees its own name in Host and in TLS.
                    with client.stream(
                        "GET", pinned.url, headers={"Host": pinned.host_header},
                        extensions={"sni_hostname": pinned.host}, timeout=min(READ_TIMEOUT, left()),
                    ) as response:  # fmt: skip
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise InputError(field, f"fetching the image failed: HTTP {response.status_code}")
                        return self._read_capped(response, field, left)
                except RedirectRefused as exc:
                    raise InputError(field, f"the image URL {exc}") from None
                except (httpx.HTTPError, httpx.InvalidURL) as exc:
                    if isinstance(exc, httpx.TimeoutException) and deadline - time.monotonic() <= 0:
                        left()  # the deadline, not the read timeout, is what ran out: say so
                    raise InputError(
                        field, f"fetching the image failed: {type(exc).__name__}: {exc}"
                    ) from None
        raise InputError(field, f"too many redirects (at most {MAX_REDIRECTS})")

    def pin(self, url: str, field: str) -> Pinned:
        """Check a URL's scheme and every address its host resolves to; pin it to the first one."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InputError(field, f"unsupported URL scheme '{parts.scheme}': use http or https")
        host = parts.hostname
        if not host:
            raise InputError(field, "URL has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InputError(field, "URL has an invalid port") from None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise InputError(field, f"could not resolve host '{host}'") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        for address in addresses:
            reason = self._refusal(host, address)
            if reason:
                raise InputError(field, f"refusing to fetch from {host} ({address}): {reason}")
        address = addresses[0]
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{port}"
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        pinned = parts._replace(netloc=netloc).geturl()
        return Pinned(url=pinned, host=host, host_header=host_header)

    def _refusal(self, host: str, address: IPAddress) -> str | None:
        """Why an address may not be fetched from, or None when it may."""
        for entry in self.allow:
            if entry.lower() == host.lower():
                return None
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return None
            except ValueError:  # a host name entry
                continue
        for inner in embedded_ipv4(address):  # ::ffff:10.0.0.1, 2002:a9fe:a9fe::, 64:ff9b::10.0.0.1 ...
            reason = self._refusal(host, inner)
            if reason:
                return f"it carries the IPv4 address {inner}, {reason}"
        checks = [
            (address.is_loopback, "a loopback address"),
            (address.is_link_local, "a link-local address (cloud metadata lives here)"),
            (address.is_multicast, "a multicast address"),
            (address.is_unspecified, "an unspecified address"),
            (address.is_private, "a private network address"),
            (address.is_reserved, "a reserved address"),
            (not address.is_global, "not a public address"),
        ]
        for refused, reason in checks:
            if refused:
                return f"{reason}; an operator can trust it with I2V_FETCH_ALLOW"
        return None

    def _read_capped(self, response: httpx.Response, field: str, left: Any) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large(field, self.max_bytes)
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large(field, self.max_bytes)
            left()  # a host sending a byte now and then is still cut off at the deadline
        return bytes(body)


def too_large(field: str, max_bytes: int = MAX_BYTES) -> ImageTooLarge:
    return ImageTooLarge(field, f"image is larger than {max_bytes // 2**20} MB")


def decode_image(data: bytes, field: str) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes into an upright RGB image, or say precisely why not."""
    if not data:
        raise InputError(field, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS | {MULTI_PICTURE}:
                raise InputError(field, f"unsupported image format {image.format}: use JPEG, PNG or WebP")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InputError(field, f"image is too large ({width}x{height}); at most {MAX_PIXELS} pixels")
            if image.format != MULTI_PICTURE and getattr(image, "n_frames", 1) > 1:
                raise InputError(field, "animated images are not accepted: send a single still frame")
            image.load()  # an MPO loads its first frame: the main picture
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(field, f"image dimensions are too large; at most {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise InputError(field, "not a decodable image (expected JPEG, PNG or WebP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(field, f"the image is corrupt or truncated ({exc})") from None
    image = ImageOps.exif_transpose(image)
    image = _flatten(image)
    check_geometry(image, field)
    return image


def _flatten(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_geometry(image: Image.Image, field: str) -> None:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise InputError(field, f"image is {width}x{height}; each side must be at least {MIN_SIDE} px")
    aspect = width / height
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        raise InputError(
            field,
            f"aspect ratio {aspect:.2f}:1 is outside 1:{MAX_ASPECT} .. {MAX_ASPECT}:1 ({width}x{height})",
        )
