"""A small Debug Adapter Protocol client (stdlib only): what VS Code does with launch.json, without VS Code.

It talks to the real debugpy adapter, either started as ``python -m debugpy.adapter`` over pipes (launch) or over
TCP to the adapter that a program's own ``debugpy.listen()`` started (attach). Every wait is bounded, reverse
``runInTerminal`` requests are answered by starting the command ourselves, and :meth:`DAPClient.close` kills the
process group of every process the session started, so a failing test never leaks a debuggee.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class DAPError(AssertionError):
    """The adapter answered a request with ``success: false`` or the session broke."""


class DAPTimeout(DAPError):
    """A bounded wait ran out."""


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (and ``pid`` itself), ignoring what is already gone."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            kill()


class DAPClient:
    """One DAP connection: requests with bounded waits, events in arrival order, reverse requests answered."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, *, name: str, on_close: Callable[[], None] | None = None):
        self.name = name
        self._reader = reader
        self._writer = writer
        self._on_close = on_close
        self._seq = itertools.count(1)
        self._lock = threading.Condition()
        self._write_lock = threading.Lock()
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []  # every event, in arrival order
        self._consumed = 0  # events before this index were returned by wait_event
        self.log: list[str] = []  # one line per message, for failure reports
        self.pids: set[int] = set()  # processes this session started or the adapter reported
        self.terminal_processes: list[subprocess.Popen] = []
        self.terminal_log = Path(tempfile.mkstemp(prefix="dap-terminal-", suffix=".log")[1])
        self.closed = False  # the channel is gone (set by the reader)
        self._finished = False  # close() ran
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read_loop, name=f"dap-reader-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def start_adapter(cls, python: str = sys.executable, env: dict[str, str] | None = None) -> DAPClient:
        """``python -m debugpy.adapter`` with stdin/stdout as the DAP channel (what VS Code runs)."""
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by reap() when the session ends
        proc = subprocess.Popen(
            [python, "-m", "debugpy.adapter"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )

        def reap() -> None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the adapter only exits once its stdin closes
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait(timeout=5)
            stderr.close()

        client = cls(proc.stdout, proc.stdin, name="adapter", on_close=reap)
        client.pids.add(proc.pid)
        return client

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> DAPClient:
        """TCP connection to an adapter a program started with ``debugpy.listen`` (attach)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DAPTimeout(f"no debug adapter listening on {host}:{port} after {timeout:.0f}s") from None
                time.sleep(0.05)
        sock.settimeout(None)
        reader, writer = sock.makefile("rb"), sock.makefile("wb")

        def shut() -> None:
            for stream in (writer, reader):
                with contextlib.suppress(OSError):
                    stream.close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

        return cls(reader, writer, name=f"{host}:{port}", on_close=shut)

    # ------------------------------------------------------------------ framing
    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode("utf-8")
        self.log.append(f"-> {json.dumps(message)[:300]}")
        with self._write_lock:
            self._writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self._writer.flush()

    def _read_message(self) -> dict | None:
        length = None
        while True:
            line = self._reader.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                break
            name, _, value = line.decode("ascii").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise DAPError("DAP message without Content-Length")
        body = self._reader.read(length)
        if len(body) < length:
            return None
        return json.loads(body)

    def _read_loop(self) -> None:
        try:
            while True:
                message = self._read_message()
                if message is None:
                    break
                self.log.append(f"<- {json.dumps(message)[:300]}")
                kind = message.get("type")
                if kind == "request":
                    self._reverse_request(message)
                    continue
                with self._lock:
                    if kind == "response":
                        self._responses[message["request_seq"]] = message
                    elif kind == "event":
                        self._track_pids(message)
                        self.events.append(message)
                    self._lock.notify_all()
        except (OSError, ValueError) as error:
            self.error = error
        finally:
            with self._lock:
                self.closed = True
                self._lock.notify_all()

    def _track_pids(self, event: dict) -> None:
        body = event.get("body") or {}
        if event.get("event") == "process" and body.get("systemProcessId"):
            self.pids.add(int(body["systemProcessId"]))
        if event.get("event") == "debugpyAttach" and body.get("subProcessId"):
            self.pids.add(int(body["subProcessId"]))

    # ------------------------------------------------------------------ reverse requests
    def _reverse_request(self, request: dict) -> None:
        if request.get("command") == "runInTerminal":
            try:
                body = self._run_in_terminal(request["arguments"])
                self._send(self._reply(request, True, body))
            except OSError as error:
                self._send(self._reply(request, False, None, str(error)))
        else:
            self._send(self._reply(request, False, None, f"{request.get('command')} is not supported by this client"))

    def _reply(self, request: dict, success: bool, body: Any, message: str | None = None) -> dict:
        reply = {"seq": next(self._seq), "type": "response", "request_seq": request["seq"]}
        reply.update({"command": request["command"], "success": success, "body": body or {}})
        if message:
            reply["message"] = message
        return reply

    def _run_in_terminal(self, args: dict) -> dict:
        """What VS Code's integrated terminal does: run ``args`` in ``cwd`` with ``env`` (null = unset)."""
        env = dict(os.environ)
        for key, value in (args.get("env") or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        out = self.terminal_log.open("ab")
        proc = subprocess.Popen(
            args["args"],
            cwd=args.get("cwd") or None,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.terminal_processes.append(proc)
        self.pids.add(proc.pid)
        return {"processId": proc.pid}

    def terminal_output(self) -> str:
        return self.terminal_log.read_text(encoding="utf-8", errors="replace")

    # ------------------------------------------------------------------ requests and events
    def send_request(self, command: str, arguments: dict | None = None) -> int:
        seq = next(self._seq)
        message = {"seq": seq, "type": "request", "command": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._send(message)
        return seq

    def wait_response(self, seq: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            while seq not in self._responses:
                remaining = deadline - time.monotonic()
                if self.closed:
                    raise DAPError(f"{self.name}: connection closed while waiting for response {seq}\n{self.tail()}")
                if remaining <= 0:
                    raise DAPTimeout(f"{self.name}: no response to request {seq} within {timeout}s\n{self.tail()}")
                self._lock.wait(remaining)
            response = self._responses.pop(seq)
        if not response.get("success"):
            raise DAPError(f"{response.get('command')} failed: {response.get('message')} {response.get('body')}")
        return response.get("body") or {}

    def request(self, command: str, arguments: dict | None = None, timeout: float = 10.0) -> dict:
        return self.wait_response(self.send_request(command, arguments), timeout)

    def wait_event(self, name: str, timeout: float = 10.0, predicate: Callable[[dict], bool] | None = None) -> dict:
        """The next not-yet-returned event called ``name`` (matching ``predicate``); returns its body."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for index in range(self._consumed, len(self.events)):
                    event = self.events[index]
                    body = event.get("body") or {}
                    if event.get("event") == name and (predicate is None or predicate(body)):
                        self._consumed = index + 1
                        return body
                remaining = deadline - time.monotonic()
                if self.closed:
                    raise DAPError(f"{self.name}: connection closed while waiting for event {name!r}\n{self.tail()}")
                if remaining <= 0:
                    raise DAPTimeout(f"{self.name}: no {name!r} event within {timeout}s\n{self.tail()}")
                self._lock.wait(remaining)

    def output(self) -> str:
        """Program output that arrived as ``output`` events (split anywhere, so joined first)."""
        with self._lock:
            return "".join((e.get("body") or {}).get("output", "") for e in self.events if e.get("event") == "output")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log[-lines:])

    # ------------------------------------------------------------------ session helpers
    def initialize(self) -> dict:
        return self.request(
            "initialize",
            {
                "clientID": "dap-test",
                "clientName": "dap.py",
                "adapterID": "debugpy",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
                "supportsVariableType": True,
                "supportsRunInTerminalRequest": True,
                "locale": "en",
            },
        )

    def set_breakpoints(self, path: str | Path, lines: list[int]) -> list[dict]:
        """Set breakpoints and check each is verified on exactly the requested line."""
        body = self.request(
            "setBreakpoints",
            {"source": {"path": str(path)}, "breakpoints": [{"line": line} for line in lines]},
        )
        breakpoints = body.get("breakpoints", [])
        for line, bp in zip(lines, breakpoints, strict=True):
            if not bp.get("verified") or bp.get("line") != line:
                raise DAPError(f"breakpoint {path}:{line} not verified on that line: {bp}")
        return breakpoints

    def configure(self, breakpoints: dict[str, list[int]], timeout: float = 30.0) -> None:
        """After ``launch``/``attach`` was sent: wait ``initialized``, set breakpoints, ``configurationDone``."""
        self.wait_event("initialized", timeout)
        for path, lines in breakpoints.items():
            self.set_breakpoints(path, lines)
        self.request("setExceptionBreakpoints", {"filters": []})
        self.request("configurationDone")

    def wait_stopped(self, timeout: float) -> dict:
        return self.wait_event("stopped", timeout)

    def top_frame(self, thread_id: int) -> dict:
        frames = self.request("stackTrace", {"threadId": thread_id, "startFrame": 0, "levels": 20})["stackFrames"]
        if not frames:
            raise DAPError(f"thread {thread_id} has no frames")
        return frames[0]

    def locals(self, frame_id: int) -> dict[str, dict]:
        scopes = self.request("scopes", {"frameId": frame_id})["scopes"]
        scope = next((s for s in scopes if s["name"].lower() == "locals"), scopes[0])
        variables = self.request("variables", {"variablesReference": scope["variablesReference"]})["variables"]
        return {v["name"]: v for v in variables}

    def evaluate(self, expression: str, frame_id: int) -> str:
        return self.request("evaluate", {"expression": expression, "frameId": frame_id, "context": "repl"})["result"]

    def clear_breakpoints(self, path: str | Path) -> None:
        self.request("setBreakpoints", {"source": {"path": str(path)}, "breakpoints": []})

    def exit_code(self, timeout: float) -> int:
        """The debuggee's exit code from the ``exited`` event."""
        return int(self.wait_event("exited", timeout)["exitCode"])

    # ------------------------------------------------------------------ cleanup
    def close(self, terminate: bool = True) -> None:
        """Disconnect (bounded), close the channel, kill every process group this session knows of. Idempotent:
        after ``close(terminate=False)`` (attach: the program runs on) the context manager's exit does nothing."""
        if self._finished:
            return
        self._finished = True
        if not self.closed:
            with contextlib.suppress(DAPError, OSError, ValueError):
                self.request("disconnect", {"terminateDebuggee": terminate}, timeout=3)
        if self._on_close is not None:
            with contextlib.suppress(OSError, ValueError):
                self._on_close()
        self._thread.join(timeout=3)
        if terminate:
            for pid in sorted(self.pids):
                kill_group(pid)
        for proc in self.terminal_processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.terminal_log.unlink()

    def __enter__(self) -> DAPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
