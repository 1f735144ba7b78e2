"""An in-process MQTT broker (amqtt) for a laptop quick start: ``edgekit hub serve --embedded-broker``.

Not for production: no TLS, no passwords, nothing kept across a restart; anonymous clients, so it
listens on loopback only. A fleet uses Mosquitto (``edgekit broker-config``).

The broker runs in its own thread with its own asyncio loop, because the hub runs uvicorn in the
main thread. The listening socket is ours, not amqtt's: bound before anything starts (a busy port
is refused in one line, port 0 is known at once), and each accepted connection is handed to amqtt
as one of an "external" listener's, which is amqtt's way of serving connections others accept.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import ipaddress
import logging
import socket
import threading
from types import TracebackType
from typing import Any

from edgekit.errors import InvalidInputError, MissingDependencyError
from edgekit_runtime.errors import UnavailableError

__all__ = ["DEFAULT_BROKER_PORT", "INSTALL_HINT", "EmbeddedBroker", "check_embedded_broker", "start_embedded_broker"]

log = logging.getLogger("edgekit.hub.embedded_broker")

DEFAULT_BROKER_PORT = 1883
INSTALL_HINT = "pip install 'edgekit-ml[embedded-broker]'"
_WAIT = 30.0  # seconds: a bound on starting and stopping, never reached unless something hangs
_LISTENER = "default"  # amqtt requires a listener of this name


def check_embedded_broker() -> None:
    """MissingDependencyError (one line naming the pip command) when amqtt is not installed: it is
    an extra, so a hub that uses Mosquitto does not carry it."""
    if importlib.util.find_spec("amqtt") is None:
        msg = f"--embedded-broker needs amqtt, which is not installed: {INSTALL_HINT}"
        raise MissingDependencyError(msg)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _answers_mqtt(host: str, port: int) -> bool:
    """Whether what listens on host:port answers an MQTT 3.1.1 CONNECT with a CONNACK (any return
    code: a broker that refuses us is still a broker)."""
    client_id = b"edgekit-port-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10 s
    body = variable + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            reply = s.recv(4)
            if reply[:2] == b"\x20\x02":
                s.sendall(b"\xe0\x00")  # DISCONNECT, so the broker does not log a lost client
                return True
    except OSError:
        pass
    return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            msg = f"the embedded MQTT broker cannot listen on {host}:{port}: {e.strerror or e}"
            raise UnavailableError(msg) from None
    fix = "give the embedded broker another port with --broker-port N (0 picks a free one)"
    if _answers_mqtt(host, port):
        msg = (
            f"port {port} on {host} is already in use by another MQTT broker (a system Mosquitto?): "
            f"use it with --broker mqtt://{host}:{port} instead of --embedded-broker, or {fix}"
        )
    else:
        msg = f"port {port} on {host} is already in use; {fix}"
    raise UnavailableError(msg)


class EmbeddedBroker:
    """A running amqtt broker; ``url`` is where clients connect, ``stop()`` ends it (also on leaving
    a ``with`` block). Made by ``start_embedded_broker``."""

    def __init__(self, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        self.host: str = host
        self.port: int = port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"mqtt://{shown}:{port}"
        self.announcement = (
            f"embedded MQTT broker on {self.url} (amqtt; for a laptop quick start, not for production: "
            "use Mosquitto with edgekit broker-config)"
        )
        self._sock = sock
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgekit-embedded-broker", daemon=True)
        self._broker: Any = None
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._stopped = False

    def _start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(_WAIT)
        except BaseException:
            self.stop()
            raise

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        config = {
            # "bind" is only shown by amqtt here (an external listener binds nothing), but a listener
            # without one is skipped
            "listeners": {_LISTENER: {"type": "external", "bind": f"{self.host}:{self.port}"}},
            # only anonymous auth: no $SYS topics, no packet logger
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await self._broker.start()
        self._server = await asyncio.start_server(self._connected, sock=self._sock)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

        task = asyncio.current_task()
        assert task is not None  # a connection is always served in a task
        self._clients[task] = writer
        try:
            await self._broker.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER)
        finally:
            # the connection ends with its session, whatever amqtt did with the socket
            del self._clients[task]
            writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()  # accept no more
        if self._broker is not None and self._broker.transitions.state == "started":
            await self._broker.shutdown()  # ends every client's session
        for writer in self._clients.values():
            writer.close()
        if self._clients:
            _, hung = await asyncio.wait(list(self._clients), timeout=_WAIT)
            for task in hung:
                task.cancel()

    def stop(self) -> None:
        """Disconnect every client, stop listening, end the thread. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._thread.is_alive():
                try:
                    asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(_WAIT)
                except Exception:  # stopping must go on: the socket and the thread are ours to end
                    log.exception("embedded MQTT broker: shutdown failed")
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(_WAIT)
        finally:
            self._sock.close()
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_embedded_broker(host: str = "127.0.0.1", port: int = DEFAULT_BROKER_PORT) -> EmbeddedBroker:
    """Start amqtt on host:port (port 0: a free one) and return once it accepts connections.

    Every client is let in without a password, so the host must be a loopback address (anyone on
    the network could otherwise publish a desired state to the devices). MissingDependencyError
    without amqtt; UnavailableError for a busy port, saying whether an MQTT broker holds it."""
    check_embedded_broker()
    if not _is_loopback(host):
        msg = (
            f"the embedded MQTT broker lets anyone in without a password, so it listens on loopback "
            f"(127.0.0.1) only, not {host}; for a broker devices on the network reach, run Mosquitto "
            "with edgekit broker-config"
        )
        raise InvalidInputError(msg)
    broker = EmbeddedBroker(_listen(host, port))
    broker._start()
    return broker
