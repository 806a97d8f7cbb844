"""An upload behind gunicorn is read from the connection's socket itself (views._SocketBody), past
gunicorn's body reader: gunicorn's own reader and unreader, over a real socket pair, must be left
exactly the connection's next request."""

import random
import socket

import pytest
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader

from trusca.backups.views import _SocketBody

BODY = random.Random(5).randbytes(100)
NEXT = b"GET /admin/ HTTP/1.1\r\nHost: portal\r\n\r\n"


@pytest.fixture
def connection():
    client, server = socket.socketpair()
    client.settimeout(5)
    server.settimeout(5)  # a read past what was sent fails the test instead of hanging it
    yield client, server
    client.close()
    server.close()


def gunicorn_after_headers(server: socket.socket, held: bytes) -> LengthReader:
    """gunicorn's reader of a body of len(BODY) bytes, as the request's headers leave it: holding
    what it read past them."""
    unreader = SocketUnreader(server)
    unreader.unread(held)
    return LengthReader(unreader, len(BODY))


def read_all(body: _SocketBody) -> bytes:
    got, buffer = bytearray(), bytearray(7)  # small reads, across the held bytes' end
    while count := body.readinto(buffer):
        got += buffer[:count]
    return bytes(got)


@pytest.mark.parametrize(
    "held",
    [0, 30, len(BODY), len(BODY) + 10],
    ids=["nothing-held", "part-of-the-body", "the-whole-body", "the-body-and-the-next-request-begun"],
)
def test_the_body_comes_whole_and_gunicorn_is_left_exactly_the_next_request(connection, held):
    client, server = connection
    stream = BODY + NEXT
    reader = gunicorn_after_headers(server, stream[:held])
    client.sendall(stream[held:])
    client.shutdown(socket.SHUT_WR)

    assert read_all(_SocketBody(server, reader, len(BODY))) == BODY
    # gunicorn drains what is left of the body before parsing the next request: nothing.
    assert reader.length == 0 and reader.read(8192) == b""
    rest = b""
    while data := reader.unreader.read():
        rest += data
    assert rest == NEXT


def test_a_client_that_goes_away_ends_the_body_early_and_gunicorn_knows_what_is_missing(connection):
    client, server = connection
    reader = gunicorn_after_headers(server, BODY[:30])
    client.sendall(BODY[30:50])
    client.close()

    body = _SocketBody(server, reader, len(BODY))
    assert read_all(body) == BODY[:50]  # then 0: the upload's reader calls it incomplete
    assert reader.length == len(BODY) - 50
