"""trainer.serve under hostile load, as a real server process on 127.0.0.1: slow clients, too many connections,
bodies that hold memory, nesting that breaks parsers, and SIGTERM with requests still running.

Every load here is bounded in count and time: a few hundred sockets at most, each loop with a deadline.
"""

import json
import select
import socket
import time

import pytest

from benchmarks.serving import ServerProcess
from test_serve import GOOD
from test_serve import instances
from test_serve import metric_values
from test_serve import request
from test_serve import served_run  # noqa: F401 (a fixture)

HEADER_TIMEOUT = 4
MAX_CONNECTIONS = 300
FLAGS = (f"--header_timeout_s={HEADER_TIMEOUT}", "--body_timeout_s=3", f"--max_connections={MAX_CONNECTIONS}",
         "--max_request_bytes=1048576", "--max_inflight_bytes=2097152")
PREDICT = "/v1/models/cnn:predict"


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):  # noqa: F811
    process = ServerProcess(served_run, *FLAGS, log_path=tmp_path_factory.mktemp("limits") / "server.log")
    process.start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def open_connection(url: str, first_bytes: bytes) -> socket.socket:
    connection = socket.create_connection(address(url), timeout=10)
    connection.sendall(first_bytes)
    return connection


def closed_by_server(connection: socket.socket, received: dict | None = None) -> bytes | None:
    """All the server sent before closing the connection (possibly nothing), or None while it is still open;
    `received` keeps what has come so far between calls, by connection."""
    received = {} if received is None else received
    while select.select([connection], [], [], 0)[0]:
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received.pop(connection, b"")
        received[connection] = received.get(connection, b"") + chunk
    return None


def health_answers_promptly(url: str, times: int = 5, within: float = 3.0) -> bool:
    for _ in range(times):
        start = time.monotonic()
        status, _ = request(url, "GET", "/healthz")
        if status != 200 or time.monotonic() - start > within:
            return False
    return True


def test_slow_clients_neither_stay_forever_nor_shut_out_health_checks(server):
    """Hundreds of connections trickling a request's head or body a few bytes at a time: /healthz keeps answering,
    connections beyond --max_connections push out the oldest, and every one is closed by its deadline."""
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    with_body = head + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    slow = [open_connection(server.url, head) for _ in range(150)]
    slow += [open_connection(server.url, with_body) for _ in range(100)]
    try:
        assert health_answers_promptly(server.url)
        slow += [open_connection(server.url, head) for _ in range(100)]  # 350 > --max_connections=300.
        assert health_answers_promptly(server.url)
        time.sleep(0.5)
        pushed_out = [closed_by_server(connection) for connection in slow[:60]]
        assert sum(b"to make room for another connection" in (ending or b"") for ending in pushed_out) >= 40, \
            pushed_out
        endings, received, deadline = {}, {}, time.monotonic() + HEADER_TIMEOUT + 10
        while len(endings) < len(slow) and time.monotonic() < deadline:
            for index, connection in enumerate(slow):
                if index in endings:
                    continue
                ending = closed_by_server(connection, received)
                if ending is not None:
                    endings[index] = ending
                else:
                    try:  # A byte now and then does not extend the deadline.
                        connection.send(b" " if 150 <= index < 250 else b"X-Slow: 1\r\n")
                    except OSError:
                        pass
            time.sleep(0.5)
        assert len(endings) == len(slow), f"{len(slow) - len(endings)} slow connections are still open"
        assert any(ending.startswith(b"HTTP/1.1 408") and b"--header_timeout_s=4" in ending
                   for ending in endings.values())
        # A body cut short is answered by the application; the rest of it, still trickling, is no request's head.
        assert any(ending.startswith(b"HTTP/1.1 408") and b"--body_timeout_s=3" in ending
                   for index, ending in endings.items() if 150 <= index < 250)
        assert health_answers_promptly(server.url)
    finally:
        for connection in slow:
            connection.close()


