"""The HTTP classifier, through a real HTTP client on 127.0.0.1: answers equal the predictor's, every
bad upload is a 4xx that leaves the server running, concurrency is bounded (503) and answered correctly."""
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy_helpers import fashion_checkpoint

from minivgg.deploy import Predictor, decode_image
from minivgg.deploy.server import make_server

ROOT = Path(__file__).resolve().parents[1]
T = 10.0   # seconds: every network wait in this file is bounded by it


def png_bytes(seed: int, size=(28, 28), mode="L") -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, size=size + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, "PNG")
    return buf.getvalue()


def expected(predictor, data: bytes, k: int = 5) -> list:
    x = predictor.normalize(decode_image(data, predictor.image_size, predictor.channels)[None])
    return predictor.top_k(predictor.probabilities_of(x), k)[0]


def request(server, method, path, body=None, headers=None):
    """(status, JSON answer) from one request on a fresh connection."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=T)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def multipart(data: bytes, field="file", filename="x.png", ctype="image/png"):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Running:
    """A server on an ephemeral loopback port, serving from a thread; shut down on exit."""

    def __init__(self, predictor, **kw):
        self.server = make_server(predictor, "127.0.0.1", 0, **{"log": None, **kw})
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=T)
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path, _ = fashion_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.npz", "vgg11_bn")
    return Predictor(path)


@pytest.fixture
def server(predictor):
    with Running(predictor, max_bytes=50_000, max_concurrent=4) as s:
        yield s


def test_health(server):
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["backend"] == "minivgg"
    assert body["classes"][0] == "T-shirt/top" and body["image_size"] == [32, 32] and body["channels"] == 1


def test_raw_body_and_multipart_answer_the_predictors_top_k(server, predictor):
    data = png_bytes(1)
    want = expected(predictor, data)
    status, body = request(server, "POST", "/predict", data, {"Content-Type": "image/png"})
    assert status == 200 and body["predictions"] == want
    probs = [p["probability"] for p in body["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    status, body = request(server, "POST", "/predict", *multipart(data))
    assert status == 200 and body["predictions"] == want
    status, body = request(server, "POST", "/predict?top=10", data, {"Content-Type": "application/octet-stream"})
    assert status == 200 and len(body["predictions"]) == 10
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-9)
    rgb = png_bytes(2, (50, 70), "RGB")   # any size and mode: converted and resized as in training
    status, body = request(server, "POST", "/predict", rgb, {"Content-Type": "image/png"})
    assert status == 200 and body["predictions"] == expected(predictor, rgb)


def truncated_png():
    return png_bytes(3)[:60]


@pytest.mark.parametrize("body, headers, status, words", [
    (b"this is not an image", {"Content-Type": "image/png"}, 400, "not an image"),
    (None, {"Content-Type": "image/png"}, 400, "cannot decode"),            # truncated: filled below
    (b"", {"Content-Type": "image/png"}, 400, "empty"),
    (b"x" * 60_000, {"Content-Type": "image/png"}, 413, "larger than"),
    (b"\x89PNG....", {"Content-Type": "text/plain"}, 415, "not accepted"),
    (b"\x89PNG....", {}, 415, "not accepted"),
    (b"--zz\r\n\r\n", {"Content-Type": "multipart/form-data; boundary=other"}, 400, "multipart"),
    (b"...", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}, 411, "chunked"),
])
def test_bad_uploads_are_4xx_and_the_server_keeps_serving(server, predictor, body, headers, status, words):
    body = truncated_png() if body is None else body
    got, answer = request(server, "POST", "/predict", body, headers)
    assert got == status and words in answer["error"], answer
    good = png_bytes(4)
    status, answer = request(server, "POST", "/predict", good, {"Content-Type": "image/png"})
    assert status == 200 and answer["predictions"] == expected(predictor, good)
    assert request(server, "GET", "/health")[0] == 200


def test_bad_multipart_fields_and_routes(server):
    status, answer = request(server, "POST", "/predict", *multipart(b""))
    assert status == 400 and "empty" in answer["error"]
    status, answer = request(server, "POST", "/predict", *multipart(b"GIF89a garbage", ctype="image/gif"))
    assert status == 400 and ("cannot decode" in answer["error"] or "not an image" in answer["error"])
    assert request(server, "POST", "/predict?top=0", png_bytes(5), {"Content-Type": "image/png"})[0] == 400
    assert request(server, "POST", "/predict?top=x", png_bytes(5), {"Content-Type": "image/png"})[0] == 400
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "GET", "/predict")[0] == 405
    assert request(server, "POST", "/other", b"x", {"Content-Type": "image/png"})[0] == 404


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "PNG")   # 64 M pixels compress to a few tens of kB
    with pytest.raises(ValueError, match="larger than"):
        decode_image(buf.getvalue(), (32, 32), 1)


def test_concurrent_requests_are_answered_correctly(predictor):
    images = [png_bytes(100 + i) for i in range(12)]
    wants = [expected(predictor, d) for d in images]
    with Running(predictor, max_concurrent=12) as server:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda d: request(server, "POST", "/predict", d, {"Content-Type": "image/png"}),
                                images, timeout=4 * T))
    assert [s for s, _ in got] == [200] * len(images)
    assert [b["predictions"] for _, b in got] == wants


class Gated:
    """A predictor whose logits() waits for a gate: holds a request inside the server on purpose."""

    def __init__(self, inner):
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def probabilities_of(self, x):
        self.entered.set()
        assert self.gate.wait(T), "test gate never opened"
        return self.inner.probabilities_of(x)


def test_one_request_over_the_limit_gets_503_then_service_resumes(predictor):
    gated = Gated(predictor)
    data = png_bytes(7)
    with Running(gated, max_concurrent=1) as server:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(request, server, "POST", "/predict", data, {"Content-Type": "image/png"})
            assert gated.entered.wait(T)
            status, answer = request(server, "POST", "/predict", data, {"Content-Type": "image/png"})
            assert status == 503 and "busy" in answer["error"]
            assert request(server, "GET", "/health")[0] == 200   # health is never gated
            gated.gate.set()
            status, answer = first.result(timeout=T)
            assert status == 200 and answer["predictions"] == expected(predictor, data)
        assert request(server, "POST", "/predict", data, {"Content-Type": "image/png"})[0] == 200


def test_onnx_backend_answers_like_minivgg(predictor, tmp_path):
    pytest.importorskip("onnxruntime")
    from minivgg.deploy import OnnxPredictor
    from minivgg.deploy.onnx_export import export_checkpoint
    onnx_pred = OnnxPredictor(export_checkpoint(predictor.path, tmp_path / "m.onnx"))
    data = png_bytes(8)
    with Running(onnx_pred, backend="onnxruntime") as server:
        status, body = request(server, "POST", "/predict", data, {"Content-Type": "image/png"})
    want = expected(predictor, data)
    assert status == 200 and body["backend"] == "onnxruntime"
    assert [p["class"] for p in body["predictions"]] == [p["class"] for p in want]
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                               [p["probability"] for p in want], rtol=1e-5)


def _ignore_sigint():   # as a background job of a non-interactive shell starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_until_interrupted(tmp_path, stop):
    """Ctrl-C or SIGTERM stops the server cleanly, also when it was started with SIGINT ignored."""
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve.py"), "--checkpoint", str(ckpt),
                             "--port", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_ignore_sigint)
    try:
        line = proc.stdout.readline()   # "serving ... on http://127.0.0.1:PORT ..."
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
        conn.request("POST", "/predict", body=png_bytes(9), headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["predictions"]) == 5
        conn.close()
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(timeout=T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=T)
    assert proc.returncode == 0


def test_cli_bad_checkpoint_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), "--checkpoint",
                        str(tmp_path / "none.npz")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- abuse: slow and half-finished uploads, bursts, odd HTTP, hang-ups, bad ports (issue 23) -------------
def answer(server, method, path, body=None, headers=None):
    """(status, headers, JSON or None) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=T)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def raw_socket(server):
    s = socket.create_connection(server.server_address[:2], timeout=T)
    return s


