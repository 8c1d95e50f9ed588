"""Strict HTTP/1.1 request framing (RFC 9112): the request head and the body's extent.

tokenpak sits in front of providers and often behind another proxy. When two HTTP parsers
disagree on where one request ends, the bytes a client sent as one request's body run as the
next request ("request smuggling"). http.server's parser is lenient (it reads headers with
the email package: a bare CR starts a new header, a line that starts with a space continues
the previous one, a duplicate Content-Length is ignored), so tokenpak reads the head itself
and refuses, with 400 and a closed connection, everything RFC 9112 says a server must not
guess at:

- a request line that is not exactly `METHOD SP origin SP HTTP/1.x`;
- a bare CR or a NUL anywhere in the head, obs-fold (a header line starting with SP/HT),
  a header name that is not a token (which includes whitespace before the colon), control
  characters in a value, a missing or repeated Host in HTTP/1.1;
- more than one Content-Length, one that is not plain digits, Content-Length together with
  Transfer-Encoding, a Transfer-Encoding other than exactly `chunked` (or any in HTTP/1.0);
- a chunk size that is not 1-16 hex digits (`-1`, `0x10`, `1_0`, `+5` ...), chunk data not
  followed by CRLF.

A head larger than MAX_HEAD_BYTES, or with more than MAX_FIELDS fields, is 431.
"""

import re

MAX_HEAD_BYTES = 64 * 1024       # all header lines of one request together
MAX_FIELDS = 100                 # as http.client: real clients send 10-30
MAX_CHUNK_LINE = 4096            # a chunk-size line with its extensions
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 token
# name ":" OWS value OWS, the value without controls other than HT (RFC 9110 5.5)
_FIELD = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\Z")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)\Z")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n\x00]*)?\r\n\Z")


class FramingError(Exception):
    """The request cannot be read safely. `status` None: the client went away mid-head
    (nothing to answer); otherwise answer `status` with `message` and close."""

    def __init__(self, status, message=""):
        super().__init__(message)
        self.status = status
        self.message = message


class Headers:
    """The request's fields in arrival order, looked up case-insensitively (the part of
    email.message.Message's interface tokenpak uses: get, get_all, items, in, [])."""

    __slots__ = ("_items", "_index")

    def __init__(self, items=()):
        self._items = []
        self._index = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name, value):
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, failobj=None):
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def items(self):
        return list(self._items)

    def keys(self):
        return [name for name, _ in self._items]

    def __contains__(self, name):
        return name.lower() in self._index

    def __getitem__(self, name):
        return self.get(name)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._items)


def parse_request_line(raw):
    """(method, target, (major, minor)) from the raw request line (bytes, with its EOL)."""
    line = _strip_eol(raw)
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise FramingError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.match(method):
        raise FramingError(400, "invalid HTTP method")
    if any(c <= " " or c >= "\x7f" for c in target):
        raise FramingError(400, "invalid characters in the request target")
    match = _VERSION.match(version)
    if not match:
        raise FramingError(400, "malformed HTTP version")
    number = (int(match.group(1)), int(match.group(2)))
    if number[0] != 1:
        raise FramingError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    return method, target, number


def read_fields(rfile, limit=MAX_HEAD_BYTES):
    """Header (or trailer) lines up to the empty line, as a Headers; raises FramingError."""
    headers = Headers()
    used = 0
    readline, match, add = rfile.readline, _FIELD.match, headers.add
    while True:
        raw = readline(limit - used + 1)
        used += len(raw)
        if used > limit:
            raise FramingError(431, "header section too long (over %d bytes)" % limit)
        if not raw.endswith(b"\n"):
            raise FramingError(None)  # end of stream mid-head
        line = _strip_eol(raw)
        if not line:
            return headers
        if len(headers) >= MAX_FIELDS:
            raise FramingError(431, "too many header fields")
        field = match(line)  # one regex for the common case; _field_error says what is wrong
        if field is None:
            raise _field_error(line)
        add(field.group(1), field.group(2))


def _field_error(line):
    if line[0] in " \t":
        return FramingError(400, "obsolete line folding in the request head")
    name, colon, _ = line.partition(":")
    if not colon or not TOKEN.match(name):
        return FramingError(400, "invalid header field name")
    return FramingError(400, "control character in header field %s" % name)


def _strip_eol(raw):
    """The line without its CRLF (or bare LF, RFC 9112 2.2 allows it); a CR elsewhere is
    an error: some parsers treat it as a line end, which is how headers get hidden."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if b"\r" in raw or b"\x00" in raw:
        raise FramingError(400, "bare CR or NUL in the request head")
    return raw.decode("latin-1")


def check_head(headers, version):
    """Host rules for HTTP/1.1 (RFC 9112 3.2): exactly one Host field."""
    hosts = headers.get_all("Host") or []
    if len(hosts) > 1 or (version >= (1, 1) and not hosts):
        raise FramingError(400, "exactly one Host header is required")


def body_framing(headers, version):
    """How the body is delimited: ("length", n), ("chunked", None) or ("none", 0).
    Raises FramingError for every ambiguous or unsupported combination (RFC 9112 6.3)."""
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings is not None:
        if version < (1, 1):
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths is not None:
            raise FramingError(400, "both Content-Length and Transfer-Encoding are set")
        if ",".join(codings).strip(" \t").lower() != "chunked":
            raise FramingError(400, "unsupported Transfer-Encoding (only chunked is accepted)")
        return ("chunked", None)
    if lengths is None:
        return ("none", 0)
    if len(lengths) != 1 or not lengths[0].isdigit() or not lengths[0].isascii() \
            or len(lengths[0]) > 18:
        raise FramingError(400, "invalid Content-Length header")
    return ("length", int(lengths[0]))


def read_chunked(rfile, limit):
    """The decoded body of a chunked request; trailers are read and dropped. Raises
    FramingError (413 past `limit`, 400 for a malformed chunk, None at end of stream)."""
    parts, total = [], 0
    while True:
        line = rfile.readline(MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_CHUNK_LINE:
                raise FramingError(400, "chunk-size line too long")
            raise FramingError(None)
        match = _CHUNK_LINE.match(line)
        if not match:
            raise FramingError(400, "malformed chunked request body")
        size = int(match.group(1), 16)
        if size == 0:
            read_fields(rfile)  # trailers: checked like headers, not forwarded
            return b"".join(parts)
        total += size
        if total > limit:
            raise FramingError(413, "too large")
        data = rfile.read(size)
        if len(data) < size:
            raise FramingError(None)
        parts.append(data)
        end = rfile.readline(3)
        if end != b"\r\n":
            if not end:
                raise FramingError(None)
            raise FramingError(400, "chunk data not followed by CRLF")
