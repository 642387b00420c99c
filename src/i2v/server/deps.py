"""Typed FastAPI dependencies: what a route may know of a request — the service, the caller's owner id and
the base URL — and nothing more."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .limits import token_owner
from .schemas import APIError
from .service import Service

METRICS_TOKEN_NEEDED = "/metrics has its own credential: set I2V_METRICS_TOKEN and send that token"


def current_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(current_service)]


def authenticate(request: Request, service: ServiceDep) -> str:
    """The owner id of the caller's token, checked in constant time against every configured token (no
    early exit: the time taken does not tell which token came close), then its request rate.

    The owner is a hash the token's predictions and files are stored under; the token itself is never
    logged or stored."""
    config = service.config
    if config.no_auth:
        owner = token_owner(None)
    else:
        given = _bearer(request)
        if not _known(given, config.tokens):
            raise APIError(401, "Unauthenticated", "Invalid token")
        owner = token_owner(given.decode())
    service.check_request_rate(owner)
    return owner


def _bearer(request: Request) -> bytes:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token or scheme.lower() not in ("bearer", "token"):
        raise APIError(401, "Unauthenticated", "You did not pass an authentication token")
    return token.strip().encode(errors="replace")


def _known(given: bytes, tokens: tuple[str, ...]) -> bool:
    matched = False
    for known in tokens:  # every one, no early exit
        matched |= hmac.compare_digest(given, known.encode())
    return matched


def authorize_metrics(request: Request, service: ServiceDep) -> None:
    """`/metrics` shows server-wide figures, so it takes its own token (`I2V_METRICS_TOKEN`), not an API
    token: one tenant does not learn another's traffic. Without authentication (`--no-auth`) it is open."""
    config = service.config
    if config.no_auth:
        return
    given = _bearer(request)
    if config.metrics_token and _known(given, (config.metrics_token,)):
        return
    if _known(given, config.tokens):
        raise APIError(403, "Forbidden", METRICS_TOKEN_NEEDED)
    raise APIError(401, "Unauthenticated", "Invalid token")


Owner = Annotated[str, Depends(authenticate)]


def request_base(request: Request, service: ServiceDep) -> str:
    """The public URL when one is configured, else the origin the request came to."""
    return service.base_url(str(request.base_url))


BaseURL = Annotated[str, Depends(request_base)]
