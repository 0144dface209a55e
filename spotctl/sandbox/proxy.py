"""The fidelity proxy: an HTTP server on loopback in front of moto.

Clients use it as ``AWS_ENDPOINT_URL``. EC2 Query-API requests go to an ``Ec2Handler``
that may answer them itself (rules moto lacks) or pass them on; everything else
(DynamoDB JSON, S3 REST, ...) is forwarded to moto byte for byte.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.sax.saxutils import escape

import boto3
import botocore.session
from botocore.awsrequest import AWSResponse, HTTPHeaders
from werkzeug.test import EnvironBuilder, run_wsgi_app

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication as WsgiApp
else:
    WsgiApp = Any

logger = logging.getLogger(__name__)

EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Ec2Request:
    """An EC2 Query-API call as the proxy saw it."""

    action: str
    params: dict[str, str]
    region: str
    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)


class Ec2Error(Exception):
    """An EC2 API error answered by the proxy in EC2's XML error shape."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def error_body(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def xml_response(body: str) -> UpstreamResponse:
    data = ('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode()
    return UpstreamResponse(200, [("Content-Type", "text/xml;charset=UTF-8")], data)


class Upstream:
    """moto, reached over HTTP, or called in process when its WSGI app is given.

    In process, a call skips a loopback connection and two server threads per request
    (what dominates a benchmark's real time); moto's answer is the same.
    """

    def __init__(self, host: str, port: int, app: WsgiApp | None = None) -> None:
        self.host = host
        self.port = port
        self._app = app

    def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        if self._app is not None and path.split("?", 1)[0] == "/":
            # Query-API and JSON services post to "/"; paths with keys (S3) go over HTTP,
            # where werkzeug's server decodes them as moto expects.
            return self._call_app(self._app, method, path, headers, body)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body)
            answer = conn.getresponse()
            data = answer.read()
            return UpstreamResponse(answer.status, list(answer.getheaders()), data)
        finally:
            conn.close()

    def _call_app(
        self, app: WsgiApp, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        _, _, query = path.partition("?")
        kept = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP]
        environ = EnvironBuilder(
            path="/",
            query_string=query,
            method=method,
            headers=kept,
            data=body,
            base_url=f"http://{self.host}:{self.port}",
        ).get_environ()
        environ["REMOTE_ADDR"] = "127.0.0.1"
        app_iter, status, answer_headers = run_wsgi_app(app, environ, buffered=True)
        try:
            data = b"".join(app_iter)
        finally:
            close = getattr(app_iter, "close", None)
            if close is not None:
                close()
        return UpstreamResponse(int(status.split(" ", 1)[0]), list(answer_headers.items()), data)

    def send_ec2(self, request: Ec2Request, params: dict[str, str]) -> UpstreamResponse:
        """Forward an EC2 call, possibly with rewritten parameters."""
        body = urlencode(params).encode()
        return self.send(request.method, request.path, request.headers, body)


Ec2Handler = Callable[[Ec2Request], UpstreamResponse]
Answer = Callable[[str, str, list[tuple[str, str]], bytes], UpstreamResponse]


class _Body:
    """The raw body botocore reads an answer from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def answer_in_process(client: Any, answer: Answer) -> None:
    """Make ``client`` get its answers from ``answer`` instead of over HTTP.

    botocore signs, serializes, retries and parses as usual; only the loopback round
    trip (a socket and a server thread per request) is skipped.
    """

    def send(request: Any, **_: Any) -> AWSResponse:
        url = urlsplit(request.url)
        path = url.path + (f"?{url.query}" if url.query else "")
        headers = [
            (str(k), v.decode() if isinstance(v, bytes) else str(v))
            for k, v in request.headers.items()
        ]
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = body.read()
        headers.append(("Host", url.netloc))
        reply = answer(request.method, path, headers, body)
        return AWSResponse(
            request.url, reply.status, HTTPHeaders.from_pairs(reply.headers), _Body(reply.body)
        )

    client.meta.events.register("before-send", send)


_session_lock = threading.Lock()
_shared_session: boto3.session.Session | None = None


def sandbox_client(service: str, region: str, endpoint_url: str, **kwargs: Any) -> Any:
    """A boto3 client with fake credentials; one botocore session so models load once."""
    global _shared_session  # noqa: PLW0603 - a process-wide cache of loaded service models
    with _session_lock:
        if _shared_session is None:
            _shared_session = boto3.session.Session(botocore_session=botocore.session.Session())
        return _shared_session.client(
            service,  # type: ignore[call-overload]
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's fake credentials
            aws_session_token="testing",  # noqa: S106
            **kwargs,
        )


def credential_scope(headers: list[tuple[str, str]]) -> tuple[str, str] | None:
    """``(region, service)`` from a SigV4 Authorization header."""
    for name, value in headers:
        if name.lower() == "authorization" and "Credential=" in value:
            scope = value.split("Credential=", 1)[1].split(",", 1)[0].split("/")
            if len(scope) >= 5:
                return scope[2], scope[3]
    return None


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], proxy: FidelityProxy) -> None:
        self.proxy = proxy
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _ProxyRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (an emulated instance at termination) is no error.
        logger.debug("request from %s ended early", client_address, exc_info=True)


class _ProxyRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; with Nagle on, the body waits for the
        # client's delayed ACK (40 ms) on every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("proxy: " + format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        headers = list(self.headers.items())
        answer = self.server.proxy.answer(self.command, self.path, headers, body)
        self.send_response(answer.status)
        for name, value in answer.headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() not in {"server", "date"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


class FidelityProxy:
    """Serves on a free loopback port; EC2 calls go through ``ec2_handler``."""

    def __init__(
        self, upstream: Upstream, ec2_handler: Ec2Handler, host: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream
        self.ec2_handler = ec2_handler
        self._server = _ProxyServer((host, 0), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="sandbox-proxy"
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        with self._server.connections_lock:
            open_connections = list(self._server.connections)
        for conn in open_connections:
            # Idle keep-alive connections would hold their handler threads open.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()  # joins the handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join()

    def answer(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """What the proxy answers a request, errors included (as over HTTP)."""
        try:
            return self.dispatch(method, path, headers, body)
        except Ec2Error as exc:
            return UpstreamResponse(
                exc.status, [("Content-Type", "text/xml")], error_body(exc.code, exc.message)
            )
        except Exception as exc:
            logger.exception("sandbox proxy failed on %s %s", method, path)
            return UpstreamResponse(
                500, [("Content-Type", "text/xml")], error_body("InternalError", repr(exc))
            )

    def dispatch(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        request = self._as_ec2(method, path, headers, body)
        if request is None:
            return self.upstream.send(method, path, headers, body)
        return self.ec2_handler(request)

    @staticmethod
    def _as_ec2(
        method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> Ec2Request | None:
        scope = credential_scope(headers)
        if method != "POST" or scope is None or scope[1] != "ec2":
            return None
        params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        if "Action" not in params:
            return None
        return Ec2Request(params["Action"], params, scope[0], method, path, headers)
