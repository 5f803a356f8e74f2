"""HPACK coders that remember: a header block decoded before, or a header list encoded before,
is answered from a small table while the HPACK dynamic table has not changed since.

Why: a client repeats its requests' header blocks byte for byte once their fields are indexed
(h2load, browsers, gRPC stubs: every field an index into the dynamic table), and an origin
repeats its response heads (nginx's change with its one-second ``Date``). The ``hpack``
package decodes and encodes such a block field by field in Python, with a linear search of
the table per field on the encoding side: about a third of what the h2 library spends on a
stream (``tests/bench/h2_floor.py``).

Why it is exact: what a block decodes to depends on its bytes, the dynamic table's entries
and size, and the decoder's two limits; what a header list encodes to depends on the list
(with its field types: a ``NeverIndexedHeaderTuple`` encodes differently from an equal plain
tuple), the table and the Huffman switch. The table here counts every change made to it (an
entry added, its size set), and an answer is kept only when producing it changed nothing, so
it is given again only while the count, and so the table, is the same: a block or list that
adds to the table is decoded or encoded each time, as before.

Used by ``protocols/h2_wire.py`` (the downstream server) directly, and by the upstream client
through h2's own attributes: ``H2Connection.decoder`` and ``.encoder`` are replaced right after
the connection is made (``install``). Each table is per connection, as HPACK
state is, and small (:data:`KEEP` entries, emptied when full, each of at most
:data:`KEEP_BYTES` encoded, :data:`KEEP_FIELDS` fields and :data:`KEEP_DECODED` bytes of
names and values), so an idle connection holds nothing and a busy one at most ~130 KiB more
(a few KiB for a client that repeats a few requests).
"""
from __future__ import annotations

from typing import Any, Iterable

from hpack import Decoder, Encoder
from hpack.table import HeaderTable

__all__ = ["CountedTable", "CachingDecoder", "CachingEncoder", "install", "KEEP", "KEEP_BYTES",
           "KEEP_FIELDS", "KEEP_DECODED"]

KEEP = 16
KEEP_BYTES = 1024     # an encoded block kept is at most this long ...
KEEP_FIELDS = 64      # ... of at most this many fields ...
KEEP_DECODED = 4096   # ... of at most this many bytes of names and values


class CountedTable(HeaderTable):
    """hpack's table, counting its changes (``changes``): an entry added, the size set."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property  # type: ignore[override]
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.changes += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class CachingDecoder(Decoder):
    """``hpack.Decoder`` that answers a raw decode of a block seen before from its table."""

    def __init__(self, max_header_list_size: int = 65536) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.header_table: CountedTable = CountedTable()
        self.max_allowed_table_size = self.header_table.maxsize
        self._seen: dict[bytes, tuple[tuple[int, int, int], tuple]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Any:
        if not raw or type(data) is not bytes or len(data) > KEEP_BYTES:
            return super().decode(data, raw)
        table = self.header_table
        stamp = (table.changes, self.max_header_list_size, self.max_allowed_table_size)
        hit = self._seen.get(data)
        if hit is not None and hit[0] == stamp:
            return list(hit[1])
        headers = super().decode(data, raw=True)
        # (an error above keeps nothing; a small block may stand for up to the header list
        # limit of fields: what is kept is bounded by its decoded size too)
        if table.changes == stamp[0] and len(headers) <= KEEP_FIELDS \
                and sum(len(n) + len(v) for n, v in headers) <= KEEP_DECODED:
            seen = self._seen
            if len(seen) >= KEEP:
                seen.clear()
            seen[data] = (stamp, tuple(headers))
        return headers


class CachingEncoder(Encoder):
    """``hpack.Encoder`` that answers a list of plain two-tuples seen before from its table."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table: CountedTable = CountedTable()
        self._seen: dict[tuple, tuple[int, bytes]] = {}

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        if type(headers) is not list or not huffman:
            return super().encode(headers, huffman)
        for field in headers:
            # Subclasses (NeverIndexedHeaderTuple) compare equal to plain tuples but encode
            # differently; three-tuples carry a flag; str fields are encoded as UTF-8 first.
            if type(field) is not tuple or len(field) != 2 or type(field[0]) is not bytes \
                    or type(field[1]) is not bytes:
                return super().encode(headers, huffman)
        table = self.header_table
        if table.resized:  # a size update to announce goes first, once: no answer to keep
            return super().encode(headers, huffman)
        key = tuple(headers)
        changes = table.changes
        hit = self._seen.get(key)
        if hit is not None and hit[0] == changes:
            return hit[1]
        block = super().encode(headers, huffman)
        if table.changes == changes and len(block) <= KEEP_BYTES \
                and len(headers) <= KEEP_FIELDS \
                and sum(len(n) + len(v) for n, v in headers) <= KEEP_DECODED:
            seen = self._seen
            if len(seen) >= KEEP:
                seen.clear()
            seen[key] = (changes, block)
        return block


def install(conn: Any) -> None:
    """Give a fresh ``h2.connection.H2Connection`` the caching coders (before any frame)."""
    decoder = CachingDecoder(conn.decoder.max_header_list_size)
    conn.decoder = decoder
    conn.encoder = CachingEncoder()
