"""HTTP header containers: the raw ``Headers`` list and Pingora-style request/response heads.

A leaf module (standard library only). ``Headers`` is what the sans-IO parsers build for every
message, so it is shaped for the request path: two parallel lists (the items as received and
their lowercased names) kept in step, lookups by ``list.index`` (C speed on the small lists real
headers are), no dict rebuilt per request. Names and values are ``bytes``; every method also
accepts ``str``, encoded latin-1, because users of ProxyHttp write Python strings.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Union

NameT = Union[bytes, str]
ValueT = Union[bytes, str, int]

__all__ = ["Headers", "RequestHeader", "ResponseHeader"]


def _b(value: ValueT) -> bytes:
    """Coerce a user-supplied name or value to bytes (str -> latin-1, int -> decimal)."""
    if value.__class__ is bytes:
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return bytes(value)  # bytearray / memoryview


def _check_value(value: bytes) -> bytes:
    """Refuse CR, LF and NUL in a value set by user code: they would split the header on the wire."""
    if b"\r" in value or b"\n" in value or b"\0" in value:
        raise ValueError(f"invalid header value {value!r}: CR, LF and NUL are not allowed")
    return value


def _check_name(name: bytes) -> bytes:
    """Refuse an empty name or one with separators/whitespace/controls (set by user code)."""
    if not name or name.translate(None, _TOKEN_CHARS):
        raise ValueError(f"invalid header name {name!r}")
    return name


# What a request-target set by user code may contain (as latin-1 bytes): visible ASCII and
# obs-text; a space, CR, LF or other control byte would end the request line's token.
_TARGET_CHARS = bytes(range(0x21, 0x7f)) + bytes(range(0x80, 0x100))

# RFC 9110 tchar: what a field name may contain. translate(None, delete) leaves the bad bytes.
_TOKEN_CHARS = (b"!#$%&'*+-.^_`|~0123456789"
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


_JOIN_FIELD = b": ".join  # (name, value) -> b"name: value"


class Headers:
    """An ordered multi-map of header fields: case-preserving, case-insensitive lookup.

    Iteration yields ``(name, value)`` tuples of bytes in the order received or added.
    Values given by user code are checked for CR/LF/NUL (ValueError); values that come from
    the parsers were already checked there and go in through ``_from_parser`` unchecked.
    """

    __slots__ = ("_items", "_keys")

    def __init__(self, items: Iterable[tuple[ValueT, ValueT]] = ()) -> None:
        self._items: list[tuple[bytes, bytes]] = []
        self._keys: list[bytes] = []
        for name, value in items:
            self.add(name, value)

    @classmethod
    def _from_parser(cls, items: list[tuple[bytes, bytes]], keys: list[bytes]) -> "Headers":
        """Adopt lists the parser already built and validated (no copy, no checks)."""
        h = cls.__new__(cls)
        h._items = items
        h._keys = keys
        return h

    # -- lookups -------------------------------------------------------------------------
    def get(self, name: NameT, default: Optional[bytes] = None) -> Optional[bytes]:
        """Return the first value of ``name`` (any case), or ``default`` when absent."""
        key = _b(name).lower()
        try:
            return self._items[self._keys.index(key)][1]
        except ValueError:
            return default

    def get_all(self, name: NameT) -> list[bytes]:
        """Return every value of ``name`` in order (an empty list when absent)."""
        key = _b(name).lower()
        if key not in self._keys:
            return []
        items = self._items
        return [items[i][1] for i, k in enumerate(self._keys) if k == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (bytes, str)):
            return False
        return _b(name).lower() in self._keys

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def items(self) -> list[tuple[bytes, bytes]]:
        """A new list of the ``(name, value)`` pairs, in order."""
        return list(self._items)

    def keys(self) -> list[bytes]:
        """The names as sent (case preserved), in order, duplicates included."""
        return [n for n, _ in self._items]

    def copy(self) -> "Headers":
        """An independent copy (the tuples are immutable, so a shallow list copy suffices)."""
        return Headers._from_parser(list(self._items), list(self._keys))

    # -- edits ---------------------------------------------------------------------------
    def set(self, name: NameT, value: ValueT) -> None:
        """Replace every value of ``name`` with one ``value``, kept at the first one's place."""
        bname = _check_name(_b(name))
        bvalue = _check_value(_b(value))
        key = bname.lower()
        keys = self._keys
        try:
            first = keys.index(key)
        except ValueError:
            self._items.append((bname, bvalue))
            keys.append(key)
            return
        self._items[first] = (bname, bvalue)
        if keys.count(key) > 1:
            self._drop(key, start=first + 1)

    insert_header = set

    def add(self, name: NameT, value: ValueT) -> None:
        """Append one more ``name: value`` field after the existing ones."""
        bname = _check_name(_b(name))
        self._items.append((bname, _check_value(_b(value))))
        self._keys.append(bname.lower())

    append_header = add

    def remove(self, name: NameT) -> int:
        """Remove every field called ``name``; return how many were removed."""
        key = _b(name).lower()
        if key not in self._keys:
            return 0
        return self._drop(key, 0)

    remove_header = remove

    def remove_names(self, lowered: "set[bytes] | frozenset[bytes]") -> int:
        """Remove every field whose lowercased name is in ``lowered``, in one pass; return the count."""
        keys = self._keys
        if lowered.isdisjoint(keys):
            return 0
        # In place, from the end (indices stay valid): cheaper than building two new lists,
        # and the lists are this object's own (copy() and the parsers give fresh ones).
        items = self._items
        removed = 0
        for i in range(len(keys) - 1, -1, -1):
            if keys[i] in lowered:
                del keys[i]
                del items[i]
                removed += 1
        return removed

    def _drop(self, key: bytes, start: int) -> int:
        """Remove the fields whose lowercased name is ``key`` at or after index ``start``."""
        items, keys = self._items, self._keys
        keep_items = items[:start]
        keep_keys = keys[:start]
        removed = 0
        for i in range(start, len(keys)):
            if keys[i] == key:
                removed += 1
            else:
                keep_items.append(items[i])
                keep_keys.append(keys[i])
        self._items = keep_items
        self._keys = keep_keys
        return removed

    def serialize(self) -> bytes:
        """Wire form: ``b"Name: value\\r\\n"`` per field, without the blank line that ends a head."""
        if not self._items:
            return b""
        return b"\r\n".join(map(_JOIN_FIELD, self._items)) + b"\r\n"  # no Python-level loop


