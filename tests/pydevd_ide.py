"""Plays PyCharm's side of pydevd's line protocol, like PyCharm's "Python Debug Server" run configuration.

The IDE listens; the program connects out with ``pydevd_pycharm.settrace(host, port, suspend=False)`` (our
``--pycharm-debug HOST:PORT``) and waits for the IDE's ``run`` before it goes on. Messages are lines
``<cmd_id>\\t<seq>\\t<text>\\n``; the program URL-quotes its text. The protocol is internal to pydevd and changes
between builds: this is checked against the pinned ``pydevd-pycharm`` of requirements-test.txt.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import unquote

CMD_RUN = 101
CMD_THREAD_CREATE = 103
CMD_THREAD_SUSPEND = 105
CMD_THREAD_RUN = 106
CMD_SET_BREAK = 111
CMD_REMOVE_BREAK = 112
CMD_GET_FRAME = 114
CMD_WRITE_TO_CONSOLE = 116
CMD_VERSION = 501


class PydevdTimeout(AssertionError):
    pass


class PydevdIDE:
    """A listening "debug server": accept one program, then drive it with bounded waits."""

    def __init__(self, host: str = "127.0.0.1"):
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind((host, 0))
        self._server.listen(1)
        self.host, self.port = self._server.getsockname()[:2]
        self._conn: socket.socket | None = None
        self._seq = itertools.count(1, 2)  # the IDE's sequence numbers are odd, the program's even
        self._lock = threading.Condition()
        self.messages: list[tuple[int, int, str]] = []  # (cmd_id, seq, unquoted text)
        self._consumed = 0
        self.closed = False
        self._thread: threading.Thread | None = None

    def accept(self, timeout: float) -> None:
        self._server.settimeout(timeout)
        try:
            self._conn, _ = self._server.accept()
        except TimeoutError:
            raise PydevdTimeout(f"no program connected to {self.host}:{self.port} within {timeout}s") from None
        self._conn.settimeout(None)
        self._thread = threading.Thread(target=self._read_loop, name="pydevd-ide-reader", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self._conn.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    cmd, seq, text = line.decode("utf-8").split("\t", 2)
                    with self._lock:
                        self.messages.append((int(cmd), int(seq), unquote(text)))
                        self._lock.notify_all()
        except OSError:
            pass
        finally:
            with self._lock:
                self.closed = True
                self._lock.notify_all()

    def send(self, cmd_id: int, text: str = "") -> int:
        seq = next(self._seq)
        self._conn.sendall(f"{cmd_id}\t{seq}\t{text}\n".encode())
        return seq

    def wait_for(self, cmd_id: int, timeout: float, seq: int | None = None) -> str:
        """Text of the next unread message ``cmd_id`` (the reply to ``seq`` when given)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for index in range(self._consumed, len(self.messages)):
                    cmd, their_seq, text = self.messages[index]
                    if cmd == cmd_id and (seq is None or their_seq == seq):
                        self._consumed = index + 1
                        return text
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    seen = [m[0] for m in self.messages]
                    state = "closed" if self.closed else f"timed out after {timeout}s"
                    raise PydevdTimeout(f"waiting for command {cmd_id}: connection {state}; received {seen}")
                self._lock.wait(remaining)

    # ------------------------------------------------------------------ what PyCharm sends
    def handshake(self, timeout: float = 10.0) -> str:
        """Version exchange; breakpoints are then addressed by id, as PyCharm does."""
        return self.wait_for(CMD_VERSION, timeout, self.send(CMD_VERSION, "1.1\tUNIX\tID"))

    def set_breakpoint(self, path: str, line: int, breakpoint_id: int = 1) -> None:
        # id, type, file, line, function ("None" = any), condition, expression
        self.send(CMD_SET_BREAK, f"{breakpoint_id}\tpython-line\t{path}\t{line}\tNone\tNone\tNone")

    def remove_breakpoint(self, path: str, breakpoint_id: int = 1) -> None:
        self.send(CMD_REMOVE_BREAK, f"python-line\t{path}\t{breakpoint_id}")

    def run(self) -> None:
        self.send(CMD_RUN)

    def wait_suspended(self, timeout: float) -> tuple[str, list[dict[str, str]]]:
        """(thread id, frames top first with id/name/file/line) of the next suspension."""
        root = ET.fromstring(self.wait_for(CMD_THREAD_SUSPEND, timeout))
        thread = root.find("thread")
        return thread.get("id"), [dict(frame.attrib) for frame in thread.findall("frame")]

    def frame_variables(self, thread_id: str, frame_id: str, timeout: float = 10.0) -> dict[str, dict[str, str]]:
        seq = self.send(CMD_GET_FRAME, f"{thread_id}\t{frame_id}\tFRAME\t0")
        root = ET.fromstring(self.wait_for(CMD_GET_FRAME, timeout, seq))
        return {var.get("name"): {k: unquote(v) for k, v in var.attrib.items()} for var in root.iter("var")}

    def resume(self, thread_id: str) -> None:
        self.send(CMD_THREAD_RUN, thread_id)

    def console_output(self) -> str:
        """What the program wrote to stdout/stderr (``stdout_to_server``), as the IDE's console shows it."""
        with self._lock:
            texts = [text for cmd, _, text in self.messages if cmd == CMD_WRITE_TO_CONSOLE]
        out = []
        for text in texts:
            with contextlib.suppress(ET.ParseError):
                out += [unquote(io.get("s", "")) for io in ET.fromstring(text).iter("io")]
        return "".join(out)

    def close(self) -> None:
        for sock in (self._conn, self._server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def __enter__(self) -> PydevdIDE:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
