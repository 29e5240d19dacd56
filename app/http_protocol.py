"""uvicorn's HTTP protocol (httptools), with a lingering close for requests it cannot parse.

uvicorn answers a malformed request (a control character in a header, a broken request line)
with 400 and closes the connection at once. When the client's bytes are not all read by then
(a large request whose first packet already failed to parse), closing with unread data makes the
kernel send a reset, and the client never sees the 400. Here the 400 is sent, our side of the
connection is shut (FIN), the rest of the request is read and dropped, and the connection is
closed when the client closes its side, or after `LINGER_S` (as nginx's `lingering_close` does).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# How long a connection whose request was refused may keep sending before it is closed anyway.
LINGER_S = 2.0


class LingeringHttpToolsProtocol(HttpToolsProtocol):
    _lingering = False

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = msg.encode("ascii")
        head = [b"HTTP/1.1 400 Bad Request", *(name + b": " + value for name, value in self.server_state.default_headers),
                b"content-type: text/plain; charset=utf-8", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
