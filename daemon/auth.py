"""Bearer-key authentication for the HTTP routes.

Keys are compared in constant time against every configured key (no early
exit), so timing reveals neither a key nor which one matched. With no keys
configured, every caller is an anonymous admin; `daemon.config` refuses to
bind anything but loopback in that case.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

COOKIE = "adaptd_admin_key"  # set by the report pages' key form, sent to /reports only


class AuthError(Exception):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(AuthError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


@dataclass(frozen=True)
class Caller:
    label: str
    is_admin: bool


def _label(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def _matches(given: bytes, keys: list[bytes]) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


class Authenticator:
    def __init__(self, api_keys: list[str], admin_keys: list[str]) -> None:
        self._inference = [k.encode() for k in api_keys]
        self._admin = [k.encode() for k in admin_keys]
        self.enabled = bool(api_keys or admin_keys)

    def identify(self, request: Request, *, cookie: bool = False) -> Caller:
        if not self.enabled:
            return Caller("anonymous", True)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if cookie and not header and request.cookies.get(COOKIE):
            scheme, token = "bearer", request.cookies[COOKIE]
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing API key: send `Authorization: Bearer KEY`")
        given = token.strip().encode()
        if _matches(given, self._admin):
            return Caller(_label(token.strip()), True)
        if _matches(given, self._inference):
            return Caller(_label(token.strip()), False)
        raise AuthError("invalid API key")

    async def inference(self, request: Request) -> Caller:
        """FastAPI dependency: an inference or admin key."""
        return self.identify(request)

    async def admin(self, request: Request) -> Caller:
        """FastAPI dependency: an admin key."""
        caller = self.identify(request)
        if not caller.is_admin:
            raise PermissionDenied("this route needs an admin key")
        return caller

    def admin_page(self, request: Request) -> Caller:
        """An admin key from the header or, for pages opened in a browser, the cookie."""
        caller = self.identify(request, cookie=True)
        if not caller.is_admin:
            raise PermissionDenied("this page needs an admin key")
        return caller
