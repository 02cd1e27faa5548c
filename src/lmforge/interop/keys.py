"""Typed reads of a config.json's keys, each failure one line naming the key.

Strict on purpose: no "4" or 4.0 for 4, no "false" for false, so that a folder lmforge accepts is
read exactly as `transformers` reads it. Shared by every family's reader (hf.py, gemma.py).
"""

from __future__ import annotations

import math

from lmforge.errors import LmforgeError

REQUIRED = object()  # the default of a config.json key that must be present


def present(config: dict, key: str, origin: str, *, default: object) -> object:
    """config[key]; `default` when the key is missing or null (an error when it is REQUIRED)."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise LmforgeError(f"{origin}: missing key {key}")
        return default
    return value


def read_int(config: dict, key: str, origin: str, *, default: object = REQUIRED) -> int:
    """A positive integer (JSON has no other kind of count or size)."""
    value = present(config, key, origin, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmforgeError(f"{origin}: {key} must be an integer >= 1; got {value!r}")
    return value


def read_float(config: dict, key: str, origin: str, *, default: object = REQUIRED, label: str = "") -> float:
    """A finite number > 0 (every float lmforge reads from config.json is an epsilon, a base, a cap or
    a factor). `label` prefixes the key in the error (e.g. "rope_parameters.")."""
    value = present(config, key, origin, default=default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise LmforgeError(f"{origin}: {label}{key} must be a finite number > 0; got {value!r}")
    return float(value)


def read_bool(config: dict, key: str, origin: str, *, default: bool) -> bool:
    """true or false, nothing else."""
    value = present(config, key, origin, default=default)
    if not isinstance(value, bool):
        raise LmforgeError(f"{origin}: {key} must be true or false; got {value!r}")
    return value


def need(condition: bool, origin: str, message: str) -> None:
    """An LmforgeError `origin: message` unless `condition` holds."""
    if not condition:
        raise LmforgeError(f"{origin}: {message}")
