"""store/read_ahead.py: the bytes of a stream as they are, the next piece fetched before it is asked
for, an error where it happened, and no fetch past `ahead_until` that was not asked for."""

from __future__ import annotations

import io
import threading
import time

import pytest

from store.read_ahead import ReadAhead

PIECE = 1000
DATA = bytes(i % 251 for i in range(3 * PIECE + 123))


class CountedStream(io.BytesIO):
    """A stream that counts its reads, and fails the read number `fail_at` (1-based)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.reads, self.fail_at = 0, fail_at

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("the storage went away")
        return super().read(size)


@pytest.mark.parametrize("size", [1, 7, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE, 10 * PIECE])
def test_reads_of_any_size_give_the_bytes_as_they_are(size):
    with ReadAhead(CountedStream(DATA), PIECE) as stream:
        got = b"".join(iter(lambda: stream.read(size), b""))
    assert got == DATA


def test_a_read_of_everything_and_reads_after_the_end():
    with ReadAhead(CountedStream(DATA), PIECE) as stream:
        assert stream.read(5) == DATA[:5] and stream.read() == DATA[5:]
        assert stream.read(10) == b"" and stream.read() == b""


def test_the_next_piece_is_fetched_before_it_is_asked_for():
    raw = CountedStream(DATA)
    with ReadAhead(raw, PIECE) as stream:
        stream.read(1)
        deadline = time.monotonic() + 10
        while raw.reads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raw.reads == 2  # the first piece, and the second while the first is read


def test_an_error_comes_after_the_bytes_before_it():
    with ReadAhead(CountedStream(DATA, fail_at=3), PIECE) as stream:
        assert stream.read(2 * PIECE) == DATA[:2 * PIECE]
        with pytest.raises(OSError, match="went away"):
            stream.read(1)


def test_no_piece_past_ahead_until_is_fetched_unless_asked_for():
    raw = CountedStream(DATA)
    with ReadAhead(raw, PIECE, ahead_until=PIECE + 1) as stream:
        assert stream.read(PIECE + 10) == DATA[:PIECE + 10]
    assert raw.reads == 2  # the second piece holds byte PIECE + 1: nothing after it
    raw = CountedStream(DATA)
    with ReadAhead(raw, PIECE, ahead_until=PIECE + 1) as stream:
        assert stream.read() == DATA  # asked for: read to the end
    assert raw.closed


def test_after_a_failed_fetch_every_read_raises():
    """A stream with a gap in it is no stream: no read goes on after the piece that failed."""
    with ReadAhead(CountedStream(DATA, fail_at=3), PIECE) as stream:
        assert stream.read(10) == DATA[:10]
        assert stream.read(3 * PIECE) == DATA[10:2 * PIECE]  # the bytes before the failed piece first
        for _ in range(2):
            with pytest.raises(OSError, match="went away"):
                stream.read(10)


def test_read_none_reads_everything():
    with ReadAhead(CountedStream(DATA), PIECE) as stream:
        assert stream.read(None) == DATA


def test_close_does_not_wait_for_a_fetch_in_flight_and_closes_the_stream_after_it():
    release = threading.Event()

    class SlowStream(CountedStream):
        def read(self, size: int = -1) -> bytes:
            if self.reads == 1:  # the second piece's fetch
                release.wait(10)
            return super().read(size)

    raw = SlowStream(DATA)
    stream = ReadAhead(raw, PIECE)
    assert stream.read(1) == DATA[:1]
    stream.close()
    assert not raw.closed  # its fetch is still under way
    release.set()
    deadline = time.monotonic() + 10
    while not raw.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.closed


def test_peek_leaves_the_bytes_to_be_read():
    with ReadAhead(CountedStream(DATA), PIECE) as stream:
        assert stream.peek(10) == DATA[:10] and stream.read(4) == DATA[:4]
        assert stream.peek(10) == DATA[4:14] and stream.read() == DATA[4:]
        assert stream.peek(10) == b""
