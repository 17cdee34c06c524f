"""The server's edges: the Host guard and security headers, the header timeout, the listening socket."""

from __future__ import annotations

import errno
import logging
import socket

from fastapi.responses import Response
from starlette.datastructures import MutableHeaders

from ..errors import StateError, UsageError

logger = logging.getLogger("pneumoscope.serving.app")  # the name the server's log lines have always carried

HEADER_TIMEOUT_S = 10.0  # from connecting (or the last answer on a kept-alive connection) to the end of the headers
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The page's own origin only; images are data: URLs made by the page's own script.
CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


class Guard:
    """ASGI middleware: refuse a Host header this server was not bound under; security headers on every answer."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed is not None:
            host = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                detail = (
                    f"this server answers to {', '.join(sorted(self.allowed))}, not to the Host header {host[:100]!r} (a guard against DNS rebinding); "
                    "open it by one of those names, or start it with `--allow-host NAME`"
                )
                return await _json_error(421, detail)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Cache-Control"] = "no-store"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Content-Security-Policy"] = CSP
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _json_error(status: int, detail: str) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status)


def uvicorn_server(app, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S, log_level: str = "info"):
    """A uvicorn server for ``app`` whose connections are closed when a request's headers take longer than
    ``header_timeout_s`` (uvicorn bounds only the wait between kept-alive requests)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request in hand: its headers are late
                logger.info("closing a connection from %s: no complete request headers within %g s", self.client, header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=Protocol))


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening, or a one-line error with the fix.

    Raises:
        UsageError: ``port`` outside 1-65535, or a ``host`` that does not resolve.
        StateError: the address cannot be bound (the port is in use, needs privileges, or
            the host is not an address of this machine).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port must be a TCP port from 1 to 65535, got {port!r}. Fix: e.g. --port 8000")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(
            f"--host {host!r}: not an address, nor a name this machine can resolve ({getattr(err, 'strerror', None) or err}). "
            "Fix: an address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all its interfaces)"
        ) from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port left in TIME_WAIT is free again at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise StateError(f"{host}:{port}: cannot listen there: {_bind_failure(err)}") from err
    return sock


def _bind_failure(err: OSError) -> str:
    """What a failed bind means, and the fix."""
    if err.errno == errno.EADDRINUSE:
        return "the port is in use (another server, or a `pneumoscope serve` still running). Fix: stop it, or choose another --port"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need administrator rights). Fix: --port 8000, or another port from 1024 up"
    if err.errno == errno.EADDRNOTAVAIL:
        return (
            "not an address of this machine. Fix: --host 127.0.0.1 (this machine only), 0.0.0.0 (all interfaces), or one of its addresses"
        )
    return f"{err.strerror or err}. Fix: another --host or --port"
