"""What the node's admin API and the router's API share (aiohttp): JSON errors,
bearer-token checks, JSON object bodies and the OpenAPI document beside a module."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

__all__ = ["Handler", "bearer_auth", "error", "json_object", "openapi_handler"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    """The JSON error every API answers: ``{"error": message}``."""
    return web.json_response({"error": message}, status=status)


def bearer_auth(
    token_of: Callable[[web.Request], str], open_paths: frozenset[str], who: str
) -> Any:
    """Middleware: with a token set, every path but ``open_paths`` needs
    ``Authorization: Bearer <token>`` (401 otherwise; compared in constant time)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = token_of(request)
        if token and request.path not in open_paths:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, f"send Authorization: Bearer <{who}>")
        return await handler(request)

    return check


async def json_object(
    request: web.Request, bad: Callable[[str], Exception]
) -> dict[str, Any]:
    """The request's body as a JSON object; ``bad(message)`` is raised otherwise."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the body must be JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def openapi_handler(package: str) -> Handler:
    """A handler serving ``openapi.json`` of ``package`` (read once)."""
    document = json.loads(resources.files(package).joinpath("openapi.json").read_text())

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    return serve
