"""The one ``KEY=VALUE`` grammar of invdiff: ``NAME[:key=value...]`` specifications of a
task, sampler or prior with options (``invdiff bench --tasks``, ``reconstruct --sampler``,
TOML configs) and ``KEY=VALUE`` lists (``--param``). Values are TOML literals (numbers,
booleans, quoted strings, arrays, inline tables); anything else is kept as text. This
module is at the bottom of the layers: it imports nothing from invdiff.

>>> parse_spec("ct-sparse-30:noise_sigma=0.02:fbp_filter=hann")
('ct-sparse-30', {'noise_sigma': 0.02, 'fbp_filter': 'hann'})
>>> parse_key_values(["fbp_filter=hann", "views=[0, 90]", "relax=true"])
{'fbp_filter': 'hann', 'views': [0, 90], 'relax': True}
"""

from __future__ import annotations

import re
from typing import Any, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

__all__ = ["parse_value", "parse_spec", "parse_key_values", "parse_size"]


def parse_value(text: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), or the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_spec(text: str) -> tuple[str, dict]:
    """``"name:key=value:key=value"`` -> ``(name, {key: value})`` (values as TOML literals)."""
    parts = [p.strip() for p in re.split(r":(?=[A-Za-z_][A-Za-z_0-9]*=)", text.strip())]
    name, overrides = parts[0], {}
    if not name or "=" in name:
        raise ValueError(f"bad specification {text!r}: expected NAME[:key=value...]")
    for part in parts[1:]:
        key, _, value = part.partition("=")
        overrides[key.strip()] = parse_value(value.strip())
    return name, overrides


def parse_key_values(items: Iterable[str] | None, flag: str = "--param") -> dict:
    """``["key=value", ...]`` -> ``{key: value}`` (values as TOML literals)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``"64"`` -> ``(64, 64)``, ``"48x64"`` -> ``(48, 64)`` (rows x columns)."""
    if isinstance(text, int):
        size = (text, text)
    elif isinstance(text, tuple):
        size = tuple(int(s) for s in text)
    else:
        parts = str(text).lower().replace("*", "x").split("x")
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"image size must be N or HxW, got {text!r}") from None
        size = size * 2 if len(size) == 1 else size
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be N or HxW with positive sides, got {text!r}")
    return size
