"""Fuzzing the codec and the dispatcher: every input gets a reply or a counted drop.

The normal run checks a few hundred cases; ``-m slow`` runs 100k+ (the dedicated
run: ``pytest tests/unit/test_ulog_fuzz.py -m slow``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrepl.dirtylog import MemoryStorage, open_dirty_log, parse_dirty_log_args
from ulogd import protocol as p
from ulogd.server import Dispatcher

UUIDS = [b"FUZZ-A", b"FUZZ-B", b"", b"x" * 128]
LUIDS = [0, 1, 2, 0xFFFFFFFFFFFFFFFF]


def safe_factory(type_name: str, args: Sequence[str], target_sectors: int) -> Any:
    """Real logs, but disk logs on memory: fuzzed CTRs must never open host devices."""
    cfg = parse_dirty_log_args(type_name, args, target_sectors)
    if target_sectors > 1 << 24:
        raise p.ReplyTooLarge("fuzz: target too large for a memory log")
    storage = MemoryStorage(1 << 20) if cfg.type_name == "disk" else None
    return open_dirty_log(type_name, args, target_sectors, storage=storage)


def check(dispatcher: Dispatcher, datagrams: list[bytes]) -> None:
    expected = sum(1 for d in datagrams for e in p.decode_datagram(d)
                   if isinstance(e, p.Request))
    replies = dispatcher.handle_batch(datagrams)
    assert len(replies) == expected
    for r in replies:
        reply = p.decode_reply(r)
        assert len(reply.data) <= max(p.REPLY_CAPACITY.values())
        assert reply.error <= 0
        assert len(r) % 4 == 0


ctr_args = st.one_of(
    st.text(alphabet="0123456789 abcdeklorsuyn-/:", max_size=60),
    st.builds(lambda n, t, r, s: f"{n} {t} {r}{s}",
              st.integers(0, 1 << 20), st.sampled_from(["core", "clustered-core", "disk",
                                                         "clustered-disk mem", "bogus"]),
              st.sampled_from(["2", "3", "64", "1024", "0", "-1", "x"]),
              st.sampled_from(["", " sync", " nosync", " bad", " 1 2"])),
)


@st.composite
def requests(draw: Any) -> bytes:
    rtype = draw(st.one_of(st.integers(1, 17), st.integers(0, 0xFFFFFFFF)))
    if rtype == p.RequestType.CTR:
        payload = draw(ctr_args).encode() + draw(st.sampled_from([b"", b"\0"]))
    elif draw(st.booleans()):
        n = draw(st.integers(0, 40))
        payload = struct.pack(f"={n}Q", *draw(st.lists(
            st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1)), min_size=n, max_size=n)))
    else:
        payload = draw(st.binary(max_size=400))
    data = p.encode_request(draw(st.integers(0, 0xFFFFFFFF)), draw(st.sampled_from(LUIDS)),
                            draw(st.sampled_from(UUIDS)), rtype, payload,
                            draw(st.integers(0, 5)))
    mutation = draw(st.integers(0, 9))
    if mutation == 0:  # truncate
        data = data[:draw(st.integers(0, len(data)))]
    elif mutation == 1:  # corrupt a byte
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif mutation == 2:  # trailing junk
        data += draw(st.binary(max_size=64))
    return data


def run_fuzz(max_examples: int) -> None:
    dispatcher = Dispatcher(safe_factory)

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(requests(), st.binary(max_size=300)), min_size=1, max_size=6))
    def body(datagrams: list[bytes]) -> None:
        check(dispatcher, datagrams)

    logging.disable(logging.CRITICAL)  # every bad request logs a warning: too slow at 100k
    try:
        body()
    finally:
        logging.disable(logging.NOTSET)
    # a bounded number of logs may remain; the dispatcher still answers
    dispatcher.close_all()


def test_fuzz_dispatcher_short() -> None:
    run_fuzz(400)


@pytest.mark.slow
def test_fuzz_dispatcher_100k() -> None:
    run_fuzz(100_000)


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises(data: bytes) -> None:
    for ev in p.decode_datagram(data):
        assert isinstance(ev, p.Request | p.Dropped)


def test_lifecycle_sequences_keep_invariants() -> None:
    """Random sequences of valid requests against one log: sync_count stays in bounds."""
    dispatcher = Dispatcher(safe_factory)
    u = b"SEQ"
    dispatcher.handle_batch([p.encode_request(0, 1, u, p.RequestType.CTR, b"4096 core 64")])
    dispatcher.handle_batch([p.encode_request(1, 1, u, p.RequestType.RESUME)])

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.tuples(st.sampled_from([8, 9, 10, 11, 12, 13, 14, 17]),
                              st.integers(0, 70), st.booleans()), max_size=30))
    def body(ops: list[tuple[int, int, bool]]) -> None:
        batch = []
        for i, (rtype, region, flag) in enumerate(ops):
            if rtype in (9, 10, 11):
                payload = p.encode_u64(region)
            elif rtype == 13:
                payload = struct.pack("=Qq", region, int(flag))
            elif rtype in (8, 17):
                payload = p.encode_u64(region)
            else:
                payload = b""
            batch.append(p.encode_request(i, 1, u, rtype, payload))
        replies = [p.decode_reply(r) for r in dispatcher.handle_batch(batch)]
        assert len(replies) == len(batch)
        count = p.decode_reply(dispatcher.handle_batch(
            [p.encode_request(0, 1, u, p.RequestType.GET_SYNC_COUNT)])[0])
        assert 0 <= struct.unpack("=Q", count.data)[0] <= 64

    body()


def test_fast_path_replies_equal_typed_path() -> None:
    """The in-place hot path answers byte for byte like the typed path, or declines
    (returns -1) and leaves the datagram untouched."""
    fast, typed = Dispatcher(safe_factory), Dispatcher(safe_factory, fast_path=False)
    u = b"EQ"
    setup = [p.encode_request(0, 1, u, p.RequestType.CTR, b"4096 core 64"),
             p.encode_request(1, 1, u, p.RequestType.RESUME)]
    assert fast.handle_batch(setup) == typed.handle_batch(setup)
    taken = declined = 0

    def answer(dispatcher: Dispatcher, dgram: bytes) -> list[bytes]:
        nonlocal taken, declined
        buf = bytearray(dgram) + bytearray(64)  # room, as the serving loop's buffer has
        n = dispatcher.handle_into(buf, len(dgram), 0)
        if n < 0:
            declined += 1
            assert buf[:len(dgram)] == dgram
            return dispatcher.handle_batch([dgram])
        taken += 1
        return [bytes(buf[:n])]

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.tuples(st.sampled_from([8, 9, 10, 11, 17, 13, 12, 99]),
                              st.lists(st.integers(0, 70), max_size=4),
                              st.sampled_from([1, 2]), st.booleans()), max_size=12))
    def body(ops: list[tuple[int, list[int], int, bool]]) -> None:
        for i, (rtype, regions, luid, raw) in enumerate(ops):
            if rtype in (8, 17, 13) and not raw:
                payload = struct.pack("=Qq", regions[0] if regions else 0, 1)[
                    :16 if rtype == 13 else 8]
            else:
                payload = struct.pack(f"={len(regions)}Q", *regions)
            dgram = p.encode_request(i, luid, u, rtype, payload)
            assert answer(fast, dgram) == typed.handle_batch([dgram])
            assert fast.requests == typed.requests and fast.errors == typed.errors

    body()
    assert taken > 100 and declined > 100  # both paths were exercised
    a, b = fast.logs[(u, 1)], typed.logs[(u, 1)]
    assert a.counts == b.counts and a.lat_n == b.lat_n
