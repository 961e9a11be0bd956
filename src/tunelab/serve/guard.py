"""What keeps a server on this machine closed to other sites and other users.

A browser lets any page the user visits send requests to 127.0.0.1, and DNS rebinding lets it read the
answers; a key on the command line is readable by every local user in `/proc`. So: the key comes from
the environment or a file (or is generated), requests must name a trusted Host, a foreign Origin is
refused, a state-changing request must say it is JSON (a form or a `no-cors` fetch cannot), and a body
larger than the limit is refused before it is read. The middleware is plain ASGI so that streams and
client disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
from pathlib import Path

from ..errors import TunelabError
from .protocol import ApiError

log = logging.getLogger("tunelab")
KEY_ENV = "TUNELAB_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def resolve_api_key(flag: str | None, key_file: str | None, need_one: bool) -> tuple[str | None, bool]:
    """(the key, whether it was generated here): the flag (warned about), the file, the environment, or,
    when `need_one` (the web page), a fresh one the caller prints once."""
    if flag:
        log.warning(
            "--api-key is visible to every user of this machine (ps, /proc); prefer %s=... or --api-key-file",
            KEY_ENV,
        )
        return flag, False
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TunelabError(f"--api-key-file: cannot read {key_file}: {exc.strerror}") from None
        if not key:
            raise TunelabError(f"--api-key-file: {key_file} is empty")
        return key, False
    if os.environ.get(KEY_ENV, "").strip():
        return os.environ[KEY_ENV].strip(), False
    if need_one:
        return secrets.token_urlsafe(24), True
    return None, False


def key_matches(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case, compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def trusted_hosts(bound: str, extra: list[str] | None = None) -> set[str]:
    """The names a request may give in `Host`: the bound address, localhost, and what the user allowed;
    on a wildcard address also this machine's own names and addresses."""
    hosts = {*LOCAL_HOSTS, *(h.lower().strip("[]") for h in extra or [])}
    if bound not in WILDCARD_HOSTS:
        hosts.add(bound.lower().strip("[]"))
    else:
        name = socket.gethostname()
        hosts.update({name.lower(), socket.getfqdn().lower()})
        try:
            hosts.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            pass
    return hosts


def _host_name(value: str) -> str:
    """`example.com:8000` -> example.com; `[::1]:8000` -> ::1."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: Host, Origin, content type and body size, each refused in OpenAI's error shape."""

    def __init__(self, app, hosts: set[str], max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.hosts, self.max_bytes = app, hosts, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _refuse(send, *refusal)
        if scope["method"] in STATE_CHANGING:
            body = await self._read_body(receive)
            if body is None:
                return await _refuse(send, *self._too_large())
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict) -> tuple[int, str, str] | None:
        host = headers.get("host")
        if "*" not in self.hosts and (host is None or _host_name(host) not in self.hosts):
            return 421, f"this server does not answer for Host {host!r} (--allowed-host adds one)", "untrusted_host"
        origin = headers.get("origin")
        if origin is not None:
            scheme = scope.get("scheme", "http")
            if origin.lower() != f"{scheme}://{host}".lower():
                return 403, f"requests from the web origin {origin!r} are refused", "cross_origin"
        if scope["method"] in STATE_CHANGING:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return 415, "a request that changes something must be sent as application/json", "unsupported_media"
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                return self._too_large()
        return None

    def _too_large(self) -> tuple[int, str, str]:
        return 413, f"the request body is over {self.max_bytes} bytes (--max-request-bytes)", "request_too_large"

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None past the limit (a chunked upload has no Content-Length to check first)."""
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive):
    """The body already read, then the client's own messages (a disconnect still reaches the route)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps(ApiError(status, message, None, code).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
