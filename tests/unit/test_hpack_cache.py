"""The caching HPACK coders (``protocols/hpack_cache.py``) against hpack's own, byte for byte.

Each test runs the same sequence through a caching coder and a plain one (or decodes with
both what a plain encoder produced): any answer given from the cache after the dynamic
table changed, or for a field of another type, shows up as a difference.
"""
from __future__ import annotations

import os

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple, OversizedHeaderListError
from hypothesis import given, settings
from hypothesis import strategies as st

from pyngora.protocols.hpack_cache import KEEP, CachingDecoder, CachingEncoder

# A small alphabet, so that lists repeat and the table's entries are found again.
FIELD = st.tuples(st.sampled_from([b"x-a", b"x-b", b"server", b"date", b"content-type"]),
                  st.sampled_from([b"1", b"22", b"text/plain", b"a" * 40]))
STEP = st.one_of(st.lists(FIELD, min_size=1, max_size=5),
                 st.sampled_from([0, 64, 120, 4096]))  # a table size change


def test_a_repeated_block_is_answered_from_the_cache() -> None:
    enc, dec = Encoder(), CachingDecoder()
    first = enc.encode([(b"x-a", b"1")])   # literal, indexed: changes the table
    again = enc.encode([(b"x-a", b"1")])   # an index into the dynamic table
    assert dec.decode(first, raw=True) == [(b"x-a", b"1")]
    assert dec.decode(again, raw=True) == [(b"x-a", b"1")]
    assert again in dec._seen and first not in dec._seen


def test_a_cached_block_is_decoded_again_after_the_table_changed() -> None:
    """b"\\xbe" (index 62, the newest entry) names x-a: 1, then y: 2 once y was added."""
    enc, plain, caching = Encoder(), Decoder(), CachingDecoder()
    blocks = [enc.encode([(b"x-a", b"1")]), enc.encode([(b"x-a", b"1")]),
              enc.encode([(b"y", b"2")])]
    blocks.append(blocks[1])
    assert blocks[1] == b"\xbe"
    got = [caching.decode(b, raw=True) for b in blocks]
    assert got == [plain.decode(b, raw=True) for b in blocks]
    assert got[3] == [(b"y", b"2")]


def test_a_lower_header_list_limit_applies_to_a_cached_block() -> None:
    enc, dec = Encoder(), CachingDecoder()
    dec.decode(enc.encode([(b"x-a", b"a" * 100)]), raw=True)
    block = enc.encode([(b"x-a", b"a" * 100)])
    assert dec.decode(block, raw=True) == [(b"x-a", b"a" * 100)]
    dec.max_header_list_size = 50
    with pytest.raises(OversizedHeaderListError):
        dec.decode(block, raw=True)


def test_never_indexed_fields_encode_as_hpack_encodes_them() -> None:
    """A never-indexed field equal to a cached plain one, and one not in the table."""
    plain, caching = Encoder(), CachingEncoder()
    seq = [[(b"cookie", b"secret")], [(b"cookie", b"secret")],
           [NeverIndexedHeaderTuple(b"cookie", b"secret")],
           [NeverIndexedHeaderTuple(b"cookie", b"other")],
           [NeverIndexedHeaderTuple(b"cookie", b"other")]]
    assert [caching.encode(x) for x in seq] == [plain.encode(x) for x in seq]


def test_a_table_size_update_is_sent_once() -> None:
    """A list encoded right after a size change carries the update; a repeat must not."""
    plain, caching = Encoder(), CachingEncoder()
    seq: list = [[(b"x-b", b"1")], 64, [(b"x-b", b"1")], [(b"x-b", b"1")]]
    out = []
    for step in seq:
        if isinstance(step, int):
            plain.header_table_size = caching.header_table_size = step
            continue
        out.append((caching.encode(list(step)), plain.encode(list(step))))
    assert [a for a, _ in out] == [b for _, b in out]
    assert out[2][0] == b"\xbe"


def test_a_small_block_that_decodes_to_much_is_not_kept() -> None:
    """One byte per field (a static index) can stand for many fields: what is kept is bounded
    by the decoded list, not by the block."""
    dec = CachingDecoder()
    many = b"\x82" * 200  # :method GET, 200 times
    assert dec.decode(many, raw=True) == [(b":method", b"GET")] * 200
    dec.decode(Encoder().encode([(b"x-big", b"v" * 3000)]), raw=True)
    twice = b"\xbe\xbe"  # the 3,000-byte entry, twice
    assert dec.decode(twice, raw=True) == [(b"x-big", b"v" * 3000)] * 2
    assert not dec._seen
    caching = CachingEncoder()
    for _ in range(2):
        caching.encode([(b"x-big", b"v" * 3000)] * 2)
    assert not caching._seen


def test_the_caches_stay_small() -> None:
    enc, dec = CachingEncoder(), CachingDecoder()
    for i in range(3 * KEEP):
        fields = [(b"x-a", b"%d" % i)]
        enc.encode(fields)
        dec.decode(Encoder().encode([(b":status", b"200"), (b"x-a", b"%d" % i)]), raw=True)
        enc.encode(fields)
    assert len(enc._seen) <= KEEP and len(dec._seen) <= KEEP


@settings(max_examples=int(os.environ.get("HPACK_EXAMPLES", "1000")), deadline=None,
          derandomize=True, database=None)
@given(st.lists(STEP, min_size=1, max_size=40))
def test_same_bytes_and_fields_as_hpack(steps: list) -> None:
    """Random lists and table size changes (evictions included): the caching encoder writes
    what hpack's writes, and the caching decoder reads it as hpack's reads it."""
    plain_enc, caching_enc = Encoder(), CachingEncoder()
    plain_dec, caching_dec = Decoder(), CachingDecoder()
    for step in steps:
        if isinstance(step, int):
            # (Setting the size it already has makes hpack's own encoder forget a change
            # still to be announced: not a case of this module's.)
            if step != plain_enc.header_table_size:
                plain_enc.header_table_size = caching_enc.header_table_size = step
            continue
        block = plain_enc.encode(list(step))
        assert caching_enc.encode(list(step)) == block
        assert caching_dec.decode(block, raw=True) == plain_dec.decode(block, raw=True) \
            == list(step)
