"""The node's HTTP admin API (aiohttp): health, metrics, status, JSON lookups.

| method | path | what | token |
| --- | --- | --- | --- |
| GET | /healthz | the process answers | no |
| GET | /readyz | 200 once serving, 503 while starting or draining | no |
| GET | /metrics | Prometheus text format | yes |
| GET | /v1/status | JSON status and statistics of the cache | yes |
| POST | /v1/match | `{"keys": [hex], "window"?: n}` -> `{num_blocks, tiers}` | yes |
| POST | /v1/contains | `{"keys": [hex...]}` -> `{"present": [bool...]}` | yes |
| GET | /v1/keys | `?group=&limit=` -> `{"keys": [BlockInfo...]}` | yes |
| GET | /v1/cluster | the cluster as this node sees it (404 standalone) | yes |
| GET | /openapi.json | this API as OpenAPI 3 | no |

With ``server.auth_token`` set, "token" routes need ``Authorization: Bearer <token>``
(401 otherwise); health and readiness stay open for orchestrators' probes. A tenant's
token (``server.tenant_tokens``) opens ``/v1/match`` and ``/v1/contains`` only, over
its own blocks (:mod:`kvtier.server.tenants`); the other routes answer it 403. Bad
requests get 400 with ``{"error": message}``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvtier._http import error, json_object, openapi_handler
from kvtier.core.keys import BlockKey
from kvtier.results import jsonable
from kvtier.server.tenants import OPERATOR, Caller, identify, scope_keys

if TYPE_CHECKING:
    from kvtier.server.node import Node

__all__ = ["build_app", "start_http"]

_DEFAULT_LIMIT = 1000
_MAX_LIMIT = 100_000
NODE_KEY: web.AppKey[Node] = web.AppKey("node")
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)  # who sent it


class _BadRequest(Exception):
    pass


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=16 << 20)
    app[NODE_KEY] = node
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/status", _status)
    app.router.add_post("/v1/match", _match)
    app.router.add_post("/v1/contains", _contains)
    app.router.add_get("/v1/keys", _keys)
    app.router.add_get("/v1/cluster", _cluster)
    app.router.add_get("/openapi.json", openapi_handler("kvtier.server"))
    return app


async def start_http(
    node: Node, host: str, port: int, tls: ssl.SSLContext | None
) -> web.AppRunner:
    runner = web.AppRunner(build_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True)
    await site.start()
    return runner


_OPEN = {"/healthz", "/readyz", "/openapi.json"}
_TENANT_ROUTES = {"/v1/match", "/v1/contains"}


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    caller = OPERATOR
    if request.path not in _OPEN:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        server = request.app[NODE_KEY].config.server
        found = identify(server, token if scheme == "Bearer" else "")
        if found is None:
            return error(401, "send Authorization: Bearer <the node's token>")
        caller = found
        if not caller.is_operator and request.path not in _TENANT_ROUTES:
            return error(403, f"{request.path} needs the operators' token")
    request[CALLER] = caller
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except _BadRequest as exc:
        return error(400, str(exc))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[NODE_KEY].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[NODE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].status())


async def _match(request: web.Request) -> web.Response:
    body = await json_object(request, _BadRequest)
    keys = _hex_keys(request, body)
    window = body.get("window")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise _BadRequest(f"window must be a positive int, got {window!r}")
    match = request.app[NODE_KEY].store.match(keys, window=window)
    return web.json_response({"num_blocks": match.num_blocks, "tiers": match.tiers})


async def _contains(request: web.Request) -> web.Response:
    keys = _hex_keys(request, await json_object(request, _BadRequest))
    return web.json_response({"present": request.app[NODE_KEY].store.contains(keys)})


async def _keys(request: web.Request) -> web.Response:
    group = request.query.get("group")
    limit = _int_param(request, "limit", _DEFAULT_LIMIT)
    infos = request.app[NODE_KEY].store.list(group, limit)
    return web.json_response({"keys": jsonable(infos)})


async def _cluster(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.cluster is None:
        return error(404, "this node is not in a cluster (server runs standalone)")
    return web.json_response(node.cluster.view())


def _hex_keys(request: web.Request, body: dict[str, Any]) -> list[BlockKey]:
    """The body's keys, scoped to the caller (a tenant's are its own)."""
    keys = body.get("keys")
    most = request.app[NODE_KEY].config.server.max_keys_per_request
    if not isinstance(keys, list) or len(keys) > most:
        raise _BadRequest(f"keys must be a list of at most {most} hex keys")
    parsed = []
    for i, key in enumerate(keys):
        try:
            raw = bytes.fromhex(key)
        except (TypeError, ValueError):
            raw = b""
        if len(raw) != 16:
            raise _BadRequest(f"keys[{i}] must be 32 hex digits, got {key!r}")
        parsed.append(raw)
    return scope_keys(request[CALLER], parsed)


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise _BadRequest(f"{name} must be an integer, got {raw!r}") from exc
    if not 0 < value <= _MAX_LIMIT:
        raise _BadRequest(f"{name} must be in [1, {_MAX_LIMIT}], got {value}")
    return value
