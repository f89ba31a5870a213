"""A small Confluent-compatible schema registry for tests, the demo and fault injection.

It speaks the part of the Schema Registry REST API that Avro producers and consumers use
(confluent-kafka's ``SchemaRegistryClient``, Herald's serializer, kafka-avro-console tools):

    POST   /subjects/{subject}/versions      register (the same schema text keeps its id)
    POST   /subjects/{subject}               look a schema up under a subject
    GET    /schemas/ids/{id}                 a schema by its global id
    GET    /schemas/ids/{id}/versions        (subject, version) pairs of an id
    GET    /schemas/types                    ["AVRO"]
    GET    /subjects                         every subject
    GET    /subjects/{subject}/versions      its versions
    GET    /subjects/{subject}/versions/{v}  one version, or "latest"

Schemas survive a restart (a JSON file, written atomically), so a test can stop the
registry to make it unreachable and start it again with the same ids, as a real registry
keeps them in its ``_schemas`` topic. It does not check compatibility. Run it as a process:

    python -m devtools.registry --port 8081 --data /tmp/registry.json

With ``--basic-auth USER:PASSWORD`` or ``--bearer-token TOKEN`` every request must carry
those credentials (401 otherwise); with ``--tls-cert``/``--tls-key`` (PEM) it serves https.

It is not a production registry; point Herald at Confluent Schema Registry, Karapace,
Redpanda or Apicurio (ccompat API) there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import os
import signal
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class Store:
    """Subjects, versions and global ids; persisted after every change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.schemas: dict[int, str] = {}  # id -> schema text
        self.subjects: dict[str, list[int]] = {}  # subject -> ids by version (1-based)
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            self.schemas = {int(k): v for k, v in data["schemas"].items()}
            self.subjects = data["subjects"]

    def register(self, subject: str, schema: str) -> int:
        canonical = _canonical(schema)
        schema_id = next((i for i, s in self.schemas.items() if _canonical(s) == canonical), None)
        if schema_id is None:
            schema_id = max(self.schemas, default=0) + 1
            self.schemas[schema_id] = schema
        versions = self.subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
        self._save()
        return schema_id

    def lookup(self, subject: str, schema: str) -> tuple[int, int] | None:
        canonical = _canonical(schema)
        for version, schema_id in enumerate(self.subjects.get(subject, []), start=1):
            if _canonical(self.schemas[schema_id]) == canonical:
                return schema_id, version
        return None

    def _save(self) -> None:
        if self.path is None:
            return
        data = {"schemas": self.schemas, "subjects": self.subjects}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)


def _canonical(schema: str) -> str:
    try:
        return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return schema


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=CONTENT_TYPE)


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"error_code": code, "message": message}, status)


def create_app(
    store: Store,
    basic_auth: tuple[str, str] | None = None,
    bearer_token: str | None = None,
) -> web.Application:
    routes = web.RouteTableDef()
    expected: str | None = None
    if basic_auth is not None:
        expected = "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
    elif bearer_token is not None:
        expected = f"Bearer {bearer_token}"

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if expected is not None and not hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), expected.encode()
        ):
            return _error(401, 40101, "Unauthorized")
        result: web.StreamResponse = await handler(request)
        return result

    async def _body(request: web.Request) -> tuple[str, str] | web.Response:
        try:
            body = await request.json()
            schema = body["schema"]
        except (ValueError, KeyError, TypeError):
            return _error(422, 42201, "Invalid schema: expected a JSON body with 'schema'")
        kind = body.get("schemaType", "AVRO")
        if kind != "AVRO":
            return _error(422, 42201, f"Invalid schema type {kind!r}: this registry takes AVRO")
        return request.match_info["subject"], str(schema)

    @routes.post("/subjects/{subject}/versions")
    async def register(request: web.Request) -> web.Response:
        parsed = await _body(request)
        if isinstance(parsed, web.Response):
            return parsed
        subject, schema = parsed
        return _json({"id": store.register(subject, schema)})

    @routes.post("/subjects/{subject}")
    async def lookup(request: web.Request) -> web.Response:
        parsed = await _body(request)
        if isinstance(parsed, web.Response):
            return parsed
        subject, schema = parsed
        found = store.lookup(subject, schema)
        if found is None:
            return _error(404, 40403, "Schema not found")
        schema_id, version = found
        return _json({"subject": subject, "id": schema_id, "version": version, "schema": schema})

    @routes.get("/schemas/ids/{id}")
    async def by_id(request: web.Request) -> web.Response:
        schema = store.schemas.get(int(request.match_info["id"]))
        if schema is None:
            return _error(404, 40403, "Schema not found")
        return _json({"schema": schema})

    @routes.get("/schemas/ids/{id}/versions")
    async def id_versions(request: web.Request) -> web.Response:
        schema_id = int(request.match_info["id"])
        pairs = [
            {"subject": subject, "version": v}
            for subject, ids in store.subjects.items()
            for v, i in enumerate(ids, start=1)
            if i == schema_id
        ]
        return _json(pairs) if pairs else _error(404, 40403, "Schema not found")

    @routes.get("/schemas/types")
    async def types(request: web.Request) -> web.Response:
        return _json(["AVRO"])

    @routes.get("/subjects")
    async def subjects(request: web.Request) -> web.Response:
        return _json(sorted(store.subjects))

    @routes.get("/subjects/{subject}/versions")
    async def versions(request: web.Request) -> web.Response:
        ids = store.subjects.get(request.match_info["subject"])
        if ids is None:
            return _error(404, 40401, "Subject not found")
        return _json(list(range(1, len(ids) + 1)))

    @routes.get("/subjects/{subject}/versions/{version}")
    async def version(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        ids = store.subjects.get(subject)
        if ids is None:
            return _error(404, 40401, "Subject not found")
        raw = request.match_info["version"]
        number = len(ids) if raw in ("latest", "-1") else int(raw)
        if not 1 <= number <= len(ids):
            return _error(404, 40402, "Version not found")
        schema_id = ids[number - 1]
        schema = store.schemas[schema_id]
        return _json({"subject": subject, "version": number, "id": schema_id, "schema": schema})

    app = web.Application(middlewares=[auth])
    app.add_routes(routes)
    return app


async def serve(
    host: str,
    port: int,
    store: Store,
    basic_auth: tuple[str, str] | None = None,
    bearer_token: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    runner = web.AppRunner(create_app(store, basic_auth, bearer_token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    scheme = "https" if tls is not None else "http"
    print(f"schema registry listening on {scheme}://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.registry", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--data", type=Path, help="JSON file the schemas persist in")
    creds = parser.add_mutually_exclusive_group()
    creds.add_argument("--basic-auth", help="USER:PASSWORD required on every request")
    creds.add_argument("--bearer-token", help="TOKEN required on every request (Bearer)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve https")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    auth: tuple[str, str] | None = None
    if args.basic_auth:
        user, _, password = args.basic_auth.partition(":")
        auth = (user, password)
    tls: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    elif args.tls_key is not None:
        parser.error("--tls-key needs --tls-cert")
    asyncio.run(serve(args.host, args.port, Store(args.data), auth, args.bearer_token, tls))


if __name__ == "__main__":
    main()
