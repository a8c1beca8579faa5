"""The HTTP classifier behind examples/serve.py, on the standard library's ThreadingHTTPServer (no new
dependency): POST /predict with an image answers the top-k classes as JSON; GET /health says it is up.

    POST /predict[?top=K]   body: the image bytes (Content-Type image/* or application/octet-stream),
                            or multipart/form-data with one file field (curl -F file=@shirt.png)
                            -> 200 {"predictions": [{"class", "index", "probability"}, ...], ...}
    GET  /health            -> 200 {"status": "ok", "backend", "arch", "classes", "image_size", "channels"}

Every answer is JSON ({"error": "..."} unless 200), and after each the server carries on:
    200  the predictions, or the health record
    400  empty body, not an image, truncated or undecodable image, too many pixels, bad multipart,
         bad ?top, a bad or conflicting Content-Length, a body that ended early, a malformed request line
    404  unknown path
    405  a method the path does not take (PUT, DELETE, PATCH, OPTIONS, HEAD, GET on /predict; POST on
         /health ...), with an Allow header naming the one it takes
    408  the body did not arrive within request_timeout_s (the whole body, not each packet)
    411  no Content-Length, or a chunked upload
    413  body over max_bytes (refused before it is read)
    415  wrong content type
    501  a method HTTP servers do not know at all (e.g. FOO)
    503  busy, with Retry-After: max_concurrent requests are already being classified, or max_readers
         uploads are already being read
    500  a bug in the server (logged), never the client's doing
How a request flows: its body is read first (bounded in size by max_bytes and in time by
request_timeout_s, at most max_readers at once), and only then does it take one of max_concurrent
classification slots, so a slow uploader holds no slot. Decoding runs on the request's thread; the model
runs on one worker thread for the predictor's device, to which requests hand their batch and wait (CuPy's
cuBLAS handles and streams are per thread; one thread keeps one set). A client that hangs up (a half-sent
body, an answer it does not read, FIN or RST) costs one log line and no answer. The listen backlog
(request_queue_size) is 128, so a burst of clients waits in the kernel for accept() instead of being reset.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .predictor import decode_image

RAW_TYPES = ("application/octet-stream",)   # besides every image/* type
MAX_TOP = 1000
DRAIN_S = 2.0          # after refusing a body, read and drop it for at most this long (see discard_body)


class HTTPError(Exception):
    """A request that gets a 4xx/5xx answer: status and the message sent back as JSON."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def image_from_multipart(body: bytes, content_type: str) -> bytes:
    """The bytes of the first file field (or else the first field) of a multipart/form-data body."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1")
                                              + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise HTTPError(400, "malformed multipart/form-data body (no parts found; is the boundary right?)")
    parts = list(msg.iter_parts())
    files = [p for p in parts if p.get_filename() is not None] or parts
    if not files:
        raise HTTPError(400, "multipart/form-data body has no fields; send the image as a file field "
                             "(curl -F file=@image.png)")
    return files[0].get_payload(decode=True) or b""


class ClientGone(Exception):
    """The client closed or reset the connection (mid-body, or before reading the answer)."""


class ClassifierServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the predictor and the limits; one thread per connection, and one
    worker thread that runs the model."""

    daemon_threads = True          # a hung client never blocks shutdown
    allow_reuse_address = True
    request_queue_size = 128       # listen backlog: a burst waits for accept() instead of being reset

    def __init__(self, address, predictor, backend: str = "minivgg", top_k: int = 5,
                 max_bytes: int = 10 * 2**20, max_concurrent: int = 4, request_timeout_s: float = 30.0,
                 max_readers: int = 64, log=sys.stderr):
        if min(max_concurrent, max_bytes, top_k, max_readers) < 1 or not request_timeout_s > 0:
            raise ValueError(f"max_concurrent, max_bytes, top_k and max_readers must be >= 1 and "
                             f"request_timeout_s > 0, got {max_concurrent}, {max_bytes}, {top_k}, "
                             f"{max_readers}, {request_timeout_s}")
        self.predictor, self.backend, self.top_k = predictor, backend, int(top_k)
        self.max_bytes, self.max_concurrent = int(max_bytes), int(max_concurrent)
        self.request_timeout_s, self.log = request_timeout_s, log
        self.slots = threading.BoundedSemaphore(self.max_concurrent)
        self.readers = threading.BoundedSemaphore(int(max_readers))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minivgg-classify")   # starts on use
        super().__init__(address, ClassifierHandler)   # binds and listens; a failure calls server_close

    def server_close(self):
        super().server_close()
        self.worker.shutdown(wait=False, cancel_futures=True)

    def handle_error(self, request, client_address):
        """What escapes a handler: a client hang-up is one line; anything else keeps its traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError, ClientGone)):
            self.say(f"{client_address[0]} client hung up: {type(e).__name__}: {e}")
        else:
            super().handle_error(request, client_address)

    def say(self, line: str) -> None:
        if self.log is not None:
            print(line, file=self.log, flush=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        p = self.predictor
        return {"status": "ok", "backend": self.backend, "arch": (p.config or {}).get("arch"),
                "classes": p.classes, "image_size": list(p.image_size), "channels": p.channels,
                "max_concurrent": self.max_concurrent, "max_bytes": self.max_bytes}

    def classify(self, data: bytes, top: int) -> dict:
        """Image bytes -> the JSON answer; ValueError (bad image) becomes a 400. The model runs on the
        worker thread; this (the request's) thread decodes and waits."""
        p = self.predictor
        try:
            image = decode_image(data, p.image_size, p.channels)   # (C, H, W) uint8
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        t0 = time.perf_counter()
        probs = self.worker.submit(p.probabilities_of, p.normalize(image[None])).result()   # (1, K)
        return {"predictions": p.top_k(probs, top)[0], "backend": self.backend,
                "inference_ms": round(1e3 * (time.perf_counter() - t0), 2)}


ROUTES = {"/predict": "POST", "/health": "GET"}   # path -> the one method it takes


class ClassifierHandler(BaseHTTPRequestHandler):
    server: ClassifierServer
    server_version = "minivgg-serve/0.1"

    def setup(self):
        self.timeout = self.server.request_timeout_s   # a client that stalls in its headers is dropped
        super().setup()

    def handle(self):
        """Serve the connection; a client that hangs up mid-request costs one log line, no traceback."""
        try:
            super().handle()
        except (ConnectionError, ClientGone) as e:
            self.close_connection = True
            self.server.say(f"{self.address_string()} client hung up during "
                            f"{getattr(self, 'requestline', '') or 'the request'!r}: {type(e).__name__}: {e}")

    # -- answers -------------------------------------------------------------------------------
    def refuse(self, status: int, payload: dict, headers: dict | None = None) -> None:
        """An error answer, then drop the unread body and close, so the client reads the answer
        instead of a connection reset (closing a socket with unread input sends RST)."""
        self.close_connection = True
        self.send_json(status, payload, headers)
        self.discard_body()

    def discard_body(self) -> None:
        if getattr(self, "body_read", False):
            return
        lengths = [int(v) for v in self.headers.get_all("Content-Length", []) if v.strip().isdigit()]
        left = max(lengths, default=0)   # conflicting lengths: drain the longest the client may send
        self.connection.settimeout(DRAIN_S)
        deadline = time.monotonic() + DRAIN_S
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:   # timeout or reset: the client is gone or too slow; give up quietly
            pass

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":   # a HEAD answer is the headers alone
            self.wfile.write(body)
        self.wfile.flush()
        self.log_message('"%s" %s %s', self.requestline, status, len(body))   # once it was sent

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (bad request line, unknown method, headers too long) as JSON too."""
        self.close_connection = True
        self.send_json(int(code), {"error": explain or message or HTTPStatus(code).phrase})

    def log_request(self, code="-", size="-"):
        pass   # send_json logs the request after the answer went out, so a hang-up is its only line

    def log_message(self, format, *args):   # noqa: A002 - the base class's signature
        self.server.say(f"{self.address_string()} {format % args}")

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self.send_json(200, self.server.health())
        else:
            self.wrong_method()

    def do_POST(self):
        path = urlsplit(self.path).path
        self.body_read = False
        if path != "/predict":
            return self.wrong_method()
        if not self.server.readers.acquire(blocking=False):
            return self.refuse(503, {"error": "busy: too many uploads being read at once; retry shortly"},
                               {"Retry-After": "1"})
        try:
            data = self.read_image()   # before a slot: a slow uploader holds none
        except HTTPError as e:
            return self.refuse(e.status, {"error": e.message}, e.headers)
        finally:
            self.server.readers.release()
        if not self.server.slots.acquire(blocking=False):
            return self.refuse(503, {"error": f"busy: {self.server.max_concurrent} requests already "
                                              "being classified; retry shortly"}, {"Retry-After": "1"})
        try:
            answer = self.server.classify(data, self.top_param())
        except HTTPError as e:
            answer = e
        except Exception as e:   # a bug, not the client's fault: report it, keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            answer = HTTPError(500, f"internal error: {type(e).__name__}")
        finally:
            self.server.slots.release()
        if isinstance(answer, HTTPError):
            return self.refuse(answer.status, {"error": answer.message}, answer.headers)
        self.send_json(200, answer)

    def wrong_method(self):
        """404 for a path that is not a route; 405 with Allow for a route asked with another method."""
        path = urlsplit(self.path).path
        if path not in ROUTES:
            return self.refuse(404, {"error": f"no route {path}; try POST /predict or GET /health"})
        allow = ROUTES[path]
        self.refuse(405, {"error": f"{self.command} is not accepted on {path}; use {allow} {path}"},
                    {"Allow": allow})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = wrong_method

    # -- request parsing -----------------------------------------------------------------------
    def top_param(self) -> int:
        query = parse_qs(urlsplit(self.path).query)
        if "top" not in query:
            return self.server.top_k
        try:
            top = int(query["top"][-1])
        except ValueError:
            top = 0
        if not 1 <= top <= MAX_TOP:
            raise HTTPError(400, f"?top must be an integer from 1 to {MAX_TOP}, got {query['top'][-1]!r}")
        return top

    def content_length(self) -> int:
        """The one Content-Length: 411 if absent, 400 if malformed or given twice with different values
        (RFC 9112, 6.3), 413 if over max_bytes."""
        values = self.headers.get_all("Content-Length")
        if not values:
            raise HTTPError(411, "a Content-Length header is required")
        if len(set(v.strip() for v in values)) > 1:
            raise HTTPError(400, f"conflicting Content-Length headers {values}; send one")
        length = values[0]
        n = int(length) if length.strip().isdigit() else -1
        if n < 0:
            raise HTTPError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_bytes:
            raise HTTPError(413, f"upload of {n:,} bytes is larger than the {self.server.max_bytes:,} "
                                 "bytes accepted")
        return n

    def read_body(self, n: int) -> bytes:
        """n bytes of body, all of them within request_timeout_s (a trickle does not reset the clock)."""
        limit = self.server.request_timeout_s
        deadline, chunks, got = time.monotonic() + limit, [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HTTPError(408, f"the {n:,}-byte body did not arrive within {limit:g} s "
                                     f"({got:,} bytes came)")
            self.connection.settimeout(left)
            try:
                chunk = self.rfile.read1(min(n - got, 1 << 16))
            except TimeoutError:
                continue   # the deadline check above answers 408
            except OSError as e:   # reset by the client
                raise ClientGone(f"after {got:,} of {n:,} body bytes ({type(e).__name__})") from None
            if not chunk:   # FIN before the end of the body
                raise ClientGone(f"closed after {got:,} of {n:,} body bytes")
            chunks.append(chunk)
            got += len(chunk)
        self.connection.settimeout(limit)
        self.body_read = True
        return b"".join(chunks)

    def read_image(self) -> bytes:
        """The image bytes of the request: checks type and size before reading the body."""
        ctype = self.headers.get("Content-Type", "")
        main = ctype.split(";")[0].strip().lower()
        if not (main.startswith("image/") or main in RAW_TYPES or main == "multipart/form-data"):
            raise HTTPError(415, f"Content-Type {ctype or '(none)'!r} is not accepted; send the image "
                                 "bytes as image/* or application/octet-stream, or as multipart/form-data")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked uploads are not supported; send a Content-Length")
        body = self.read_body(self.content_length())
        if main == "multipart/form-data":
            body = image_from_multipart(body, ctype)
        if not body:
            raise HTTPError(400, "empty upload: the request carries no image bytes")
        return body


def make_server(predictor, host: str = "127.0.0.1", port: int = 8000, **kw) -> ClassifierServer:
    """Bind (port 0 picks a free one: see .server_address) without serving yet; call serve_forever().

    ValueError for a port outside 0..65535; OSError naming host:port when it cannot be bound (in use,
    not an address of this machine, a privileged port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is out of range: a TCP port is 0..65535 (0 picks a free one)")
    try:
        return ClassifierServer((host, port), predictor, **kw)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from e
