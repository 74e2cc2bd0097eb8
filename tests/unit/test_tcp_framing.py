"""paramserver.v1.tcp on a socket pair: what the TCP data plane's sending and reading promise."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from paramserver.v1 import tcp

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield a, b
    a.close()
    b.close()


async def test_an_element_is_never_sent_half_old_half_new(pair: tuple[socket.socket, socket.socket]) -> None:
    """The array changes between the sender's partial sends (as parameters do when a push is
    applied while a pull is being sent): every received float32 must be one the array held,
    bit for bit, never the first bytes of one value and the last of another."""
    tx, rx = pair
    rng = np.random.default_rng(3)
    table = rng.integers(0, 2**32, 64, dtype=np.uint32)  # the values the array takes, in turn
    arr = np.full(1 << 18, table[0], np.uint32).view(np.float32)
    # An odd-length first part puts the sends' cuts at odd offsets into the array.
    sending = asyncio.create_task(tcp.send_parts(tx, [b"\x01\x02\x03", arr.data]))
    loop = asyncio.get_running_loop()
    got = bytearray()
    step = 0
    while len(got) < 3 + arr.nbytes:
        chunk = await loop.sock_recv(rx, 5000)
        assert chunk
        got += chunk
        step = (step + 1) % len(table)
        arr.view(np.uint32)[:] = table[step]  # between two of the sender's sends
    await sending
    received = np.frombuffer(bytes(got[3:]), np.uint32)
    assert got[:3] == b"\x01\x02\x03"
    torn = ~np.isin(received, table)
    assert not torn.any(), f"{torn.sum()} elements were never held, e.g. {received[torn][:3]}"
    assert len(np.unique(received)) > 10  # the array really changed while it was sent


async def test_a_peer_that_stops_reading_times_out_the_send(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, _ = pair
    with pytest.raises(TimeoutError, match="read nothing for"):
        await tcp.send_parts(tx, [bytes(1 << 20)], stall=0.2)


async def test_read_frame_refuses_large_and_unknown_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    tx, rx = pair
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(tx, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 3) + b"abc")
    kind, status, body = await tcp.read_frame(rx, 1 << 10)
    assert (kind, status, bytes(body)) == (tcp.MESSAGE, 0, b"abc")
    await loop.sock_sendall(tx, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 2048))
    with pytest.raises(tcp.FrameTooLarge, match="2048 bytes is larger than the server's limit of 1024"):
        await tcp.read_frame(rx, 1 << 10)
    await loop.sock_sendall(tx, tcp.FRAME.pack(9, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="unknown frame kind 9"):
        await tcp.read_frame(rx, 1 << 10)
    tx.close()
    with pytest.raises(ConnectionError):
        await tcp.read_frame(rx, 1 << 10)
