"""The HTTP classifier behind examples/serve.py, on the standard library's ThreadingHTTPServer (no new
dependency): POST /predict with an image answers the top-k classes as JSON; GET /health says it is up.

    POST /predict[?top=K]   body: the image bytes (Content-Type image/* or application/octet-stream),
                            or multipart/form-data with one file field (curl -F file=@shirt.png)
                            -> 200 {"predictions": [{"class", "index", "probability"}, ...], ...}
    GET  /health            -> 200 {"status": "ok", "backend", "arch", "classes", "image_size", "channels"}

Every bad request gets a 4xx JSON {"error": "..."} and the server carries on: 400 empty body, not an
image, truncated or undecodable image, bad multipart or ?top; 404 unknown path; 405 wrong method;
408 body stalled; 411 no Content-Length; 413 body over max_bytes (refused before it is read); 415 wrong content type.
At most `max_concurrent` requests are classified at once (a semaphore); one more gets 503 at once,
with Retry-After, instead of queueing without bound. An unexpected error is a 500, never a crash.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
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


class ClassifierServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the predictor and the limits; one thread per connection."""

    daemon_threads = True          # a hung client never blocks shutdown
    allow_reuse_address = True

    def __init__(self, address, predictor, backend: str = "minivgg", top_k: int = 5,
                 max_bytes: int = 10 * 2**20, max_concurrent: int = 4, request_timeout_s: float = 30.0,
                 log=sys.stderr):
        if max_concurrent < 1 or max_bytes < 1 or top_k < 1:
            raise ValueError(f"max_concurrent, max_bytes and top_k must be >= 1, got "
                             f"{max_concurrent}, {max_bytes}, {top_k}")
        super().__init__(address, ClassifierHandler)
        self.predictor, self.backend, self.top_k = predictor, backend, int(top_k)
        self.max_bytes, self.max_concurrent = int(max_bytes), int(max_concurrent)
        self.request_timeout_s, self.log = request_timeout_s, log
        self.slots = threading.BoundedSemaphore(self.max_concurrent)

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
        """Image bytes -> the JSON answer; ValueError (bad image) becomes a 400."""
        p = self.predictor
        try:
            image = decode_image(data, p.image_size, p.channels)   # (C, H, W) uint8
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        t0 = time.perf_counter()
        probs = p.probabilities_of(p.normalize(image[None]))       # (1, K)
        return {"predictions": p.top_k(probs, top)[0], "backend": self.backend,
                "inference_ms": round(1e3 * (time.perf_counter() - t0), 2)}


class ClassifierHandler(BaseHTTPRequestHandler):
    server: ClassifierServer
    server_version = "minivgg-serve/0.1"

    def setup(self):
        self.timeout = self.server.request_timeout_s   # a client that stalls mid-body is dropped
        super().setup()

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
        try:
            left = int(self.headers.get("Content-Length", 0))
        except ValueError:
            return
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
        self.wfile.write(body)

    def log_message(self, format, *args):   # noqa: A002 - the base class's signature
        if self.server.log is not None:
            print(f"{self.address_string()} {format % args}", file=self.server.log, flush=True)

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self.send_json(200, self.server.health())
        elif path == "/predict":
            self.send_json(405, {"error": "use POST /predict with an image"}, {"Allow": "POST"})
        else:
            self.send_json(404, {"error": f"no route {path}; try POST /predict or GET /health"})

    def do_POST(self):
        path = urlsplit(self.path).path
        self.body_read = False
        if path != "/predict":
            return self.refuse(404 if path != "/health" else 405,
                               {"error": f"no POST route {path}; use POST /predict"})
        if not self.server.slots.acquire(blocking=False):
            return self.refuse(503, {"error": f"busy: {self.server.max_concurrent} requests already "
                                              "being classified; retry shortly"}, {"Retry-After": "1"})
        try:
            self.send_json(200, self.server.classify(self.read_image(), self.top_param()))
        except HTTPError as e:
            self.refuse(e.status, {"error": e.message}, e.headers)
        except Exception as e:   # a bug, not the client's fault: report it, keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            self.refuse(500, {"error": f"internal error: {type(e).__name__}"})
        finally:
            self.server.slots.release()

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

    def read_image(self) -> bytes:
        """The image bytes of the request: checks type and size before reading the body."""
        ctype = self.headers.get("Content-Type", "")
        main = ctype.split(";")[0].strip().lower()
        if not (main.startswith("image/") or main in RAW_TYPES or main == "multipart/form-data"):
            raise HTTPError(415, f"Content-Type {ctype or '(none)'!r} is not accepted; send the image "
                                 "bytes as image/* or application/octet-stream, or as multipart/form-data")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked uploads are not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            raise HTTPError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_bytes:
            raise HTTPError(413, f"upload of {n:,} bytes is larger than the {self.server.max_bytes:,} "
                                 "bytes accepted")
        try:
            body = self.rfile.read(n)
        except OSError as e:   # the socket timeout: the client stalled mid-upload
            raise HTTPError(408, f"the {n:,}-byte body did not arrive within "
                                 f"{self.server.request_timeout_s:g} s ({type(e).__name__})") from None
        self.body_read = True
        if len(body) < n:
            raise HTTPError(400, f"body ended after {len(body):,} of {n:,} bytes")
        if main == "multipart/form-data":
            body = image_from_multipart(body, ctype)
        if not body:
            raise HTTPError(400, "empty upload: the request carries no image bytes")
        return body


def make_server(predictor, host: str = "127.0.0.1", port: int = 8000, **kw) -> ClassifierServer:
    """Bind (port 0 picks a free one: see .server_address) without serving yet; call serve_forever()."""
    return ClassifierServer((host, port), predictor, **kw)

