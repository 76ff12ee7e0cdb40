"""sd_notify(3) without a dependency: READY=1, WATCHDOG=1, STOPPING=1, STATUS=...

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so `lacd run` in a terminal sends nothing.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        self.watchdog_every = usec / 4e6 if usec else None  # ping at 4x the rate systemd demands
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *states: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(self.address)
            sock.sendall("\n".join(states).encode())
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float | None = None) -> None:
        """Ping the watchdog; call only while the ingest loop is healthy."""
        if self.watchdog_every is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_every:
            self.send("WATCHDOG=1")
            self._last_ping = now
