"""A TCP relay that keeps a copy of what the server behind it answers, for reading a real upstream's own replies.

Put between the gateway and vLLM, it shows what vLLM said to the gateway (for instance its echo of the prompt
token ids it received) without changing either side: bytes pass through unchanged, and when one side
closes the connection the relay closes the other.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

# One SSE event per line of the answer; uvicorn sends each event as one HTTP chunk, so a line is never split.
_DATA_LINE = re.compile(rb"^data: (\{.*\})\r?$", re.MULTILINE)


class Tap:
    """Listens on 127.0.0.1 and relays every connection to ``127.0.0.1:upstream_port``. ``close()`` when done."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._answers: list[bytearray] = []  # per connection, everything the upstream sent
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def events(self) -> Iterator[dict[str, Any]]:
        """Every JSON ``data:`` event the upstream has sent so far, connection by connection."""
        with self._lock:
            answers = [bytes(answer) for answer in self._answers]
        for answer in answers:
            for match in _DATA_LINE.finditer(answer):
                yield json.loads(match.group(1))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            answer = bytearray()
            with self._lock:
                self._answers.append(answer)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, answer), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, copy: bytearray | None) -> None:
        try:
            while data := source.recv(65536):
                if copy is not None:
                    with self._lock:
                        copy += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # One side ended (or failed): end both. shutdown() also wakes the other direction's blocked recv().
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
