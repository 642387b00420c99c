"""How settings text becomes values: flags, comma-separated lists, counts, durations and sizes.

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
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*$")


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
    """'20GB', '500MB', '1.5T', '2GiB', '1000' (bytes) -> bytes; '0', 'off' -> 0. Units are decimal, as the
    hub counts, unless written binary (KiB, MiB, GiB, TiB)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("off", "none"):
        return 0
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size like 500MB, 20GB, 2GiB or 0, got {text!r}")
    number, unit, binary = float(match.group(1)), match.group(2) or "", match.group(3)
    power = " kmgt".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def parse_optional_bytes(value: Any) -> Any:
    """A size as `parse_bytes` reads it, where '' or 'auto' means none given (None: decided at run time)."""
    if isinstance(value, str) and value.strip().lower() in ("", "auto"):
        return None
    return parse_bytes(value)


def format_bytes(count: float) -> str:
    """Bytes in the hub's decimal units: 512 B, 1.2 MB, 23.9 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


Flag = Annotated[bool, BeforeValidator(parse_flag)]
OptionalFlag = Annotated[bool | None, BeforeValidator(parse_flag)]
CommaList = Annotated[tuple[str, ...], BeforeValidator(split_commas)]
Limit = Annotated[int, BeforeValidator(parse_limit)]
Seconds = Annotated[tuple[float, ...], BeforeValidator(parse_seconds_list)]
Duration = Annotated[float | None, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]
# A size, or None where the setting is '' or 'auto' (the code decides: i2v.memory, i2v.residency).
OptionalBytes = Annotated[int | None, BeforeValidator(parse_optional_bytes)]
