"""`python -m app COMMAND`: the operator's commands.

A command that cannot run (a setting that does not parse, a database that is unreachable,
missing or not migrated) prints one line naming the cause and the fix and exits 2; `--debug`
prints the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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
    from app.audit.chain import ChainSequencer
    from app.audit.trail import AuditQueue
    from app.services.context import ServiceContext
    from app.settings import get_criteria_settings, get_settings
    from app.startup import check_database
    from app.store.db import Database

    settings = get_settings()
    criteria = get_criteria_settings()
    await check_database(settings.database_url)
    db = Database.from_url(settings.database_url)
    audit = AuditQueue(db, max_records=settings.audit_queue_max, spill_dir=settings.audit_spill_dir)
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
        await audit.stop()
        # No server may be running: what this command wrote is chained before it exits.
        await ChainSequencer(db, settings.audit_chain_delay_ms).stop()
        await db.dispose()


def _audit(args: argparse.Namespace) -> int:
    from app.audit.chain import parse_anchor, verify
    from app.settings import get_settings
    from app.startup import check_database
    from app.store.db import Database

    try:
        anchors = dict(parse_anchor(text) for text in args.anchor)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def run() -> Any:
        settings = get_settings()
        await check_database(settings.database_url)
        db = Database.from_url(settings.database_url)
        try:
            return await verify(db, anchors=anchors, chain_delay_ms=settings.audit_chain_delay_ms)
        finally:
            await db.dispose()

    result = asyncio.run(run())
    if result.broken is None:
        print(f"audit trail intact: {result.checked} records, hash chain verified")
        if result.unchained:
            print(f"records not chained yet, within the sequencer's delay: {result.unchained}")
        if anchors:
            print(f"anchors found with their hashes: {len(anchors)}")
        if result.head is not None:
            # Kept outside the database, it lets a later run see a cut-off tail (--anchor).
            print(
                f"head (keep it elsewhere; pass it back with --anchor): "
                f"{result.head[0]}:{result.head[1]}"
            )
        return 0
    broken = result.broken
    where = f" at record seq={broken.seq} id={broken.audit_id}" if broken.seq is not None else ""
    print(
        f"audit trail BROKEN{where}: {broken.problem} "
        f"({result.checked} records before it verified)",
        file=sys.stderr,
    )
    return 1


def _recompute(args: argparse.Namespace) -> int:
    from app.services.response import DEFAULT_RECOMPUTE_REASON, recompute_all

    reason = (args.reason if args.reason is not None else DEFAULT_RECOMPUTE_REASON).strip()
    if not reason:
        print("--reason must not be empty: it is each new status's reason", file=sys.stderr)
        return 2

    def progress(done: int, total: int, changed: int) -> None:
        print(f"\r{done}/{total} patients, {changed} changed", end="", file=sys.stderr)

    report = asyncio.run(_with_services(lambda ctx: recompute_all(ctx, progress, reason)))
    print(file=sys.stderr)
    print(
        f"re-evaluated {report.patients} patients under the current criteria; "
        f"{len(report.changed)} changed (a new response-status version each, with a "
        f"Provenance whose reason is {reason!r}); {report.refreshed} kept their result "
        "(stored assessment refreshed with the new criteria or classifications, no new "
        "version); the others had nothing to write"
    )
    for patient_id, before, after in report.changed:
        print(f"Patient/{patient_id}: {before or 'none'} -> {after}")
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
    from app.auth.tokens import TokenGrant, issue_token
    from app.kit.errors import ConfigurationError
    from app.settings import get_settings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = AuthSettings(environment=get_settings().environment)
    try:
        key_source = load_key_source(settings)
        grant = TokenGrant(
            sub=args.sub,
            role=args.role,
            sites=[site for site in args.sites.split(",") if site],
            scope=args.scope,
        )
        minutes = args.minutes if args.minutes is not None else settings.token_minutes
        token = issue_token(key_source, grant, minutes=minutes)
    except (ConfigurationError, ValueError) as exc:
        print(f"cannot issue a token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _check(_args: argparse.Namespace) -> int:
    from app.main import create_app
    from app.startup import check_database

    # What the server's start checks: settings, criteria, token key, then the database.
    settings = create_app().state.settings
    revision = asyncio.run(check_database(settings.database_url))
    print(f"ready to serve: settings valid, database at migration {revision} (the head)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from app.startup import explain

    try:
        result: int = args.handler(args)
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        line = explain(error, _database_url())
        if line is None:
            line = f"unexpected {type(error).__name__}: {error} (`--debug` shows the traceback)"
        print(f"error: {line}", file=sys.stderr)
        return 2
    return result


def _database_url() -> str | None:
    from app.settings import get_settings

    try:
        return get_settings().database_url
    except Exception:  # the settings themselves are what failed
        return None


def _cli_audit(description: str) -> Any:
    import getpass

    from app.audit.trail import AuditRecord

    # The operator at the server, as the audit trail names a person.
    return AuditRecord(
        "operation", agent=f"cli:{getpass.getuser()}", role="system", description=description
    )


def _export_sdtm(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # type: ignore[import-untyped]

    from app.auth.policy import SYSTEM_ACCESS
    from app.services import sdtm
    from app.settings import get_settings

    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    formats: list[Literal["xpt", "csv"]] = (
        ["xpt", "csv"] if args.format == "both" else [args.format]
    )
    study_id = get_settings().study_id

    async def run(ctx: Any) -> list[str]:
        patients = await sdtm.patient_count(ctx, SYSTEM_ACCESS)
        written = []
        for code in sdtm.DOMAINS:
            for fmt in formats:
                file = sdtm.DatasetFile(code, fmt, directory)
                with tqdm(total=patients, desc=file.name, unit="subject") as bar:
                    path, rows = await sdtm.write_dataset(
                        ctx, file, SYSTEM_ACCESS, study_id, bar.update
                    )
                written.append(f"{path} ({rows} rows)")
                ctx.audit.add(_cli_audit(f"SDTM {file.name}: {rows} rows to {path}"))
        return written

    for line in asyncio.run(_with_services(run)):
        print(line)
    return 0


def _export_ndjson(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from app.services.bulk_export import write_ndjson
    from app.settings import get_settings

    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)

    async def run(ctx: Any) -> dict[str, Any]:
        with tqdm(unit="resource", desc="export") as bar:

            def progress(resource_type: str, count: int) -> None:
                bar.set_description(resource_type)
                bar.update(count)

            manifest = await write_ndjson(
                ctx, directory, get_settings().export_file_resources, progress
            )
        total = sum(item["count"] for item in manifest["output"])
        ctx.audit.add(_cli_audit(f"$export (ndjson to {directory}): {total} resources"))
        return manifest

    manifest = asyncio.run(_with_services(run))
    for item in manifest["output"]:
        print(f"{directory / item['url']} ({item['count']} {item['type']})")
    print(
        f"transactionTime {manifest['transactionTime']}; manifest in {directory / 'manifest.json'}"
    )
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from app.serve import add_arguments, serve

    add_arguments(parser)
    parser.set_defaults(handler=serve)


def main(argv: list[str] | None = None) -> int:
    return _run(_parser().parse_args(argv))


Handler = Callable[[argparse.Namespace], int]


class _Commands:
    """Subcommands that each take --debug too, before or after the command."""

    def __init__(
        self, parser: argparse.ArgumentParser, dest: str, debug: argparse.ArgumentParser
    ) -> None:
        self._commands = parser.add_subparsers(dest=dest, required=True)
        self._debug = debug

    def add(
        self, name: str, summary: str, handler: Handler | None = None
    ) -> argparse.ArgumentParser:
        command = self._commands.add_parser(name, help=summary, parents=[self._debug])
        if handler is not None:
            command.set_defaults(handler=handler)
        return command

    def group(self, name: str, summary: str, dest: str) -> _Commands:
        return _Commands(self.add(name, summary), dest, self._debug)


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command (`python -m app demo --debug`).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, print the traceback instead of the one-line explanation",
    )
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__, parents=[debug])
    commands = _Commands(parser, "command", debug)
    _openapi_command(commands)
    _audit_commands(commands)
    _token_command(commands)
    _recompute_command(commands)
    commands.add("demo", "load a synthetic 20-patient trial (needs migrated DATABASE_URL)", _demo)
    commands.add(
        "check",
        "what the server checks at start: settings, token key, database reachable and "
        "migrated (exit 2 with the cause and the fix)",
        _check,
    )
    serve = commands.add(
        "serve",
        "the production server: uvicorn workers, each with a listening socket of its own "
        "(SO_REUSEPORT) so connections spread over them; exit 3 if a worker cannot start",
    )
    _serve_arguments(serve)
    _export_commands(commands)
    return parser


def _openapi_command(commands: _Commands) -> None:
    openapi = commands.add("openapi", "write openapi/openapi.json from the app", _openapi)
    openapi.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the file differs from what the app generates",
    )


def _audit_commands(commands: _Commands) -> None:
    audit = commands.group("audit", "audit trail tools", "audit_command")
    verify = audit.add(
        "verify", "check the hash chain; names the first broken record (exit 1)", _audit
    )
    verify.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a head an earlier run printed, kept elsewhere: it must still be in the chain "
        "(detects records cut off the end); may be repeated",
    )


def _token_command(commands: _Commands) -> None:
    token = commands.add(
        "token", "print a bearer token signed with the configured secret (APP_AUTH_*)", _token
    )
    token.add_argument("--role", required=True, choices=["lab", "investigator", "monitor", "admin"])
    token.add_argument("--sites", default="", help="comma-separated site codes, e.g. S01,S02")
    token.add_argument("--sub", default="cli-user", help="who the token is for")
    token.add_argument("--scope", default=None, help="SMART v2 scopes (default: the role's)")
    token.add_argument("--minutes", type=int, default=None, help="lifetime (default 60)")


def _recompute_command(commands: _Commands) -> None:
    recompute = commands.add(
        "recompute",
        "re-evaluate every patient under the current ITP_* criteria; lists each changed "
        "status (a new version with a Provenance giving the reason)",
        _recompute,
    )
    recompute.add_argument(
        "--reason",
        default=None,
        help="the reason for change of each new status version "
        '(default: "response rules version 2")',
    )


def _export_commands(commands: _Commands) -> None:
    export = commands.group("export", "write the trial's data out (SDTM, NDJSON)", "export_command")
    sdtm = export.add(
        "sdtm", "CDISC SDTM datasets DM EX CM LB AE RS into DIR (every site)", _export_sdtm
    )
    sdtm.add_argument("directory", metavar="DIR")
    sdtm.add_argument("--format", choices=["xpt", "csv", "both"], default="xpt")
    ndjson = export.add(
        "ndjson", "what a Bulk Data export writes (every type, every site) into DIR", _export_ndjson
    )
    ndjson.add_argument("directory", metavar="DIR")
