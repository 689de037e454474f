"""Bearer tokens: an inference token (optional) and an admin token, compared in constant time. Torch-free."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

from tandem.errors import UserError
from tandem.serve.config import AuthConfig, tokens
from tandem.serve.protocol import ProtocolError


class AuthError(ProtocolError):
    status = 401


class Auth:
    """Who may call what: the inference endpoints (open unless protected) and the admin ones."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.token, self.admin_token = tokens(config)
        protect = config.protect_inference
        self.protect_inference = self.token is not None if protect is None else protect
        if self.protect_inference and self.token is None:
            raise UserError(f"auth.protect_inference is true but no inference token is set: export "
                            f"{config.token_env}=... or set auth.token_file")

    def check(self, headers: Headers, admin: bool = False) -> None:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode() if scheme.lower() == "bearer" else b""
        if admin:
            if self.admin_token is None:
                raise ProtocolError(f"admin endpoints are off: start the server with an admin token "
                                    f"({self.config.admin_token_env}=... or auth.admin_token_file)", 403)
            if _same(given_bytes, self.admin_token):
                return
            if self.token is not None and _same(given_bytes, self.token):
                raise ProtocolError("this needs the admin token, not the inference token", 403)
            raise AuthError("missing or wrong admin token: send 'Authorization: Bearer <admin token>'")
        if not self.protect_inference:
            return
        if _same(given_bytes, self.token) or (self.admin_token is not None and _same(given_bytes, self.admin_token)):
            return
        raise AuthError("missing or wrong token: send 'Authorization: Bearer <token>'")


def _same(given: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected.encode())
