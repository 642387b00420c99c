"""How settings text becomes values: flags, comma-separated lists, counts and durations.

Each parser takes what the environment gives (text) or an already typed value, and raises ValueError
with the rule it expects; the settings classes add the variable's name (`i2v.settings`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$")
# Decimal units as GPU makers and the figures count (80 GB = 80e9 bytes); "i" units are binary.
_UNIT_BYTES = {
    **{p + "b": 1000**n for n, p in enumerate(("", "k", "m", "g", "t"))},
    **{p + "ib": 1024**n for n, p in enumerate(("k", "m", "g", "t"), 1)},
    **{p: 1000**n for n, p in enumerate(("", "k", "m", "g", "t"))},
    **{p + "i": 1024**n for n, p in enumerate(("k", "m", "g", "t"), 1)},
}


def parse_flag(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def parse_limit(value: Any) -> Any:
    """A count where '0' or 'off' turns the limit off (0)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("off", "none", "never"):
        return 0
    if not text.isdigit():
        raise ValueError(f"expected a whole number (0 or off for no limit), got {text!r}")
    return int(text)


def parse_seconds_list(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"expected seconds separated by commas, like 1,2,4,8, got {value.strip()!r}"
        ) from None


def parse_duration(value: Any) -> Any:
    """'3600', '90s', '30m', '1h', '7d' -> seconds; '', '0', 'off' -> None (never)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("", "0", "off", "never", "none"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 3600, 90s, 30m, 1h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_bytes(value: Any) -> Any:
    """'40GB', '40 GiB', '512MB' or plain bytes ('1000000') -> bytes; '' or 'auto' -> None."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("", "auto"):
        return None
    match = _SIZE.match(text)
    if not match or match.group(2) not in _UNIT_BYTES:
        raise ValueError(f"expected a size like 40GB, 24GiB or 512MB, got {value.strip()!r}")
    count = int(float(match.group(1)) * _UNIT_BYTES[match.group(2)])
    if count <= 0:
        raise ValueError(f"expected a size above zero, got {value.strip()!r}")
    return count


def format_bytes(count: int | float) -> str:
    """Bytes as the docs and logs write them: decimal GB (1 GB = 1e9 bytes), MB or KB below that."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.{1 if unit == 'GB' else 2}f} {unit}"
    return f"{int(count)} B"


Flag = Annotated[bool, BeforeValidator(parse_flag)]
OptionalFlag = Annotated[bool | None, BeforeValidator(parse_flag)]
CommaList = Annotated[tuple[str, ...], BeforeValidator(split_commas)]
Limit = Annotated[int, BeforeValidator(parse_limit)]
Seconds = Annotated[tuple[float, ...], BeforeValidator(parse_seconds_list)]
Duration = Annotated[float | None, BeforeValidator(parse_duration)]
Bytes = Annotated[int | None, BeforeValidator(parse_bytes)]
# A size where '0' or 'off' means none at all (0).
BytesOrOff = Annotated[
    int | None, BeforeValidator(lambda v: 0 if str(v).strip().lower() in ("0", "off") else parse_bytes(v))
]
