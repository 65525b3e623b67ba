"""Token checking, the key sources and the development secret.

Tokens that must fail are built outside the code under test: with PyJWT for well-formed
ones, by hand (base64url + hmac) for `alg: none` and the HS/RS confusion, which PyJWT
itself refuses to produce. The JWKS is served over a real socket by `http.server`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.auth import (
    AuthSettings,
    JwksKeySource,
    SecretKeySource,
    TokenGrant,
    Unauthorized,
    issue_token,
    load_key_source,
    principal_from_claims,
)
from app.kit.errors import ConfigurationError

ISSUER = "itp-trial-api"
AUDIENCE = "itp-trial-api"
SECRET = "k3Y-for-tests-only_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "role": "investigator",
        "sites": ["S01"],
        "iat": now,
        "nbf": now - 5,
        "exp": now + 600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def unsigned(payload: dict[str, Any], alg: str = "none", **headers: Any) -> str:
    header = {"alg": alg, "typ": "JWT", **headers}
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), ""])


def hand_signed_hs256(payload: dict[str, Any], key: bytes, **headers: Any) -> str:
    header = {"alg": "HS256", "typ": "JWT", **headers}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.fixture
def source() -> SecretKeySource:
    return SecretKeySource(SECRET, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=30)


def refused(source: Any, token: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        source.decode(token)
    return caught.value


# --- shared secret ---------------------------------------------------------------------------


def test_valid_hs256_token_decodes(source: SecretKeySource) -> None:
    decoded = source.decode(hs256(claims()))
    assert decoded["sub"] == "alice"
    assert decoded["role"] == "investigator"


def test_expired_beyond_leeway_is_refused(source: SecretKeySource) -> None:
    error = refused(source, hs256(claims(exp=int(time.time()) - 120)))
    assert error.diagnostics == "token expired"


def test_expired_within_leeway_is_accepted(source: SecretKeySource) -> None:
    # The leeway is there for clock skew; without it this would fail.
    assert source.decode(hs256(claims(exp=int(time.time()) - 10)))["sub"] == "alice"


def test_not_yet_valid_is_refused(source: SecretKeySource) -> None:
    error = refused(source, hs256(claims(nbf=int(time.time()) + 300)))
    assert error.diagnostics == "token not yet valid"


def test_wrong_audience_is_refused(source: SecretKeySource) -> None:
    assert "audience" in refused(source, hs256(claims(aud="another-api"))).diagnostics


def test_wrong_issuer_is_refused(source: SecretKeySource) -> None:
    assert "issuer" in refused(source, hs256(claims(iss="https://evil.example"))).diagnostics


@pytest.mark.parametrize("claim", ["sub", "exp", "iss", "aud"])
def test_missing_required_claim_is_refused(source: SecretKeySource, claim: str) -> None:
    payload = claims()
    del payload[claim]
    assert refused(source, hs256(payload)).diagnostics == f"token lacks the {claim} claim"


def test_tampered_payload_is_refused(source: SecretKeySource) -> None:
    header, _, signature = hs256(claims()).split(".")
    forged = b64url(json.dumps(claims(role="admin")).encode())
    assert refused(source, f"{header}.{forged}.{signature}").diagnostics == (
        "token signature invalid"
    )


def test_tampered_signature_is_refused(source: SecretKeySource) -> None:
    header, payload, signature = hs256(claims()).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[5] ^= 0x01
    token = f"{header}.{payload}.{b64url(bytes(raw))}"
    assert refused(source, token).diagnostics == "token signature invalid"


def test_other_secret_is_refused(source: SecretKeySource) -> None:
    token = hs256(claims(), secret="another-secret-of-sufficient-length-0123456789")
    assert refused(source, token).diagnostics == "token signature invalid"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(source: SecretKeySource, alg: str) -> None:
    assert refused(source, unsigned(claims(), alg)).diagnostics == "token algorithm not allowed"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 9000])
def test_garbage_is_refused(source: SecretKeySource, token: str) -> None:
    assert refused(source, token).status_code == 401


def test_unauthorized_carries_bearer_challenge_without_secret(source: SecretKeySource) -> None:
    error = refused(source, hs256(claims(exp=int(time.time()) - 120)))
    assert error.status_code == 401
    assert error.issue_code == "login"
    assert error.issues[0].code == "login"
    assert error.headers["WWW-Authenticate"] == (
        'Bearer realm="itp-trial", error="invalid_token", error_description="token expired"'
    )
    assert SECRET not in repr(source)
    assert SECRET not in str(error.headers) + error.diagnostics


def test_missing_token_challenge_has_no_error_code() -> None:
    # RFC 6750 3.1: a request without credentials gets the bare challenge.
    assert Unauthorized.missing_token().headers["WWW-Authenticate"] == 'Bearer realm="itp-trial"'


def test_error_description_is_made_header_safe() -> None:
    header = Unauthorized('bad "quote" \\ and\nnewline é').headers["WWW-Authenticate"]
    assert header.endswith('error_description="bad quote  andnewline "')


# --- JWKS ------------------------------------------------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        self.document = json.dumps(
            {
                "keys": [
                    {**rsa_jwk, "kid": "rsa-1", "use": "sig", "alg": "RS256"},
                    {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES256"},
                ]
            }
        ).encode()
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.document)))
                self.end_headers()
                self.wfile.write(server.document)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def jwks(jwks_server: JwksServer) -> JwksKeySource:
    return JwksKeySource(jwks_server.url, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=30)


def test_rs256_from_jwks_is_accepted(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    token = jwt.encode(claims(), jwks_server.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    assert jwks.decode(token)["sub"] == "alice"


def test_es256_from_jwks_is_accepted(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    token = jwt.encode(claims(), jwks_server.ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert jwks.decode(token)["sub"] == "alice"


def test_jwks_source_still_checks_claims(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    token = jwt.encode(
        claims(aud="another-api"), jwks_server.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    assert "audience" in refused(jwks, token).diagnostics


def test_hs256_token_is_refused_by_jwks_source(jwks: JwksKeySource) -> None:
    token = hs256(claims(), kid="rsa-1")
    assert refused(jwks, token).diagnostics == "token algorithm not allowed"


def test_hs_rs_confusion_is_refused(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    # The attack: HMAC-sign with the provider's public key, which anyone can fetch.
    pem = jwks_server.public_pem()
    token = hand_signed_hs256(claims(role="admin"), pem, kid="rsa-1")
    # The forgery is a correct HS256 signature under that "secret": only the algorithm pin
    # stops it.
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert b64url(expected) == signature
    assert refused(jwks, token).status_code == 401


def test_key_and_algorithm_must_match(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    # An RS256 token pointing at the EC key: the key's own algorithm decides, not the header.
    token = jwt.encode(claims(), jwks_server.rsa, algorithm="RS256", headers={"kid": "ec-1"})
    assert refused(jwks, token).status_code == 401


def test_alg_none_is_refused_by_jwks_without_fetching(
    jwks: JwksKeySource, jwks_server: JwksServer
) -> None:
    before = jwks_server.hits
    assert refused(jwks, unsigned(claims(), kid="rsa-1")).diagnostics == (
        "token algorithm not allowed"
    )
    assert jwks_server.hits == before


def test_key_not_in_jwks_is_refused(jwks: JwksKeySource, jwks_server: JwksServer) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    same_kid = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})
    assert refused(jwks, same_kid).diagnostics == "token signature invalid"
    other_kid = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-9"})
    assert refused(jwks, other_kid).diagnostics == "no signing key matches the token"


def test_unreachable_jwks_is_unauthorized(jwks_server: JwksServer) -> None:
    # A port nothing listens on: bind one, note it, close it.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = JwksKeySource(
        f"http://127.0.0.1:{port}/jwks.json", issuer=ISSUER, audience=AUDIENCE, timeout_seconds=2
    )
    token = jwt.encode(claims(), jwks_server.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    assert refused(source, token).diagnostics == "signing keys unavailable"


def test_jwks_source_cannot_sign(jwks: JwksKeySource) -> None:
    with pytest.raises(ConfigurationError):
        jwks.sign(claims())


# --- settings and the development secret -----------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("APP_AUTH_") or name == "APP_ENVIRONMENT":
            monkeypatch.delenv(name)


def settings(tmp_path: Path, **values: Any) -> AuthSettings:
    return AuthSettings(data_dir=tmp_path / "data", **values)


@pytest.mark.usefixtures("clean_env")
def test_development_secret_is_made_once_with_mode_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.auth")
    first = load_key_source(settings(tmp_path), "development")
    path = tmp_path / "data" / "jwt-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 48
    assert str(path) in caplog.text
    assert secret not in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == ["jwt-secret"]  # no temp files

    second = load_key_source(settings(tmp_path), "test")
    assert path.read_text().strip() == secret
    assert second.decode(first.sign(claims()))["sub"] == "alice"


@pytest.mark.usefixtures("clean_env")
def test_development_secret_differs_between_data_folders(tmp_path: Path) -> None:
    one = load_key_source(AuthSettings(data_dir=tmp_path / "one"), "development")
    two = load_key_source(AuthSettings(data_dir=tmp_path / "two"), "development")
    with pytest.raises(Unauthorized):
        two.decode(one.sign(claims()))


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_secret_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    load_key_source(settings(tmp_path), "development")
    path = tmp_path / "data" / "jwt-secret"
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match="group or others"):
        load_key_source(settings(tmp_path), "development")


@pytest.mark.usefixtures("clean_env")
def test_production_without_key_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no token key"):
        load_key_source(settings(tmp_path), "production")
    assert not (tmp_path / "data").exists()


@pytest.mark.usefixtures("clean_env")
def test_production_ignores_a_development_secret_file(tmp_path: Path) -> None:
    load_key_source(settings(tmp_path), "development")
    with pytest.raises(ConfigurationError):
        load_key_source(settings(tmp_path), "production")


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    "secret",
    [
        "short-but-random-Xq9",
        "changeme",
        "secret",
        "changeme-changeme-changeme-changeme-changeme",
        "replace-me-with-a-real-secret-of-enough-length",
        "a" * 64,
    ],
)
def test_weak_secret_is_refused_in_production(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ConfigurationError):
        load_key_source(settings(tmp_path, jwt_secret=secret), "production")


@pytest.mark.usefixtures("clean_env")
def test_weak_secret_is_only_warned_about_in_development(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.auth")
    placeholder = "changeme-changeme-changeme-changeme-changeme"
    source = load_key_source(settings(tmp_path, jwt_secret=placeholder), "development")
    assert source.decode(source.sign(claims()))["sub"] == "alice"
    assert "placeholder" in caplog.text
    assert not (tmp_path / "data").exists()  # a configured secret makes no file


@pytest.mark.usefixtures("clean_env")
def test_strong_secret_is_used_in_production(tmp_path: Path) -> None:
    source = load_key_source(settings(tmp_path, jwt_secret=SECRET), "production")
    assert isinstance(source, SecretKeySource)
    assert source.decode(hs256(claims()))["sub"] == "alice"


@pytest.mark.usefixtures("clean_env")
def test_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("APP_AUTH_ISSUER", "https://idp.example")
    monkeypatch.setenv("APP_ENVIRONMENT", "production")
    loaded = AuthSettings()
    assert loaded.environment == "production"
    assert loaded.issuer == "https://idp.example"
    assert SECRET not in repr(loaded)
    source = load_key_source(loaded)
    assert source.issuer == "https://idp.example"
    assert source.decode(hs256(claims(iss="https://idp.example")))["sub"] == "alice"


@pytest.mark.usefixtures("clean_env")
def test_secret_and_jwks_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        settings(tmp_path, jwt_secret=SECRET, jwks_url="https://idp.example/jwks")


@pytest.mark.usefixtures("clean_env")
def test_algorithms_follow_the_key_source(tmp_path: Path) -> None:
    assert settings(tmp_path).algorithms == ("HS256",)
    assert settings(tmp_path, jwt_secret=SECRET).algorithms == ("HS256",)
    jwks_settings = settings(tmp_path, jwks_url="https://idp.example/jwks")
    assert jwks_settings.algorithms == ("RS256", "ES256")
    source = load_key_source(jwks_settings, "production")
    assert isinstance(source, JwksKeySource)
    assert source.algorithms == ("RS256", "ES256")


@pytest.mark.usefixtures("clean_env")
def test_plain_http_jwks_is_refused_in_production(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="https"):
        load_key_source(settings(tmp_path, jwks_url="http://idp.example/jwks"), "production")
    assert isinstance(
        load_key_source(settings(tmp_path, jwks_url="http://127.0.0.1:1/jwks"), "test"),
        JwksKeySource,
    )


# --- issuing ---------------------------------------------------------------------------------


def test_issue_token_round_trip(source: SecretKeySource) -> None:
    token = issue_token(source, TokenGrant("lab-system", "lab", ["S01", "S02"]), minutes=15)
    decoded = source.decode(token)
    assert decoded["iss"] == ISSUER and decoded["aud"] == AUDIENCE
    assert decoded["exp"] - decoded["iat"] == 15 * 60
    assert decoded["nbf"] == decoded["iat"]
    assert decoded["scope"] == "user/Observation.crus user/Patient.rs"
    principal = principal_from_claims(decoded)
    assert principal.sites == frozenset({"S01", "S02"})
    assert principal.token_id == decoded["jti"]
    other = source.decode(issue_token(source, TokenGrant("lab-system", "lab", ["S01"])))
    assert other["jti"] != decoded["jti"]


def test_issue_token_with_explicit_scope(source: SecretKeySource) -> None:
    token = issue_token(source, TokenGrant("m", "monitor", ["S01"], "user/Observation.rs"))
    assert source.decode(token)["scope"] == "user/Observation.rs"


@pytest.mark.parametrize(
    ("role", "sites", "minutes"),
    [("superuser", ["S01"], 60), ("lab", [], 60), ("lab", ["S 01"], 60), ("lab", ["S01"], 0)],
)
def test_issue_token_refuses_bad_arguments(
    source: SecretKeySource, role: str, sites: list[str], minutes: int
) -> None:
    with pytest.raises(ValueError):
        issue_token(source, TokenGrant("x", role, sites), minutes=minutes)


def test_issue_token_needs_a_secret(jwks: JwksKeySource) -> None:
    with pytest.raises(ConfigurationError):
        issue_token(jwks, TokenGrant("root", "admin", []))
