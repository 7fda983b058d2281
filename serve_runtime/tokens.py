"""Multiplexing tokens: the SDK's JWT, and the model keys of model-affine routing.

The SDK signs ``{"model": str(id), "token": <user token>[, "tenant": ...]}`` with HS256
and the backend URL as the key; ours are byte-for-byte the same claims, so tokens
cross in both directions. Hardening on top: a deployment may hold its own signing
key (then URL-signed tokens are refused), tokens may carry ``exp``, only HS256
is ever accepted on decode, and the model and tenant claims (and a model key's parts)
must be ids of config/ids.py's character set: they go into backend URLs and keys.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from config.ids import InvalidId, check_model_id, check_tenant, check_version

ALGORITHM = "HS256"
MODEL_TOKEN_HEADER = "serve_multiplexed_model_id"
# Model-affine routing: the JWT travels here; the multiplexing header holds a ModelKey.
AFFINE_TOKEN_HEADER = "synapse-model-token"


class TokenError(ValueError):
    """A token that cannot be trusted; the message never includes the token."""


class InvalidClaimId(TokenError):
    """A token or model key naming an id outside config/ids.py's set: a bad request.

    ``code`` is the answer's error code: ``invalid_model_id`` or ``invalid_tenant``.
    """

    def __init__(self, error: InvalidId) -> None:
        super().__init__(str(error))
        self.code = "invalid_tenant" if error.field.startswith("tenant") else "invalid_model_id"


def _checked(check: Any, value: Any, field: str) -> str:
    try:
        return check(value, field)
    except InvalidId as e:
        raise InvalidClaimId(e) from None


@dataclass(frozen=True, repr=False)
class ModelClaims:
    """What a verified multiplexing token says: which model, for whom."""

    model: str
    token: str
    tenant: str | None

    def __repr__(self) -> str:  # the user token is a secret
        return f"ModelClaims(model={self.model!r}, tenant={self.tenant!r}, token=***)"


def create_serve_multiplexed_model_id(
    model_id: int | str,
    token: str,
    backend_url: str,
    tenant: str | None = None,
    *,
    signing_key: str | None = None,
    ttl_s: int | None = None,
) -> str:
    """The SDK's token (same claims, HS256, backend URL as key) with optional hardening.

    Raises ``InvalidClaimId`` for a model id or tenant outside config/ids.py's set.
    """
    payload: dict[str, object] = {
        "model": _checked(check_model_id, model_id, "model claim"),
        "token": token,
    }
    if tenant:
        payload["tenant"] = _checked(check_tenant, tenant, "tenant claim")
    if ttl_s:
        payload["exp"] = int(time.time()) + int(ttl_s)
    with warnings.catch_warnings():  # the SDK's key is a URL: short by design
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, signing_key or backend_url, algorithm=ALGORITHM)


def decode_model_token(encoded: str, key: str) -> ModelClaims:
    """Verify a multiplexing token with ``key``; HS256 only, ``exp`` honoured when present."""
    try:
        header = jwt.get_unverified_header(encoded)
    except jwt.PyJWTError:
        raise TokenError("malformed model token") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"model token algorithm {header.get('alg')!r} refused (HS256 only)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            claims = jwt.decode(encoded, key, algorithms=[ALGORITHM], options={"require": []})
    except jwt.ExpiredSignatureError:
        raise TokenError("model token expired") from None
    except jwt.InvalidSignatureError:
        raise TokenError("model token signature invalid") from None
    except jwt.PyJWTError as e:
        raise TokenError(f"model token invalid: {type(e).__name__}") from None
    model, user_token = claims.get("model"), claims.get("token")
    if model in (None, "") or not isinstance(user_token, str) or not user_token:
        raise TokenError("model token lacks the 'model' or 'token' claim")
    tenant = claims.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise TokenError("model token 'tenant' claim must be a string")
    model = _checked(check_model_id, model, "model claim")
    if tenant:
        _checked(check_tenant, tenant, "tenant claim")
    return ModelClaims(model=model, token=user_token, tenant=tenant or None)


def looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2 and value.startswith("eyJ")


@dataclass(frozen=True)
class ModelKey:
    """A stable, secret-free name for a model: ``tenant:model[:version]`` (``-`` = no tenant)."""

    tenant: str | None
    model: str
    version: str | None = None

    def __str__(self) -> str:
        parts = [self.tenant or "-", self.model]
        if self.version:
            parts.append(self.version)
        return ":".join(parts)

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise TokenError(f"model key {text!r} is not 'tenant:model' or 'tenant:model:version'")
        tenant = None if parts[0] == "-" else _checked(check_tenant, parts[0], "tenant in key")
        model = _checked(check_model_id, parts[1], "model id in key")
        version = _checked(check_version, parts[2], "version in key") if len(parts) == 3 else None
        return cls(tenant=tenant, model=model, version=version)
