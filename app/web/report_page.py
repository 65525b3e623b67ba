"""`GET /report`: the trial report as a page, self-contained.

The HTML, script and style sheet are files of this package, served by the app: nothing
comes from another origin, and the page's Content-Security-Policy (app.middleware) says so.
The page holds no data: it asks for a bearer token (pasted, or in the URL fragment
`#token=...`, which a browser never sends to a server), keeps it in the tab's
sessionStorage only, and fetches the report's operations with it.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(tags=["Report"])

_STATIC = files("app.web") / "static"
_ASSETS = {
    "report.js": "text/javascript; charset=utf-8",
    "report.css": "text/css; charset=utf-8",
}
_PAGE = (_STATIC / "report.html").read_bytes()
_FILES = {name: (_STATIC / name).read_bytes() for name in _ASSETS}


@router.get(
    "/report",
    operation_id="getReportPage",
    summary="The trial report as a page for a browser (asks for a bearer token)",
    description="Self-contained HTML: its script and style sheet come from this server only. "
    "Open it as `/report#token=<JWT>` or paste the token; the page keeps it in the tab's "
    "session storage and shows the summary, the swimmer plot, the per-site table and the "
    "listing, each row opening its platelet chart. `?site=S01` narrows it to a site.",
    response_class=HTMLResponse,
    responses={200: {"description": "The page", "content": {"text/html": {}}}},
)
async def report_page() -> Response:
    return Response(_PAGE, media_type="text/html; charset=utf-8")


@router.get("/report/report.js", include_in_schema=False)
async def report_script() -> Response:
    return Response(_FILES["report.js"], media_type=_ASSETS["report.js"])


@router.get("/report/report.css", include_in_schema=False)
async def report_style() -> Response:
    return Response(_FILES["report.css"], media_type=_ASSETS["report.css"])
