"""Where the server's token-checking key comes from, decided once at start-up.

Two sources, never both: a shared secret (HS256), meant for development, tests and the
`python -m app token` command, or an identity provider's JWKS URL (RS256/ES256), meant for
production. The server must never start without a key: with nothing configured in
development or test it makes a secret once and keeps it in its data folder (mode 0600); in
production it refuses to start, because a generated secret there would either lock everyone
out or, worse, be a key nobody manages.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.auth.tokens import (
    ASYMMETRIC_ALGORITHMS,
    SYMMETRIC_ALGORITHMS,
    JwksKeySource,
    KeySource,
    SecretKeySource,
)
from app.kit.errors import ConfigurationError

Environment = Literal["development", "test", "production"]

SECRET_FILE_NAME = "jwt-secret"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key must be at least as long as the hash
# Values people paste from examples. Compared after lower-casing; a secret that merely
# *contains* one of the markers below is refused too ("changeme-changeme-changeme-...").
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "secret", "password", "jwt-secret", "test", "dev"}
)
PLACEHOLDER_MARKERS = (
    "changeme",
    "change-me",
    "change_me",
    "replaceme",
    "replace-me",
    "replace_me",
    "placeholder",
    "your-secret",
    "your_secret",
    "example",
)
MIN_DISTINCT_CHARACTERS = 8  # "aaaa...a" and "abababab..." are long but not secret

_DEVELOPMENT_ENVIRONMENTS: frozenset[str] = frozenset({"development", "test"})

_log = logging.getLogger("app.auth")


class AuthSettings(BaseSettings):
    """Authentication settings, read from `APP_AUTH_*`.

    `environment` is the application's (`APP_ENVIRONMENT`), not an auth-specific one, so that
    the auth module can never believe it runs in development while the app runs in
    production; it may also be passed in by the caller.
    """

    # populate_by_name: `AuthSettings(environment=...)` works besides APP_ENVIRONMENT.
    model_config = SettingsConfigDict(env_prefix="APP_AUTH_", extra="ignore", populate_by_name=True)

    jwt_secret: SecretStr | None = None
    jwks_url: str | None = None
    issuer: str = "itp-trial-api"
    audience: str = "itp-trial-api"
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    token_minutes: int = Field(default=60, ge=1)
    data_dir: Path = Path("data")
    environment: Environment = Field(default="development", validation_alias="APP_ENVIRONMENT")

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthSettings:
        # ConfigurationError is not a ValueError, so pydantic lets it through unchanged and
        # start-up fails with the same exception type as every other key problem.
        if self.jwt_secret is not None and self.jwks_url:
            raise ConfigurationError(
                "set either APP_AUTH_JWT_SECRET or APP_AUTH_JWKS_URL, not both: a server that "
                "accepted both would let a holder of the shared secret mint any identity"
            )
        return self

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The only algorithms a token may use: derived from the key source, never configured,
        so `none` or a symmetric/asymmetric mix cannot be switched on by a setting."""
        return ASYMMETRIC_ALGORITHMS if self.jwks_url else SYMMETRIC_ALGORITHMS


def load_key_source(
    settings: AuthSettings,
    environment: Environment | None = None,
    log: logging.Logger | None = None,
) -> KeySource:
    """The key source the server checks tokens with; raises `ConfigurationError` when there
    is none it may use, so that the server does not start.

    Order: the JWKS URL, else the configured secret, else (development and test only) the
    secret kept in `data_dir/jwt-secret`, made on first use.
    """
    environment = environment or settings.environment
    logger = log or _log
    if settings.jwt_secret is not None and settings.jwks_url:  # model_copy skips validators
        raise ConfigurationError("set either APP_AUTH_JWT_SECRET or APP_AUTH_JWKS_URL, not both")
    if settings.jwks_url:
        _check_jwks_url(settings.jwks_url, environment)
        logger.info("checking bearer tokens against the JWKS at %s", settings.jwks_url)
        return JwksKeySource(
            settings.jwks_url,
            issuer=settings.issuer,
            audience=settings.audience,
            leeway_seconds=settings.leeway_seconds,
        )
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
        check_secret(secret, environment, logger)
        logger.info("checking bearer tokens with the configured HS256 shared secret")
        return _secret_source(secret, settings)
    if environment not in _DEVELOPMENT_ENVIRONMENTS:
        raise ConfigurationError(
            f"no token key in {environment}: set APP_AUTH_JWKS_URL (identity provider) or "
            "APP_AUTH_JWT_SECRET; the server does not start without one"
        )
    return _secret_source(development_secret(settings.data_dir, logger), settings)


def _secret_source(secret: str, settings: AuthSettings) -> SecretKeySource:
    return SecretKeySource(
        secret,
        issuer=settings.issuer,
        audience=settings.audience,
        leeway_seconds=settings.leeway_seconds,
    )


def check_secret(secret: str, environment: str, log: logging.Logger) -> None:
    """Refuses a weak shared secret outside development and test; inside them a weak secret
    is only warned about, so a quick local experiment still works."""
    problem = _secret_weakness(secret)
    if problem is None:
        return
    if environment in _DEVELOPMENT_ENVIRONMENTS:
        log.warning("APP_AUTH_JWT_SECRET %s; acceptable in %s only", problem, environment)
        return
    raise ConfigurationError(f"APP_AUTH_JWT_SECRET {problem}; refused in {environment}")


def _secret_weakness(secret: str) -> str | None:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        return f"is shorter than {MIN_SECRET_BYTES} bytes"
    lowered = secret.strip().lower()
    if lowered in PLACEHOLDER_SECRETS or any(m in lowered for m in PLACEHOLDER_MARKERS):
        return "looks like a placeholder"
    if len(set(secret)) < MIN_DISTINCT_CHARACTERS:
        return "has too few distinct characters to be random"
    return None


def _check_jwks_url(url: str, environment: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.netloc:
        raise ConfigurationError(f"APP_AUTH_JWKS_URL is not an http(s) URL: {url!r}")
    # Over plain HTTP anyone on the path could hand the server their own signing keys.
    if parts.scheme == "http" and environment not in _DEVELOPMENT_ENVIRONMENTS:
        raise ConfigurationError(f"APP_AUTH_JWKS_URL must use https in {environment}")


def development_secret(data_dir: Path, log: logging.Logger) -> str:
    """The development secret in `data_dir/jwt-secret`: read if there, else made once.

    The file is created with mode 0600 through a private temporary file and a hard link, so
    two workers starting at the same time end up with the same secret and nobody ever reads
    a half-written file. A file that group or others can read is refused rather than fixed:
    its secret may already have leaked.
    """
    path = data_dir / SECRET_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        candidate = secrets.token_urlsafe(48)
        temporary = data_dir / f".{SECRET_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask was
            os.write(fd, (candidate + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
            created = True
        except FileExistsError:  # another worker won the race: use its secret
            created = False
        finally:
            temporary.unlink()
        if created:
            log.warning(
                "no APP_AUTH_JWT_SECRET or APP_AUTH_JWKS_URL set: generated a development "
                "token secret in %s (mode 0600); `python -m app token` signs with it. "
                "Never use this in production.",
                path,
            )
    return _read_secret_file(path, log)


def _read_secret_file(path: Path, log: logging.Logger) -> str:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): its secret may have leaked; delete it to "
            "have a new one made, or chmod 600 it"
        )
    secret = path.read_text().strip()
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(f"{path} holds no usable secret: delete it to have one made")
    log.warning("using the development token secret in %s (development and test only)", path)
    return secret