def _version_str(version: Union[str, bytes]) -> str:
    return version.decode("ascii") if isinstance(version, bytes) else version


def _as_headers(headers: Optional[Union[Headers, Mapping[ValueT, ValueT],
                                        Iterable[tuple[ValueT, ValueT]]]]) -> Headers:
    """``headers`` as a Headers: itself, or a new one from (name, value) pairs or a mapping
    (iterating a dict gives its names alone: two-letter names would unpack as pairs)."""
    if headers is None:
        return Headers()
    if isinstance(headers, Headers):
        return headers
    if isinstance(headers, Mapping):
        return Headers(headers.items())
    return Headers(headers)


class _Head:
    """What request and response heads share: their ``headers`` and Pingora's field methods."""

    __slots__ = ("headers",)

    headers: Headers

    def insert_header(self, name: NameT, value: ValueT) -> None:
        """Set ``name`` to ``value``, replacing any existing values."""
        self.headers.set(name, value)

    def append_header(self, name: NameT, value: ValueT) -> None:
        """Add one more ``name: value`` field."""
        self.headers.add(name, value)

    def remove_header(self, name: NameT) -> int:
        """Remove every ``name`` field; return how many there were."""
        return self.headers.remove(name)

    def get(self, name: NameT, default: Optional[bytes] = None) -> Optional[bytes]:
        """First value of ``name`` as bytes, or ``default``."""
        return self.headers.get(name, default)


