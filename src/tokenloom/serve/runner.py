"""Run the app with uvicorn: in the foreground (the CLI), on a background thread (tests), or as a
`tokenloom serve` subprocess (load tests, the browser test, the screenshot script)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: a free one), or OSError saying which address failed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3,
                            access_log=log_level in ("debug", "info"))
    return uvicorn.Server(config)


class ServerThread:
    """The app served on host:port (default: 127.0.0.1 and a free port) by uvicorn on a daemon thread.

        with ServerThread(create_app(settings)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="tokenloom-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0, ready: bool = True) -> "ServerThread":
        """Start serving; with `ready`, wait until the model is loaded too."""
        if not self.thread.is_alive():
            self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        worker = self.app.state.worker
        while ready and not worker.ready:
            if worker.state == "failed":
                raise RuntimeError(f"the model did not load: {worker.load_error}")
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self if self.server.started else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess:
    """`tokenloom serve ARGS` in a subprocess on 127.0.0.1 and a port it picks itself (no race for a
    free port), ready once GET /health answers 200; stopped by stop() or on leaving a `with` block.

        with ServeProcess(["--max-batch", "8"]) as server:
            httpx.get(server.url + "/v1/models")
    """

    def __init__(self, args: list[str] = (), timeout: float = 180.0, env: dict | None = None):
        cmd = [sys.executable, "-m", "tokenloom.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     text=True, env=env)
        self.log: list[str] = []
        match = None
        for _ in range(100):  # the address line comes first (after any import warnings)
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match:
                break
        if not match:
            self.stop()
            raise RuntimeError("tokenloom serve did not start:\n" + "".join(self.log[-20:]).strip())
        # keep reading its stderr, so a chatty server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tokenloom serve did not answer /health in {timeout:g} s:\n"
                                   + "".join(self.log[-20:]).strip())
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log = (self.log + [line])[-200:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
