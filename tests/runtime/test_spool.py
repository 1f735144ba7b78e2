"""The agent's telemetry queue (agent/spool.py): sequence numbers that grow and survive a reopen,
acks that remove exactly what they name, the byte bound dropping the oldest (counted, kept across a
reopen) and nothing below it, the file shrinking back after a drain, and kill -9 losing nothing
that ``append`` returned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edgekit_runtime.agent.spool import Spool
from tests.mqtt import WAIT, wait_until


def fixed(size: int) -> Callable[[int], bytes]:
    """A maker of exactly ``size`` bytes, starting with the sequence number."""

    def make(seq: int) -> bytes:
        head = f"{seq}:".encode()
        assert len(head) <= size
        return head + b"x" * (size - len(head))

    return make


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "agent" / "telemetry.db"  # the folder is created by the spool


def test_sequence_numbers_grow_and_survive_a_reopen(path: Path) -> None:
    s = Spool(path)
    assert s.next_seq == 1
    assert s.append([fixed(10)] * 3, 1.0) == [1, 2, 3]
    assert s.append([fixed(10)], 2.0) == [4]
    assert s.append([], 3.0) == []
    assert s.next_seq == 5
    s.close()

    s = Spool(path)
    assert s.stats().messages == 4
    assert s.stats().bytes == 40
    assert s.append([fixed(10)] * 2, 4.0) == [5, 6]
    # draining everything does not make the numbers start over (not even after a reopen)
    assert s.ack(range(1, 7)) == 6
    s.close()
    s = Spool(path)
    assert s.stats().messages == 0
    assert s.append([fixed(10)], 5.0) == [7]
    s.close()


def test_the_maker_gets_its_own_sequence_number(path: Path) -> None:
    s = Spool(path)
    s.append([fixed(20)] * 5, 1.0)
    for seq, payload in s.oldest(10):
        assert payload.startswith(f"{seq}:".encode())
    s.close()


def test_a_failing_maker_stores_nothing_and_uses_no_number(path: Path) -> None:
    s = Spool(path)
    s.append([fixed(10)], 1.0)

    def broken(seq: int) -> bytes:
        raise RuntimeError("no payload")

    with pytest.raises(RuntimeError):
        s.append([fixed(10), broken], 2.0)
    assert s.stats().messages == 1
    assert s.stats().bytes == 10
    assert [q for q, _ in s.oldest(10)] == [1]
    assert s.append([fixed(10)], 3.0) == [2]  # the rolled-back numbers were never stored anywhere
    s.close()


def test_ack_removes_exactly_the_named_messages(path: Path) -> None:
    s = Spool(path)
    s.append([fixed(100)] * 10, 1.0)
    assert s.ack([2, 5, 9]) == 3
    assert [q for q, _ in s.oldest(100)] == [1, 3, 4, 6, 7, 8, 10]
    assert s.stats().messages == 7
    assert s.stats().bytes == 700
    assert s.ack([2, 5]) == 0  # already gone: nothing more removed
    assert s.ack([3, 3, 3, 42]) == 1  # duplicates and unknown numbers count once / not at all
    assert s.ack([]) == 0
    assert s.stats().messages == 6
    assert s.stats().bytes == 600
    s.close()
    s = Spool(path)  # the counters are read back from the file
    assert s.stats().messages == 6
    assert s.stats().bytes == 600
    assert [q for q, _ in s.oldest(100)] == [1, 4, 6, 7, 8, 10]
    s.close()


def test_ack_of_more_than_one_chunk_of_numbers(path: Path) -> None:
    s = Spool(path)
    s.append([fixed(8)] * 1500, 1.0)
    assert s.ack(range(1, 1500, 2)) == 750  # the odd ones, in three SQL chunks
    left = [q for q, _ in s.oldest(2000)]
    assert left == list(range(2, 1501, 2))
    assert s.stats().messages == 750
    assert s.stats().bytes == 750 * 8
    s.close()


def test_oldest_after_pages_in_order(path: Path) -> None:
    s = Spool(path)
    s.append([fixed(10)] * 10, 1.0)
    s.ack([4])
    assert [q for q, _ in s.oldest(3)] == [1, 2, 3]
    assert [q for q, _ in s.oldest(3, after=3)] == [5, 6, 7]
    assert [q for q, _ in s.oldest(3, after=7)] == [8, 9, 10]
    assert s.oldest(3, after=10) == []
    assert [q for q, _ in s.oldest(100, after=0)] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert all(isinstance(b, bytes) for _, b in s.oldest(100))
    s.close()


def test_the_bound_drops_the_oldest_and_counts_them(path: Path) -> None:
    s = Spool(path, max_bytes=1024)
    for i in range(10):  # 200 bytes each: five fit in 1024
        assert s.append([fixed(200)], float(i)) == [i + 1]
    st = s.stats()
    assert st.messages == 5
    assert st.bytes == 1000
    assert st.dropped == 5
    assert [q for q, _ in s.oldest(100)] == [6, 7, 8, 9, 10]
    s.close()

    s = Spool(path, max_bytes=1024)  # the count of dropped messages is kept in the file
    st = s.stats()
    assert (st.messages, st.bytes, st.dropped) == (5, 1000, 5)
    s.append([fixed(200)] * 3, 11.0)
    st = s.stats()
    assert (st.messages, st.bytes, st.dropped) == (5, 1000, 8)
    assert [q for q, _ in s.oldest(100)] == [9, 10, 11, 12, 13]
    s.close()


def test_the_bound_in_one_big_append_keeps_the_newest(path: Path) -> None:
    s = Spool(path, max_bytes=1024)
    seqs = s.append([fixed(10)] * 600, 1.0)  # 6000 bytes in one transaction: more than 256 to drop
    assert seqs == list(range(1, 601))  # numbers are given to every message, dropped or not
    st = s.stats()
    assert st.messages == 102  # 102 * 10 = 1020 <= 1024
    assert st.bytes == 1020
    assert st.dropped == 498
    assert [q for q, _ in s.oldest(1000)] == list(range(499, 601))
    s.close()
    s = Spool(path, max_bytes=1024)
    assert s.stats().messages == 102 and s.stats().dropped == 498 and s.stats().bytes == 1020
    s.close()


def test_nothing_is_dropped_up_to_the_bound(path: Path) -> None:
    s = Spool(path, max_bytes=2048)
    s.append([fixed(512)] * 3, 1.0)
    s.append([fixed(512)], 2.0)  # exactly 2048 bytes: at the bound, not past it
    st = s.stats()
    assert (st.messages, st.bytes, st.dropped) == (4, 2048, 0)
    s.ack([1])
    s.append([fixed(512)], 3.0)  # room again: still nothing dropped
    assert s.stats().dropped == 0
    assert [q for q, _ in s.oldest(10)] == [2, 3, 4, 5]
    s.append([lambda seq: b"x"], 4.0)  # one byte past: the oldest goes
    st = s.stats()
    assert st.dropped == 1
    assert [q for q, _ in s.oldest(10)] == [3, 4, 5, 6]
    s.close()


def test_a_bound_under_1024_bytes_is_refused(path: Path) -> None:
    for bad in (0, 1, 1023, -5):
        with pytest.raises(ValueError, match="at least 1024"):
            Spool(path, max_bytes=bad)
    Spool(path, max_bytes=1024).close()


def test_the_file_shrinks_after_draining(path: Path) -> None:
    s = Spool(path, max_bytes=64 << 20)
    chunk = [fixed(4096)] * 100
    peak = 0
    for i in range(10):  # 4 MB of payloads, ten transactions
        s.append(chunk, float(i))
        peak = max(peak, s.stats().file_bytes)
    assert s.stats().messages == 1000
    assert peak > 4_000_000
    # acknowledged in pieces, as the sender does
    for first in range(1, 1001, 100):
        assert s.ack(range(first, first + 100)) == 100
    st = s.stats()
    assert st.messages == 0
    assert st.bytes == 0
    assert st.file_bytes < peak // 10, (st.file_bytes, peak)
    s.close()
    assert path.stat().st_size < peak // 10


def test_kill_9_loses_nothing_that_append_returned(path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from edgekit_runtime.agent.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]))\n"
        "while True:\n"
        "    seqs = s.append([lambda q: b'%d:' % q + b'p' * 300] * 3, time.time())\n"
        "    print(' '.join(map(str, seqs)), flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    printed: list[int] = []
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.endswith("\n"):
                break  # cut by the kill: not a complete report
            with lock:
                printed.extend(int(x) for x in line.split())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(printed) >= 600 or proc.poll() is not None, "the child to append 600 messages")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it is appending as fast as it can
        assert proc.wait(WAIT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        reader.join(WAIT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    with lock:
        acknowledged = list(printed)
    assert len(acknowledged) >= 600
    assert acknowledged == list(range(1, len(acknowledged) + 1))

    s = Spool(path)
    try:
        stored = dict(s.oldest(1_000_000))
        missing = [q for q in acknowledged if q not in stored]
        assert not missing, f"{len(missing)} appended message(s) lost, first {missing[:5]}"
        for q in acknowledged:
            assert stored[q] == b"%d:" % q + b"p" * 300
        # whatever the kill cut short was all or nothing: the numbers held have no gaps
        assert sorted(stored) == list(range(1, len(stored) + 1))
        assert s.stats().messages == len(stored)
        assert s.stats().dropped == 0
        assert s.next_seq == len(stored) + 1
        assert s.append([fixed(10)], 0.0) == [len(stored) + 1]  # numbering carries on, none reused
    finally:
        s.close()