class RequestHeader(_Head):
    """A request head as ProxyHttp phases see it (Pingora's ``RequestHeader``).

    ``method`` and ``uri`` (the request-target) are ``str``; ``version`` is "1.0", "1.1" or
    "2"; ``headers`` is a :class:`Headers`. Phases edit it in place; the engine serialises it.
    ``method`` and ``uri`` are checked whenever user code sets them (assigned, passed to the
    constructor, ``set_method`` / ``set_uri``): ValueError for a value that would not stay one
    token on the request line (a space, CR or LF there would let a phase write a second
    request on the upstream connection: request smuggling).
    """

    __slots__ = ("_method", "_uri", "version")

    def __init__(self, method: str, uri: str, version: Union[str, bytes] = "1.1",
                 headers: Optional[Union[Headers, Iterable[tuple[ValueT, ValueT]]]] = None) -> None:
        self.method = method  # (checked: the property setters below)
        self.uri = uri
        self.version = _version_str(version)
        self.headers = _as_headers(headers)

    @classmethod
    def _trusted(cls, method: str, uri: str, version: Union[str, bytes],
                 headers: Headers) -> "RequestHeader":
        """A head from what a parser already validated (the engine's, once per request):
        no checks, no copies."""
        req = cls.__new__(cls)
        req._method = method
        req._uri = uri
        req.version = _version_str(version)
        req.headers = headers
        return req

    @property
    def method(self) -> str:
        """The request method (an RFC 9110 token)."""
        return self._method

    @method.setter
    def method(self, method: str) -> None:
        if (method.__class__ is not str or not method or not method.isascii()
                or method.encode().translate(None, _TOKEN_CHARS)):
            raise ValueError(f"invalid method {method!r}: not an RFC 9110 token")
        self._method = method

    @property
    def uri(self) -> str:
        """The request-target sent upstream (path and query, usually)."""
        return self._uri

    @uri.setter
    def uri(self, uri: str) -> None:
        try:
            bad = uri.__class__ is not str or not uri or bool(
                uri.encode("latin-1").translate(None, _TARGET_CHARS))
        except UnicodeEncodeError:
            bad = True
        if bad:
            raise ValueError(f"invalid request target {uri!r}: empty, or a space, a control "
                             "character or one above U+00FF (percent-encode it)")
        self._uri = uri

    def set_uri(self, uri: str) -> None:
        """Replace the request-target (path and query, usually) sent upstream. ValueError for
        one that would not stay one token on the request line (empty, a space, CR, LF or
        another control character)."""
        self.uri = uri

    def set_method(self, method: str) -> None:
        """Replace the method sent upstream. ValueError unless it is an RFC 9110 token."""
        self.method = method

    @property
    def path(self) -> str:
        """The request-target without its query string."""
        i = self._uri.find("?")
        return self._uri if i < 0 else self._uri[:i]

    def __repr__(self) -> str:
        return f"RequestHeader({self._method!r}, {self._uri!r}, {self.version!r}, {self.headers!r})"


class ResponseHeader(_Head):
    """A response head as ProxyHttp phases see it (Pingora's ``ResponseHeader``)."""

    __slots__ = ("status", "reason", "version")

    def __init__(self, status: int, reason: Optional[str] = None, version: Union[str, bytes] = "1.1",
                 headers: Optional[Union[Headers, Iterable[tuple[ValueT, ValueT]]]] = None) -> None:
        self.status = status
        self.reason = reason
        self.version = _version_str(version)
        self.headers = _as_headers(headers)

    @classmethod
    def build(cls, status: int,
              headers: Optional[Iterable[tuple[ValueT, ValueT]]] = None) -> "ResponseHeader":
        """A new response head with ``status``, the default reason phrase, and ``headers``."""
        return cls(status, None, "1.1", headers)

    def set_status(self, status: int) -> None:
        """Change the status; the reason phrase goes back to the default for it."""
        if not 100 <= int(status) <= 999:
            raise ValueError(f"invalid status {status!r}")
        self.status = int(status)
        self.reason = None

    def __repr__(self) -> str:
        return f"ResponseHeader({self.status!r}, {self.reason!r}, {self.version!r}, {self.headers!r})"