def head(n: int, ctype="image/png", extra="") -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {n}\r\n"
            f"{extra}\r\n").encode()


def reset(sock):
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_slow_uploader_holds_no_classification_slot(predictor):
    data = png_bytes(20)
    with Running(predictor, max_concurrent=1, request_timeout_s=T) as server:
        slow = raw_socket(server)
        try:
            slow.sendall(head(len(data)) + data[:10])     # headers and 10 bytes, then a trickle
            time.sleep(0.2)                               # the server has read them and waits for more
            status, _, body = answer(server, "POST", "/predict", data, {"Content-Type": "image/png"})
            assert status == 200 and body["predictions"] == expected(predictor, data), body
            slow.sendall(data[10:])                       # the slow one finishes and is answered too
            assert b" 200 " in slow.recv(1 << 16).split(b"\r\n")[0]
        finally:
            slow.close()


def test_a_body_must_arrive_whole_within_the_timeout_however_it_trickles(predictor):
    data = png_bytes(21)
    with Running(predictor, request_timeout_s=1.0) as server:
        s = raw_socket(server)
        try:
            s.sendall(head(len(data)))
            t0 = time.monotonic()
            reply = b""
            for i in range(len(data)):                    # one byte every 0.1 s: each packet is in time
                try:
                    s.sendall(data[i:i + 1])
                except OSError:
                    break
                s.settimeout(0.1)
                try:
                    reply += s.recv(1 << 16)
                except TimeoutError:
                    continue
                if reply:
                    break
            s.settimeout(T)
            while b"\r\n\r\n" not in reply:
                reply += s.recv(1 << 16)
        finally:
            s.close()
    assert reply.startswith(b"HTTP/1.0 408") or reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert time.monotonic() - t0 < 1.0 + 2.0            # the whole body's deadline, not per packet


