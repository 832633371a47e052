"""/metrics against HTTP clients that never finish their request: connections that trickle header bytes
or say nothing must neither starve scrapes nor hold the process past its drain budget after SIGTERM, and each
one is cut once it has had --metrics-request-timeout-ms to send its request.

Everything is on 127.0.0.1; the slow clients are plain sockets driven by one thread, closed at the end of every
test, pass or fail."""

import select
import socket
import threading
import time
import urllib.request

import pytest

from conftest import SMALL

SLOW_CLIENTS = 8  # more than the two workers the endpoint once had


class SlowClients:
    """`n` connections to the metrics port that never complete a request: the even ones send a request line and
    then one header byte every `interval` seconds (each read on the server's side succeeds, so a per-read timeout
    never fires), the odd ones send nothing at all. closed_after[i] is how long connection i lived before the server
    closed it (None while it is open)."""

    def __init__(self, port: int, n: int = SLOW_CLIENTS, interval: float = 0.1):
        self.socks = []
        self.opened = []
        for _ in range(n):
            self.socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            self.opened.append(time.monotonic())
        self.closed_after = [None] * n
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        sent = 0
        while not self._stop.wait(self._interval):
            chunk = head[sent:sent + 1] if sent < len(head) else b"a"
            sent += 1
            for i, s in enumerate(self.socks):
                if self.closed_after[i] is not None:
                    continue
                try:
                    # Readable means the server answered or closed: either way it is done with this client.
                    if select.select([s], [], [], 0)[0]:
                        s.recv(65536)
                        raise ConnectionResetError
                    if i % 2 == 0:
                        s.send(chunk)
                except OSError:
                    self.closed_after[i] = time.monotonic() - self.opened[i]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in self.socks:
            s.close()


@pytest.fixture
def slow_clients():
    made = []

    def make(port, **kwargs):
        c = SlowClients(port, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def timed_scrape(port: int, timeout: float) -> float:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        assert "mqa_build_info" in r.read().decode()
    return time.monotonic() - start


def test_scrape_succeeds_while_slow_clients_hold_connections(start_server, slow_clients):
    server = start_server(config={"models": [SMALL]})
    clients = slow_clients(server.metrics_port)
    time.sleep(1.5)  # every slow client has been accepted and is mid-request (and past any 1 s keep-alive wait)
    for _ in range(3):
        assert timed_scrape(server.metrics_port, timeout=3) < 3
    # The scrapes did not get through by the slow clients having been dropped.
    assert all(c is None for c in clients.closed_after[0::2]), clients.closed_after


def test_trickling_client_is_cut_at_request_timeout(start_server, slow_clients):
    server = start_server(config={"models": [SMALL]}, args=["--metrics-request-timeout-ms", "1000"])
    clients = slow_clients(server.metrics_port)
    deadline = time.monotonic() + 10
    while any(c is None for c in clients.closed_after):
        assert time.monotonic() < deadline, clients.closed_after
        time.sleep(0.05)
    # Cut at the total limit (1 s from the accept) plus the driver's 0.1 s tick, not at some per-read timeout.
    assert all(0.8 < c < 3 for c in clients.closed_after), clients.closed_after
    assert timed_scrape(server.metrics_port, timeout=3) < 3


def test_connections_beyond_the_limit_are_refused_at_once(start_server, slow_clients):
    server = start_server(config={"models": [SMALL]}, args=["--metrics-max-connections", "4",
                                                           "--metrics-request-timeout-ms", "60000"])
    clients = slow_clients(server.metrics_port)
    deadline = time.monotonic() + 10
    while sum(c is not None for c in clients.closed_after) < SLOW_CLIENTS - 4:
        assert time.monotonic() < deadline, clients.closed_after
        time.sleep(0.05)
    time.sleep(0.5)
    assert sum(c is None for c in clients.closed_after) == 4, clients.closed_after


def test_connection_burst_is_accepted_at_once(start_server):
    server = start_server(config={"models": [SMALL]})
    socks = []
    try:
        # More at once than a listen backlog of 5 holds before the accept thread runs: past it, Linux drops SYNs,
        # and a connect takes 1 s or more (the SYN is resent).
        for _ in range(32):
            start = time.monotonic()
            socks.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10))
            assert time.monotonic() - start < 0.5, f"connect {len(socks)} of a burst of 32 was held"
        assert timed_scrape(server.metrics_port, timeout=3) < 3
    finally:
        for s in socks:
            s.close()


# The second case makes the request timeout longer than the test, so the exit cannot come from the slow clients
# being cut: Stop() itself must not wait for them.
@pytest.mark.parametrize("extra", [[], ["--metrics-request-timeout-ms", "600000"]], ids=["defaults", "long-request-timeout"])
def test_sigterm_exits_within_drain_budget_despite_slow_clients(pb, start_server, stub_for, slow_clients, extra):
    server = start_server(config={"models": [SMALL]}, args=["--drain-timeout-ms", "1000", *extra])
    stub = stub_for(server)
    # Left open, so the drain spends its whole budget.
    stub.CreateSession(pb.svc.CreateSessionRequest(model="small"), timeout=30)
    clients = slow_clients(server.metrics_port)
    time.sleep(1.5)
    start = time.monotonic()
    server.terminate()
    try:
        code = server.wait(timeout=1 + 5)
    except Exception:
        pytest.fail(f"mqa-server still running {time.monotonic() - start:.1f} s after SIGTERM with "
                    f"--drain-timeout-ms 1000 and {SLOW_CLIENTS} slow /metrics clients")
    elapsed = time.monotonic() - start
    assert code == 0
    assert 0.9 < elapsed < 1 + 5, elapsed
    assert "event=server_stopped" in server.log()
