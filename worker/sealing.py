"""Sealed tokens: the user's token as it travels in every message the bridge publishes.

A job's token is needed by exactly one call (the Serve request). Everywhere else it
sits at rest: in the broker (queued, unacked, scheduled retries and polls), in the
submission ledger, in Celery's remote-control answers. There it travels *sealed*:
authenticated encryption (Fernet: AES-128-CBC + HMAC-SHA256), as the string
``sealed:v1:<fernet token>``. The prefix tells a sealed token from the plain one an
outside producer (the backend) may push; both parse.

The key: ``SYNAPSE_BRIDGE_SEALING_KEY`` (a Fernet key; generate one with
``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``),
else one derived (HKDF-SHA256, fixed info string) from ``SYNAPSE_ACCESS_TOKEN``, the
service token every worker and producer of one deployment shares. Rotation: give
``SYNAPSE_BRIDGE_SEALING_KEY`` as ``new,old``; the first key seals, every key opens.

No module state: ``sealer()`` reads the settings each call and returns a ``Sealer``
cached by its key bytes.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from config.settings import Settings, SettingsError, get_settings

PREFIX = "sealed:v1:"
KEY_ENV = "SYNAPSE_BRIDGE_SEALING_KEY"
_HKDF_INFO = b"synapse-serve-bridge/token-sealing/v1"


class UnsealError(ValueError):
    """A sealed token could not be opened; the text names the setting, never the value."""


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


@lru_cache(maxsize=8)
def derive_key(secret: str) -> bytes:
    """A Fernet key from a shared secret (the service token): HKDF-SHA256, fixed info."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret.encode()
    )
    return base64.urlsafe_b64encode(raw)


def parse_keys(text: str) -> tuple[bytes, ...]:
    """``key[,previous,...]``: each a Fernet key (32 bytes, url-safe base64)."""
    keys = tuple(k.strip().encode() for k in text.split(",") if k.strip())
    if not keys:
        raise SettingsError(f"{KEY_ENV} is empty")
    for i, key in enumerate(keys, 1):
        try:
            ok = len(base64.urlsafe_b64decode(key)) == 32
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise SettingsError(
                f"{KEY_ENV}: key {i} is not a Fernet key (32 bytes, url-safe base64); "
                'generate one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            )
    return keys


class Sealer:
    """Seals and opens tokens with one key (and opens with older ones)."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self._n = len(keys)

    def seal(self, token: str) -> str:
        if is_sealed(token):
            return token
        return PREFIX + self._fernet.encrypt(token.encode()).decode("ascii")

    def open(self, value: str) -> str:
        """The plain token; a value without the prefix is a plain token already."""
        if not is_sealed(value):
            return value
        try:
            return self._fernet.decrypt(value[len(PREFIX) :].encode("ascii")).decode()
        except (InvalidToken, UnicodeError, ValueError):
            raise UnsealError(
                f"token: a sealed token could not be opened (sealed with another "
                f"{KEY_ENV}, or altered)"
            ) from None

    def __repr__(self) -> str:
        return f"Sealer(keys={self._n})"


@lru_cache(maxsize=8)
def _sealer_for(keys: tuple[bytes, ...]) -> Sealer:
    return Sealer(keys)


def sealer(settings: Settings | None = None) -> Sealer:
    """The process's sealer, from ``settings`` (default: the process-wide settings).

    Raises ``SettingsError`` naming SYNAPSE_BRIDGE_SEALING_KEY when no key can be had:
    call it at process start to fail early.
    """
    s = settings or get_settings()
    key = s.sealing_key
    if key is not None and key.get_secret_value().strip():
        return _sealer_for(parse_keys(key.get_secret_value()))
    if s.access_token is not None and s.access_token.get_secret_value():
        return _sealer_for((derive_key(s.access_token.get_secret_value()),))
    raise SettingsError(
        f"no key to seal job tokens with: set {KEY_ENV} (a Fernet key, shared by every "
        "worker and producer) or SYNAPSE_ACCESS_TOKEN (a key is derived from it)"
    )


__all__ = ["KEY_ENV", "PREFIX", "Sealer", "UnsealError", "derive_key", "is_sealed", "sealer"]
