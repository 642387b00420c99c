"""Typed FastAPI dependencies: what a route may know of a request — the service, the caller's owner id and
the base URL — and nothing more."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .limits import token_owner
from .schemas import APIError
from .service import Service


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
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not token or scheme.lower() not in ("bearer", "token"):
            raise APIError(401, "Unauthenticated", "You did not pass an authentication token")
        given = token.strip().encode()
        matched = False
        for known in config.tokens:
            matched |= hmac.compare_digest(given, known.encode())
        if not matched:
            raise APIError(401, "Unauthenticated", "Invalid token")
        owner = token_owner(given.decode())
    service.check_request_rate(owner)
    return owner


Owner = Annotated[str, Depends(authenticate)]


def request_base(request: Request, service: ServiceDep) -> str:
    """The public URL when one is configured, else the origin the request came to."""
    return service.base_url(str(request.base_url))


BaseURL = Annotated[str, Depends(request_base)]
