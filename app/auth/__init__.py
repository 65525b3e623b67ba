"""Authentication (bearer JWTs) and authorisation (roles, SMART scopes, sites).

`settings.load_key_source` picks the key at start-up; `KeySource.decode` checks a token;
`principal_from_claims` says who is calling; `permissions.authorize` and `may_access_site`
say whether they may.
"""

from app.auth.permissions import (
    ROLE_MATRIX,
    SCOPE_LETTER,
    Action,
    allowed_actions,
    authorize,
    authorize_observation_write,
    default_scopes,
    lab_may_write_observation,
    matrix_markdown,
    may_access_site,
)
from app.auth.principal import (
    DEFAULT_SCOPES,
    Principal,
    Role,
    Scope,
    parse_scopes,
    principal_from_claims,
)
from app.auth.settings import AuthSettings, development_secret, load_key_source
from app.auth.tokens import (
    JwksKeySource,
    KeySource,
    SecretKeySource,
    TokenGrant,
    issue_token,
)
from app.kit.errors import Unauthorized

__all__ = [
    "DEFAULT_SCOPES",
    "ROLE_MATRIX",
    "SCOPE_LETTER",
    "Action",
    "AuthSettings",
    "JwksKeySource",
    "KeySource",
    "Principal",
    "Role",
    "Scope",
    "SecretKeySource",
    "TokenGrant",
    "Unauthorized",
    "allowed_actions",
    "authorize",
    "authorize_observation_write",
    "default_scopes",
    "development_secret",
    "issue_token",
    "lab_may_write_observation",
    "load_key_source",
    "matrix_markdown",
    "may_access_site",
    "parse_scopes",
    "principal_from_claims",
]
