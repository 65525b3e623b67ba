"""The identities the fuzzer calls the API as: a Web Fuzzing Commons (WFC) auth document.

schemathesis's object_level_authorization check replays one identity's successful reads as
another and fails when the other gets the object. It needs two *peers*, identities that must
not see each other's objects: here two investigators of different sites (site isolation,
README "Sites"; another site's records answer 404). schemathesis sends each operation as
the first identity it admits, in document order (an investigator of S01, then none, then
the investigator of S02, then the admin): the admin is last so that what only an admin or a
monitor may do (the audit trail) is fuzzed too, and it is no peer (an admin sees every site).

Used by tests/test_fuzz.py (tokens signed with the test key) and scripts/fuzz.sh
(`python -m tests.fuzz.identities FILE`, tokens signed with the server's configured key).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

# name -> (role, sites); the `sub` of each token is its name.
IDENTITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "investigator-S01": ("investigator", ("S01",)),
    "investigator-S02": ("investigator", ("S02",)),
    "fuzz-admin": ("admin", ("S01",)),
}
PEERS = ("investigator-S01", "investigator-S02")

Mint = Callable[[str, tuple[str, ...], str], str]  # (role, sites, sub) -> token


def write_document(path: Path, mint: Mint) -> None:
    """Write the WFC document: each identity sends its bearer token as a fixed header."""
    auth = [
        {
            "name": name,
            "fixedHeaders": [
                {"name": "Authorization", "value": f"Bearer {mint(role, sites, name)}"}
            ],
        }
        for name, (role, sites) in IDENTITIES.items()
    ]
    path.write_text(json.dumps({"auth": auth}))
    path.chmod(0o600)


def _mint_with_server_key(role: str, sites: tuple[str, ...], sub: str) -> str:
    from app.auth.settings import AuthSettings, load_key_source
    from app.auth.tokens import TokenGrant, issue_token
    from app.settings import get_settings

    settings = AuthSettings(environment=get_settings().environment)
    grant = TokenGrant(sub, role, list(sites))
    return issue_token(load_key_source(settings), grant, minutes=240)


if __name__ == "__main__":
    write_document(Path(sys.argv[1]), _mint_with_server_key)