def test_a_body_that_does_not_arrive_in_time_is_a_408(server):
    connection = open_connection(server.url, (f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                              "application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
    try:
        status, answer = response_of(connection)
    finally:
        connection.close()
    assert status == 408 and "did not arrive within --body_timeout_s=3 (1 bytes came)" in answer["error"]


def test_headers_over_64_kib_are_a_431(server):
    connection = open_connection(server.url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                                 b"X-Padding: " + b"a" * 70_000 + b"\r\n")
    try:
        status, answer = response_of(connection)
    finally:
        connection.close()
    assert status == 431 and "line and headers are over 65,536 bytes" in answer["error"]
    assert health_answers_promptly(server.url)


def test_bodies_in_flight_are_capped_and_their_memory_given_back(server):
    """Two uploads of 900 kB in progress hold 1.8 MB of --max_inflight_bytes=2 MiB: a third is a 503 at once,
    and once they end, requests are answered again."""
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 900000\r\n\r\n").encode()
    holding = [open_connection(server.url, head + b'{"instances": [') for _ in range(2)]
    try:
        time.sleep(0.5)
        status, answer = request(server.url, "POST", PREDICT, b"[" + b" " * 899_998 + b"]",
                                 {"Content-Type": "application/json"})
        assert status == 503 and "--max_inflight_bytes=2,097,152; retry shortly" in answer["error"]
    finally:
        for connection in holding:
            connection.close()
    deadline = time.monotonic() + 10
    while request(server.url, "POST", PREDICT, instances(GOOD), {"Content-Type": "application/json"})[0] != 200:
        assert time.monotonic() < deadline, "the held bodies' memory was not given back"
        time.sleep(0.2)


def test_a_client_that_hangs_up_mid_body_is_not_a_server_error(server):
    """No 5xx in /metrics and nothing in the log: the client left, the server did nothing wrong."""
    before, log_length = metric_values(server.url), len(server.log())
    for _ in range(3):
        with socket.create_connection(address(server.url), timeout=10) as connection:
            connection.sendall(b"POST /v1/models/cnn:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                               b"application/json\r\nContent-Length: 5000\r\n\r\n" + instances(GOOD)[:100])
            time.sleep(0.2)
    time.sleep(0.5)
    after = metric_values(server.url)
    server_errors = {key: value - before.get(key, 0) for key, value in after.items()
                     if key.startswith("serving_requests_total") and 'code="5' in key}
    assert not any(server_errors.values()), server_errors
    assert after['serving_requests_total{code="499",route="/v1/models/{name:model}:predict"}'] - before.get(
        'serving_requests_total{code="499",route="/v1/models/{name:model}:predict"}', 0) == 3
    assert server.log()[log_length:].strip() == ""


@pytest.mark.parametrize("opening, closing", [("[", "]"), ('{"a":', "}")])
def test_json_nested_100000_deep_is_a_400(server, opening, closing):
    body = (opening * 100_000 + "0" + closing * 100_000).encode()
    status, answer = request(server.url, "POST", PREDICT, body, {"Content-Type": "application/json"})
    assert status == 400 and "nested too deeply" in answer["error"]
    assert 'serving_errors_total{code="500"' not in request(server.url, "GET", "/metrics")[1]


def test_sigterm_answers_what_finishes_in_the_grace_period_and_503s_the_rest(served_run, tmp_path):  # noqa: F811
    """Two uploads in progress at SIGTERM: one completes within --shutdown_grace_s and is answered, the other
    never does and gets a JSON 503 when the grace period ends; the log says which was which."""
    process = ServerProcess(served_run, "--shutdown_grace_s=2", log_path=tmp_path / "server.log").start()
    body = instances(GOOD)
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    finishing, stalled = (open_connection(process.url, head + body[:10]) for _ in range(2))
    try:
        time.sleep(0.5)
        start = time.monotonic()
        process.process.terminate()
        time.sleep(0.3)
        finishing.sendall(body[10:])
        finished, cut_off = response_of(finishing), response_of(stalled)
        waited = time.monotonic() - start
    finally:
        finishing.close()
        stalled.close()
        status = process.stop()
    assert finished[0] == 200 and "predictions" in finished[1]
    assert cut_off[0] == 503 and "shutting down" in cut_off[1]["error"], cut_off
    assert 1.5 < waited < 10 and status == 0
    assert "Stopped on SIGTERM: answered 1 requests in flight; cut off 1 still running after --shutdown_grace_s=2 " \
           "with a 503." in process.log()


def response_of(connection: socket.socket) -> tuple[int, dict]:
    connection.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0
