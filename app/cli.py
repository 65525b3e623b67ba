"""`python -m app COMMAND`: the operator's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    from app.main import create_app
    from app.settings import Settings

    # The document must not depend on the machine's environment.
    return create_app(Settings(database_url="sqlite:///:memory:")).openapi()


def render_openapi() -> str:
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def _openapi(args: argparse.Namespace) -> int:
    text = render_openapi()
    if args.check:
        if not OPENAPI_PATH.exists() or OPENAPI_PATH.read_text() != text:
            print(f"{OPENAPI_PATH} is stale: run `python -m app openapi`", file=sys.stderr)
            return 1
        print(f"{OPENAPI_PATH} is up to date")
        return 0
    OPENAPI_PATH.parent.mkdir(parents=True, exist_ok=True)
    OPENAPI_PATH.write_text(text)
    print(f"wrote {OPENAPI_PATH}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    openapi = commands.add_parser("openapi", help="write openapi/openapi.json from the app")
    openapi.add_argument("--check", action="store_true",
                         help="exit 1 if the file differs from what the app generates")
    openapi.set_defaults(handler=_openapi)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result
