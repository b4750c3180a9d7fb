"""Reading one file of each kind: text, JSON (lines or one array, streamed), parquet; each
record as a :class:`Document` or, when it cannot be read, a :class:`ReadError`. The rules (which
files, in which order, ids unique) are :mod:`pplfast.corpus.io`'s."""
from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import zlib
from typing import NamedTuple, Optional

from .._optional import require

PARQUET_BATCH = 4096
_READ_BYTES = 1 << 16


class Document(NamedTuple):
    id: str
    text: str
    file: str  # the file's name, as named or found
    line: Optional[int]  # the n of <file>:<n>; None for a text file
    record: Optional[dict]  # the whole input object, when asked for

    @property
    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


class ReadError(NamedTuple):
    """A record that cannot be read: the one-line ``message``, and its parts for ``--errors``."""
    file: str
    line: Optional[int]
    reason: str
    message: str
    rest_unread: bool  # the file broke off here: its remaining records are not read

    def as_row(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason,
                "rest_unread": self.rest_unread}


def record_error(name, line, reason) -> ReadError:
    return ReadError(name, line, reason, f"{name}:{line}: {reason}", False)


def file_error(name, line, reason) -> ReadError:
    return ReadError(name, line, reason, f"cannot read {name!r}: {reason}", True)


class Broken(Exception):
    """Raised inside a reader when the rest of a file cannot be read."""

    def __init__(self, error: ReadError):
        self.error = error


def _id_of(record: dict, id_field: str) -> Optional[str]:
    value = record.get(id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def record_document(record, name, line, text_field, id_field, keep_record):
    if not isinstance(record, dict):
        return record_error(name, line, "not a JSON object")
    text = record.get(text_field)
    if text is None and text_field in record:
        text = ""  # a null text is an empty document
    if not isinstance(text, str):
        return record_error(name, line, f"no string field {text_field!r}")
    if id_field:
        doc_id = _id_of(record, id_field)
        if doc_id is None:
            return record_error(name, line, f"no string or integer field {id_field!r}")
    else:
        doc_id = f"{name}:{line}"
    return Document(doc_id, text, name, line, record if keep_record else None)


@contextlib.contextmanager
def open_content(path: str):
    """A binary stream of the file's content, gunzipped when it starts with gzip's magic."""
    raw = open(path, "rb")
    try:
        if raw.peek(2)[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        else:
            yield raw
    finally:
        raw.close()


READ_ERRORS = (OSError, EOFError, zlib.error)


def read_txt(path, name, text_field, keep_record):
    try:
        with open_content(path) as f:
            data = f.read()
    except READ_ERRORS as exc:
        return file_error(name, None, str(exc))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return file_error(name, data.count(b"\n", 0, exc.start) + 1, str(exc))
    return Document(name, text, name, None, {text_field: text} if keep_record else None)


def json_records(path, name):
    """``(n, object or ReadError)`` of a JSON file, lines or one array; :class:`Broken` when the
    rest of the file cannot be read."""
    lineno = 0
    try:
        with open_content(path) as f:
            for raw in f:
                lineno += 1
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if raw.isspace() or not raw:
                    continue
                if raw.lstrip().startswith(b"["):  # the first record is an array: the file is one
                    yield from _ArrayReader(raw, f, name, lineno).items()
                    return
                yield lineno, _json_line(raw, name, lineno)
                for raw in f:
                    lineno += 1
                    if not raw.isspace():  # a blank line is no record (but counts as a line)
                        yield lineno, _json_line(raw, name, lineno)
    except READ_ERRORS as exc:
        raise Broken(file_error(name, lineno + 1, str(exc))) from None


def _json_line(raw: bytes, name, lineno):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return record_error(name, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start} "
                                           "of the line)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return record_error(name, lineno, f"not valid JSON ({exc.msg})")


class _ArrayReader:
    """The elements of one JSON array, streamed: ``raw_decode`` over a sliding text buffer."""

    _SPACE = " \t\r\n"

    def __init__(self, first: bytes, stream, name, lineno):
        self.stream, self.name = stream, name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.line0, self.column0 = lineno, 0  # where buf[0] lies in the file (column from 0)
        self.count = 0  # elements read
        self._add(first)

    def _add(self, data: bytes, final=False):
        try:
            self.buf += self.decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            raise Broken(file_error(self.name, self.count + 1, f"not valid UTF-8 ({exc.reason}, "
                                      f"line {self.where(len(self.buf))[0]})")) from None

    def where(self, pos):
        """(line, column) of ``buf[pos]``, both from 1."""
        newlines = self.buf.count("\n", 0, pos)
        if newlines == 0:
            return self.line0, self.column0 + pos + 1
        return self.line0 + newlines, pos - self.buf.rfind("\n", 0, pos)

    def more(self) -> bool:
        """Read on (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        self.line0, column = self.where(self.pos)
        self.column0 = column - 1
        self.buf, self.pos = self.buf[self.pos:], 0
        data = self.stream.read(max(_READ_BYTES, len(self.buf)))  # doubling: amortised reads
        self.eof = not data
        self._add(data, final=self.eof)
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in self._SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def error(self, msg, pos=None):
        line, column = self.where(self.pos if pos is None else pos)
        reason = f"not valid JSON ({msg}: line {line} column {column})"
        n = self.count + 1
        raise Broken(ReadError(self.name, n, reason, f"{self.name}:{n}: {reason}", True))

    _parse = json.JSONDecoder().raw_decode

    def value(self):
        while True:
            try:
                value, end = self._parse(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.more():
                    continue  # perhaps cut by the buffer's end
                self.error(exc.msg, exc.pos)
            if end == len(self.buf) and self.more():
                continue  # a number may go on past the buffer
            self.pos = end
            self.count += 1
            return value

    def items(self):
        """``(n, element)`` in order; :class:`Broken` at a syntax error."""
        self.peek()
        self.pos += 1  # the "["
        if self.peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self.count + 1, self.value()
                c = self.peek()
                self.pos += 1
                if c == "]":
                    break
                if c != ",":
                    self.pos -= 1
                    self.error("Expecting ',' delimiter" if c else "the array is not closed")
                if self.peek() == "]":
                    self.error("Illegal trailing comma before end of array")
        if self.peek():
            self.error("Extra data after the array")


def parquet_records(path, name, columns):
    pq = require("pyarrow.parquet", extra="parquet", feature="reading .parquet files")
    row = 0
    try:
        pfile = pq.ParquetFile(path)
        if columns is not None:
            names = set(pfile.schema_arrow.names)
            columns = [c for c in columns if c in names]
        for batch in pfile.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise Broken(file_error(name, row + 1, str(exc).splitlines()[0])) from None

