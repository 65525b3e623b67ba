"""The two reference servers the API is measured against, in one ASGI app.

- `POST /Observation`: the **bare ceiling**. The floor Python and PostgreSQL allow for a
  create: orjson parses the body, fhir.resources validates it as an R4B Observation, asyncpg
  inserts it into one table (a durable, autocommitted INSERT), 201 with the body. No auth, no
  audit, no index, no recompute.
- `GET /hello`: a FastAPI hello-world route, the ceiling of a read (the issue's measure).
- `GET /Observation/{id}`: the **bare read**, the floor of a read that touches the
  database: asyncpg selects the stored JSON of the API's own current Observation by its id
  (the API's table and index, in the same database), 200 with it, 404 if there is none. No
  auth, no audit, no transaction, no FHIR rendering: it shows how much of the distance from
  hello-world one PostgreSQL round trip alone takes.

Run with `uvicorn bench.servers:app --workers N`; `BENCH_DSN` names the database.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI
from fhir.resources.R4B.observation import Observation

TABLE = "bench_ceiling"
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    pk bigserial PRIMARY KEY,
    patient text,
    effective text,
    content jsonb NOT NULL
)
"""

hello = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@hello.get("/hello")
async def hello_world() -> dict[str, str]:
    return {"hello": "world"}


_pool: asyncpg.Pool | None = None


async def _startup() -> None:
    global _pool
    size = int(os.environ.get("BENCH_POOL_SIZE", "16"))
    _pool = await asyncpg.create_pool(os.environ["BENCH_DSN"], min_size=size, max_size=size)
    async with _pool.acquire() as conn:
        # Another worker may create it at the same instant.
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await conn.execute(DDL)


async def _reply(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/fhir+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _ceiling(scope: Any, receive: Any, send: Any) -> None:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    try:
        raw = orjson.loads(b"".join(chunks))
        observation = Observation.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - any bad body is a 400 here
        await _reply(send, 400, orjson.dumps({"error": str(exc)[:200]}))
        return
    assert _pool is not None
    body = orjson.dumps(raw)
    await _pool.execute(
        f"INSERT INTO {TABLE} (patient, effective, content) VALUES ($1, $2, $3::jsonb)",
        observation.subject.reference if observation.subject else None,
        raw.get("effectiveDateTime"),
        body.decode(),
    )
    await _reply(send, 201, body)


_READ = (
    "SELECT content FROM resource WHERE resource_type = 'Observation' AND id = $1 AND NOT deleted"
)


async def _bare_read(resource_id: str, send: Any) -> None:
    assert _pool is not None
    content = await _pool.fetchval(_READ, resource_id)
    if content is None:
        await _reply(send, 404, b'{"error":"not found"}')
    else:
        await _reply(send, 200, content.encode())


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await _startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _pool is not None:
                    await _pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/Observation" and scope["method"] == "POST":
        await _ceiling(scope, receive, send)
    elif path.startswith("/Observation/") and scope["method"] == "GET":
        await _bare_read(path.removeprefix("/Observation/"), send)
    else:
        await hello(scope, receive, send)
