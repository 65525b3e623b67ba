"""`python -m app COMMAND`: the operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    from app.auth.tokens import SecretKeySource
    from app.main import create_app
    from app.settings import Settings

    # The document must not depend on the machine's environment (nor create a key file).
    key = SecretKeySource("x" * 32, issuer="openapi", audience="openapi")
    return create_app(Settings(database_url="sqlite:///:memory:"), key_source=key).openapi()


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


async def _with_services(work: Any) -> Any:
    from app.audit.trail import AuditQueue
    from app.services.context import ServiceContext
    from app.settings import get_criteria_settings, get_settings
    from app.store.db import Database

    settings = get_settings()
    criteria = get_criteria_settings()
    db = Database.from_url(settings.database_url)
    audit = AuditQueue(db)
    try:
        ctx = ServiceContext(
            db,
            criteria.to_criteria(),
            settings.code_systems(),
            audit,
            criteria.input_limits(),
        )
        return await work(ctx)
    finally:
        await audit.flush()
        await db.dispose()


def _audit(args: argparse.Namespace) -> int:
    from app.audit.trail import parse_anchor, verify
    from app.settings import get_settings
    from app.store.db import Database

    try:
        anchors = dict(parse_anchor(text) for text in args.anchor)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def run() -> Any:
        db = Database.from_url(get_settings().database_url)
        try:
            return await verify(db, anchors=anchors)
        finally:
            await db.dispose()

    result = asyncio.run(run())
    if result.broken_seq is None:
        print(f"audit trail intact: {result.checked} records, hash chain verified")
        if anchors:
            print(f"anchors found with their hashes: {len(anchors)}")
        if result.head_seq is not None:
            # Kept outside the database, it lets a later run see a cut-off tail (--anchor).
            print(
                f"head (keep it elsewhere; pass it back with --anchor): "
                f"{result.head_seq}:{result.head_hash}"
            )
        return 0
    print(
        f"audit trail BROKEN at record seq={result.broken_seq} id={result.broken_id}: "
        f"{result.problem} ({result.checked} records before it verified)",
        file=sys.stderr,
    )
    return 1


def _recompute(_args: argparse.Namespace) -> int:
    from app.services.response import recompute_all

    def progress(done: int, total: int, changed: int) -> None:
        print(f"\r{done}/{total} patients, {changed} changed", end="", file=sys.stderr)

    total, changed = asyncio.run(_with_services(lambda ctx: recompute_all(ctx, progress)))
    print(
        f"\nre-evaluated {total} patients under the current criteria; {changed} changed "
        "(new response-status versions written only for those)"
    )
    return 0


def _demo(_args: argparse.Namespace) -> int:
    from app.services import demo
    from app.services.response import response_summary

    async def load(ctx: Any) -> dict[str, Any]:
        await demo.load(ctx, progress=lambda line: print(line, file=sys.stderr))
        summary: dict[str, Any] = await response_summary(ctx, demo.LOADER)
        return summary

    try:
        summary = asyncio.run(_with_services(load))
    except demo.DemoAlreadyLoaded as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "criteria"}, indent=2))
    return 0


def _token(args: argparse.Namespace) -> int:
    import logging

    from app.auth.settings import AuthSettings, load_key_source
    from app.auth.tokens import issue_token
    from app.errors import ConfigurationError
    from app.settings import get_settings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = AuthSettings(environment=get_settings().environment)
    try:
        key_source = load_key_source(settings)
        token = issue_token(
            key_source,
            role=args.role,
            sites=[site for site in args.sites.split(",") if site],
            sub=args.sub,
            scope=args.scope,
            minutes=args.minutes if args.minutes is not None else settings.token_minutes,
        )
    except (ConfigurationError, ValueError) as exc:
        print(f"cannot issue a token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    openapi = commands.add_parser("openapi", help="write openapi/openapi.json from the app")
    openapi.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the file differs from what the app generates",
    )
    openapi.set_defaults(handler=_openapi)
    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain; names the first broken record (exit 1)"
    )
    verify.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a head an earlier run printed, kept elsewhere: it must still be in the chain "
        "(detects records cut off the end); may be repeated",
    )
    verify.set_defaults(handler=_audit)
    token = commands.add_parser(
        "token", help="print a bearer token signed with the configured secret (APP_AUTH_*)"
    )
    token.add_argument("--role", required=True, choices=["lab", "investigator", "monitor", "admin"])
    token.add_argument("--sites", default="", help="comma-separated site codes, e.g. S01,S02")
    token.add_argument("--sub", default="cli-user", help="who the token is for")
    token.add_argument("--scope", default=None, help="SMART v2 scopes (default: the role's)")
    token.add_argument("--minutes", type=int, default=None, help="lifetime (default 60)")
    token.set_defaults(handler=_token)
    commands.add_parser(
        "recompute", help="re-evaluate every patient under the current ITP_* criteria"
    ).set_defaults(handler=_recompute)
    commands.add_parser(
        "demo", help="load a synthetic 20-patient trial (needs migrated DATABASE_URL)"
    ).set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result
