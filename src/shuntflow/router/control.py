# The router's control socket `<socket>.ctl` (AF_UNIX SOCK_STREAM, mode 0600, JSON lines), and
# the client side used by `shuntflow status`.
#
# Why a separate socket from the library channel: the library channel is a fixed binary protocol
# open to every (possibly unprivileged) application process; status is for the operator only
# (0600, root) and wants free-form JSON. One request per line, one JSON object per answer line:
#   {"cmd": "status"} -> {"router": {...}, "processes": [...]}
#   {"cmd": "ping"}   -> {"ok": true, "pid": ...}
#   {"cmd": "switch_times", "since": N} -> {"next": M, "samples": [µs, ...]}  (the bench's per-run
#       switch times: samples N..M-1 of the initiating ends, as far as the window still holds them)
#   {"cmd": "switch_calls", "since": N} -> {"next": M, "samples": [µs, ...]}  (the same for the
#       longest application data call of each completed switch, one sample per end)
# Anything else -> {"error": "..."}; the connection stays open for the next line.

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from shuntflow.router.library_channel import RouterSetupError, prepare_socket_path
from shuntflow.router.logfmt import get_logger

log = get_logger()
MAX_LINE = 64 * 1024


class StatusSource(Protocol):
    async def status(self) -> dict[str, Any]: ...
    def switch_times_since(self, index: int) -> dict[str, Any]: ...
    def switch_calls_since(self, index: int) -> dict[str, Any]: ...


class ControlServer:
    def __init__(self, path: Path, source: StatusSource) -> None:
        self.path = path
        self.source = source
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        prepare_socket_path(self.path, socket.SOCK_STREAM)
        old = os.umask(0o077)  # never world-accessible, not even for an instant
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        except OSError as exc:
            raise RouterSetupError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"error": "request line too long"})
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await self._reply(writer, await self._handle(line))
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.error("control_error", exc=True)
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
            return {"error": "request is not JSON"}
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if cmd == "status":
            return await self.source.status()
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd in ("switch_times", "switch_calls"):
            since = req.get("since", 0)
            if not isinstance(since, int) or since < 0:
                return {"error": f"{cmd} needs `since`, an integer >= 0"}
            if cmd == "switch_times":
                return self.source.switch_times_since(since)
            return self.source.switch_calls_since(since)
        return {"error": f"unknown cmd {cmd!r}; use status, ping, switch_times or switch_calls"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj, default=str).encode() + b"\n")
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            self._server = None
        self.path.unlink(missing_ok=True)


def query(path: Path, cmd: str = "status", timeout: float = 5.0, **params: Any) -> dict[str, Any]:
    """Blocking client: one request, one answer (used by `shuntflow status` and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, **params}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: router closed the control connection")
            buf += chunk
    answer = json.loads(buf)
    if not isinstance(answer, dict):
        raise ValueError(f"{path}: answer is not a JSON object")
    return answer