def test_a_burst_of_40_clients_each_get_an_answer(predictor):
    data = png_bytes(22)

    def one(_):
        try:
            status, headers, _ = answer(server, "POST", "/predict", data, {"Content-Type": "image/png"})
            return status, headers.get("Retry-After")
        except OSError as e:   # a reset or a refused connection: no HTTP answer at all
            return type(e).__name__, None

    with Running(predictor, max_concurrent=2) as server:
        with ThreadPoolExecutor(40) as pool:
            got = list(pool.map(one, range(40), timeout=6 * T))
    assert all(s == 200 or (s == 503 and r == "1") for s, r in got), got
    assert any(s == 200 for s, _ in got)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "GET"])
def test_other_methods_on_predict_are_405_json_with_allow(server, method):
    body = png_bytes(23) if method in ("PUT", "PATCH") else None
    status, headers, answer_ = answer(server, method, "/predict", body, {"Content-Type": "image/png"})
    assert status == 405 and headers["Allow"] == "POST" and headers["Content-Type"] == "application/json"
    if method != "HEAD":   # a HEAD answer has no body
        assert "use POST /predict" in answer_["error"]
    status, headers, _ = answer(server, "POST", "/health", b"x", {"Content-Type": "image/png"})
    assert status == 405 and headers["Allow"] == "GET"
    status, _, answer_ = answer(server, "PUT", "/elsewhere", b"x")
    assert status == 404 and "no route" in answer_["error"]
    assert request(server, "GET", "/health")[0] == 200


def test_an_unknown_method_and_a_bad_request_line_are_json(server):
    status, headers, answer_ = answer(server, "FOO", "/predict")
    assert status == 501 and headers["Content-Type"] == "application/json" and "FOO" in answer_["error"]
    s = raw_socket(server)
    try:
        s.sendall(b"GET /predict extra HTTP/1.1\r\n\r\n")   # four words: bad syntax
        reply = b"".join(iter(lambda: s.recv(1 << 16), b""))   # until the server closes
    finally:
        s.close()
    assert b" 400 " in reply.split(b"\r\n")[0] and b'{"error": ' in reply


@pytest.mark.parametrize("lengths", [("100", "200"), ("100", "abc")])
def test_conflicting_content_lengths_are_400(server, lengths):
    data = png_bytes(24)
    s = raw_socket(server)
    try:
        s.sendall(head(lengths[0], extra=f"Content-Length: {lengths[1]}\r\n") + data[:int(lengths[0])])
        reply = b"".join(iter(lambda: s.recv(1 << 16), b""))   # the server answers, then closes
    finally:
        s.close()
    assert b" 400 " in reply.split(b"\r\n")[0] and b"conflicting Content-Length" in reply, reply
    assert request(server, "GET", "/health")[0] == 200


def hang_ups(data):
    """(name, what the client does to the server) for each way a client can hang up."""
    def half_body(close):
        def go(s):
            s.sendall(head(len(data)) + data[:len(data) // 2])
            close(s)
        return go

    def unread(close):
        def go(s):
            s.sendall(head(len(data)) + data)
            close(s)
        return go
    return [("half body, FIN", half_body(socket.socket.close)), ("half body, RST", half_body(reset)),
            ("answer unread, FIN", unread(socket.socket.close)), ("answer unread, RST", unread(reset))]


def test_client_hang_ups_are_one_log_line_each_no_traceback_no_500(predictor, capfd):
    data = png_bytes(25, (200, 200))
    log = io.StringIO()
    with Running(predictor, log=log) as server:
        for name, hang_up in hang_ups(data):
            before = log.getvalue().count("\n")
            hang_up(raw_socket(server))
            deadline = time.monotonic() + T
            while log.getvalue().count("\n") == before and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)   # anything more the handler would log
            lines = log.getvalue().splitlines()[before:]
            assert len(lines) == 1, (name, lines)
            assert " 500 " not in lines[0] and "internal error" not in lines[0], (name, lines)
        assert request(server, "GET", "/health")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


class ThreadRecording:
    """A predictor that records the thread each forward runs on."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def probabilities_of(self, x):
        self.threads.append(threading.current_thread().name)
        return self.inner.probabilities_of(x)


def test_the_model_runs_on_one_worker_thread_not_the_request_threads(predictor):
    rec = ThreadRecording(predictor)
    images = [png_bytes(300 + i) for i in range(8)]
    with Running(rec, max_concurrent=8) as server:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda d: request(server, "POST", "/predict", d, {"Content-Type": "image/png"}),
                                images, timeout=4 * T))
    assert [b["predictions"] for _, b in got] == [expected(predictor, d) for d in images]
    assert len(rec.threads) == 8 and len(set(rec.threads)) == 1, rec.threads
    assert rec.threads[0].startswith("minivgg-classify")


def serve_cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_line_naming_it(tmp_path, port):
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    r = serve_cli("--checkpoint", ckpt, "--port", port)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"port {port} is out of range" in lines[0], r.stderr


def test_a_port_in_use_is_one_line_naming_it(tmp_path):
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = serve_cli("--checkpoint", ckpt, "--port", port)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0], r.stderr
