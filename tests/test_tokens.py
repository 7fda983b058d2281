"""Unit tests for serve_runtime/tokens.py: the SDK's multiplexing JWT and model keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from serve_runtime.tokens import (
    ALGORITHM,
    MODEL_TOKEN_HEADER,
    ModelClaims,
    ModelKey,
    TokenError,
    create_serve_multiplexed_model_id,
    decode_model_token,
    looks_like_jwt,
)

# The SDK's design keys HS256 with the backend URL, shorter than PyJWT likes.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

URL = "http://127.0.0.1:8010"
USER_TOKEN = "tok-alice-0123456789-secret"
SIGNING_KEY = "deployment-signing-key-0123456789abcdef"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def hand_made_hs256(payload: dict[str, object], key: str, header: dict[str, str]) -> str:
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    sig = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def segments(token: str) -> tuple[dict[str, object], dict[str, object]]:
    head, body, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(head))),
        json.loads(base64.urlsafe_b64decode(pad(body))),
    )


# --------------------------------------------------------------------------- wire format


class TestSdkFormat:
    def test_with_tenant_byte_for_byte(self) -> None:
        ours = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, "acme")
        sdk = jwt.encode(
            {"model": "12", "token": USER_TOKEN, "tenant": "acme"}, URL, algorithm="HS256"
        )
        assert ours == sdk

    def test_without_tenant_byte_for_byte(self) -> None:
        ours = create_serve_multiplexed_model_id(12, USER_TOKEN, URL)
        sdk = jwt.encode({"model": "12", "token": USER_TOKEN}, URL, algorithm="HS256")
        assert ours == sdk

    def test_matches_a_hand_built_hs256(self) -> None:
        # Independent of PyJWT: compact JWS, sorted header, claims in SDK order.
        header = {"alg": "HS256", "typ": "JWT"}
        ours = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, "acme")
        expected = hand_made_hs256(
            {"model": "12", "token": USER_TOKEN, "tenant": "acme"}, URL, header
        )
        assert ours == expected

    def test_str_model_id_same_as_int(self) -> None:
        assert create_serve_multiplexed_model_id(
            "12", USER_TOKEN, URL
        ) == create_serve_multiplexed_model_id(12, USER_TOKEN, URL)

    @pytest.mark.parametrize("tenant", ["acme", None])
    def test_header_and_claims(self, tenant: str | None) -> None:
        ours = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, tenant)
        sdk_payload: dict[str, object] = {"model": "12", "token": USER_TOKEN}
        if tenant:
            sdk_payload["tenant"] = tenant
        sdk = jwt.encode(sdk_payload, URL, algorithm="HS256")
        for token in (ours, sdk):
            assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
            assert jwt.decode(token, URL, algorithms=["HS256"]) == sdk_payload
            header, claims = segments(token)
            assert header == {"alg": "HS256", "typ": "JWT"}
            assert claims == sdk_payload
            assert "exp" not in claims
            assert "iat" not in claims

    def test_sdk_token_decodes_with_our_decoder(self) -> None:
        sdk = jwt.encode(
            {"model": "12", "token": USER_TOKEN, "tenant": "acme"}, URL, algorithm="HS256"
        )
        assert decode_model_token(sdk, URL) == ModelClaims(
            model="12", token=USER_TOKEN, tenant="acme"
        )

    def test_our_token_round_trips(self) -> None:
        claims = decode_model_token(create_serve_multiplexed_model_id(7, USER_TOKEN, URL), URL)
        assert claims.model == "7"
        assert claims.token == USER_TOKEN
        assert claims.tenant is None

    def test_constants(self) -> None:
        assert ALGORITHM == "HS256"
        assert MODEL_TOKEN_HEADER == "serve_multiplexed_model_id"

    def test_looks_like_jwt(self) -> None:
        assert looks_like_jwt(create_serve_multiplexed_model_id(1, USER_TOKEN, URL))
        assert not looks_like_jwt("acme:12")
        assert not looks_like_jwt("a.b.c")


# --------------------------------------------------------------------------- hardening


class TestTtlAndSigningKey:
    def test_ttl_adds_exp(self) -> None:
        before = int(time.time())
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, ttl_s=300)
        after = int(time.time())
        _, claims = segments(token)
        assert before + 300 <= claims["exp"] <= after + 300  # type: ignore[operator]
        assert decode_model_token(token, URL).model == "12"

    def test_signing_key_token_refused_with_url(self) -> None:
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, signing_key=SIGNING_KEY)
        assert decode_model_token(token, SIGNING_KEY).token == USER_TOKEN
        with pytest.raises(TokenError, match="signature"):
            decode_model_token(token, URL)

    def test_url_token_refused_with_signing_key(self) -> None:
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL)
        with pytest.raises(TokenError, match="signature"):
            decode_model_token(token, SIGNING_KEY)


def assert_refused(token: str, key: str = URL, match: str | None = None) -> TokenError:
    with pytest.raises(TokenError) as exc:
        decode_model_token(token, key)
    msg = str(exc.value)
    assert USER_TOKEN not in msg
    assert token not in msg
    if match:
        assert match in msg
    return exc.value


class TestDecodeRefuses:
    def test_wrong_key(self) -> None:
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL)
        assert_refused(token, key="http://other-backend:8010", match="signature")

    def test_alg_none(self) -> None:
        payload = {"model": "12", "token": USER_TOKEN}
        token = f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(payload)}."
        assert_refused(token, match="'none'")

    def test_alg_none_from_pyjwt(self) -> None:
        token = jwt.encode({"model": "12", "token": USER_TOKEN}, None, algorithm="none")
        assert_refused(token, match="HS256 only")

    def test_hs512(self) -> None:
        token = jwt.encode({"model": "12", "token": USER_TOKEN}, URL * 4, algorithm="HS512")
        assert_refused(token, key=URL * 4, match="'HS512'")

    def test_rs256_header_hmac_signed(self) -> None:
        # Algorithm confusion: an RS256 header signed with HMAC over the "public key".
        token = hand_made_hs256(
            {"model": "12", "token": USER_TOKEN}, URL, {"alg": "RS256", "typ": "JWT"}
        )
        assert_refused(token, match="'RS256'")

    def test_tampered_payload(self) -> None:
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL, "acme")
        head, _, sig = token.split(".")
        forged = b64url_json({"model": "13", "token": USER_TOKEN, "tenant": "acme"})
        assert_refused(f"{head}.{forged}.{sig}", match="signature")

    def test_tampered_signature(self) -> None:
        token = create_serve_multiplexed_model_id(12, USER_TOKEN, URL)
        head, body, sig = token.split(".")
        flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
        assert_refused(f"{head}.{body}.{flipped}")

    def test_expired(self) -> None:
        token = jwt.encode(
            {"model": "12", "token": USER_TOKEN, "exp": int(time.time()) - 3600},
            URL,
            algorithm="HS256",
        )
        assert_refused(token, match="expired")

    @pytest.mark.parametrize(
        "payload",
        [
            {"token": USER_TOKEN},
            {"model": "12"},
            {"model": "", "token": USER_TOKEN},
            {"model": "12", "token": ""},
            {"model": "12", "token": 12345},
            {},
        ],
    )
    def test_missing_claims(self, payload: dict[str, object]) -> None:
        token = jwt.encode(payload, URL, algorithm="HS256")
        assert_refused(token, match="claim")

    def test_non_string_tenant(self) -> None:
        token = jwt.encode(
            {"model": "12", "token": USER_TOKEN, "tenant": ["acme"]}, URL, algorithm="HS256"
        )
        assert_refused(token, match="tenant")

    @pytest.mark.parametrize(
        "garbage",
        [
            "",
            "garbage",
            "a.b.c",
            "eyJhbGciOiJIUzI1NiJ9",
            "eyJ!!!.eyJ.x",
            f"{USER_TOKEN}.{USER_TOKEN}.{USER_TOKEN}",
            b64url(b"[1,2]") + ".e30.sig",
        ],
    )
    def test_garbage(self, garbage: str) -> None:
        with pytest.raises(TokenError) as exc:
            decode_model_token(garbage, URL)
        assert USER_TOKEN not in str(exc.value)

    def test_token_error_is_value_error(self) -> None:
        assert issubclass(TokenError, ValueError)


# --------------------------------------------------------------------------- claims & keys


class TestModelClaims:
    def test_repr_hides_token(self) -> None:
        claims = ModelClaims(model="12", token=USER_TOKEN, tenant="acme")
        text = repr(claims)
        assert USER_TOKEN not in text
        assert "12" in text
        assert "acme" in text
        assert USER_TOKEN not in str(claims)
        assert USER_TOKEN not in f"{[claims]}"

    def test_decoded_repr_hides_token(self) -> None:
        claims = decode_model_token(create_serve_multiplexed_model_id(12, USER_TOKEN, URL), URL)
        assert USER_TOKEN not in repr(claims)

    def test_frozen(self) -> None:
        claims = ModelClaims(model="12", token=USER_TOKEN, tenant=None)
        with pytest.raises(AttributeError):
            claims.model = "13"  # type: ignore[misc]


class TestModelKey:
    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ("acme:12", ModelKey("acme", "12")),
            ("-:12", ModelKey(None, "12")),
            ("acme:12:3", ModelKey("acme", "12", "3")),
            ("-:12:v2", ModelKey(None, "12", "v2")),
        ],
    )
    def test_parse_and_str_round_trip(self, text: str, key: ModelKey) -> None:
        assert ModelKey.parse(text) == key
        assert str(key) == text
        assert ModelKey.parse(str(key)) == key

    def test_no_tenant_and_no_version(self) -> None:
        assert str(ModelKey(tenant=None, model="12")) == "-:12"
        assert str(ModelKey(tenant="acme", model="12", version=None)) == "acme:12"

    @pytest.mark.parametrize(
        "text", ["", "12", "acme:", ":12", "acme::3", "acme:12:", "a:b:c:d", ":::"]
    )
    def test_bad_forms_refused(self, text: str) -> None:
        with pytest.raises(TokenError, match="model key"):
            ModelKey.parse(text)

    def test_key_holds_no_secret(self) -> None:
        claims = decode_model_token(
            create_serve_multiplexed_model_id(12, USER_TOKEN, URL, "acme"), URL
        )
        key = ModelKey(tenant=claims.tenant, model=claims.model)
        assert USER_TOKEN not in str(key)
        assert USER_TOKEN not in repr(key)
