"""Reading documents and writing output files: the one reader and the one writer of every command.

Reading (``pplfast score``, ``compare``, ``score-corpus``, ``filter`` and the Ray reader):
inputs are named as files, directories (searched recursively for the suffixes below; hidden files
skipped) or glob patterns. The kind of a file follows its name, or ``fmt`` (``--format``):

- JSON (``.jsonl``, ``.json``, ``.ndjson``): one object per line, or one array of objects
  (told apart by the first non-blank character, ``[``), streamed either way;
- text (``.txt``, ``.text``): the whole file is one document;
- each of those optionally gzip-compressed (``.gz``); a gzip file is decompressed whatever its
  name says (its first bytes tell);
- ``.parquet`` (with the ``parquet`` extra), read a batch of rows at a time.

A record is a document when it is an object whose ``text_field`` is a string (null: an empty
document) and, with ``id_field``, whose id is a string or an integer (not a bool, not a float).
A document's default id is ``<file>:<n>`` with ``<file>`` the path as named or found and ``n``
counted from 1: the line of a JSON-lines file (blank lines are counted, not read), the element
of a JSON array, the row of a parquet file; a text file's id is ``<file>``, with or without
``id_field``. Ids are unique over a run. A record that cannot be read (malformed JSON,
undecodable bytes, no text, a bad or repeated id) stops the run with one line naming its
``<file>:<n>``, or is skipped and handed to the caller (``on_error="skip"``): nothing is
skipped silently. A file that breaks off (truncated gzip, a JSON array with a syntax error, a
text file that is not UTF-8) is one such record, and the rest of that file is not read.

Writing: every output goes through :func:`atomic_output` (whole files, written to
``.NAME.tmp-PID`` beside the target and renamed into place) or :class:`RowAppender` (score rows
appended a bounded buffer at a time, whole lines, Ctrl-C held back during each write, so after
any kill every complete line of the file is a valid row; a torn last line is cut off before a
resumed run appends). New files get the mode the umask gives (``0666 & ~umask``), a replaced
file keeps its mode; a symlink is written through (its target is replaced, the link stays); a
FIFO or a device (``/dev/stdout``) is written directly. Before any work a command checks its
outputs (:func:`check_outputs`: writable, not a directory, none of them an input or another
output) and locks them against a second run (:func:`lock_outputs`). A writer killed before its
rename leaves its temporary file behind; the next run that writes ``NAME`` removes it
(:func:`remove_stale_temporaries`: only those of processes that no longer run on this machine).
"""
from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import glob
import gzip
import hashlib
import io
import json
import math
import os
import signal
import stat
import threading
import zlib
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ._optional import require

FORMATS = ("auto", "jsonl", "txt", "parquet")
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt",
          ".parquet": "parquet"}
JSON_SUFFIXES = tuple(s + gz for s in (".jsonl", ".json", ".ndjson") for gz in ("", ".gz"))
SUFFIXES = JSON_SUFFIXES + (".txt", ".txt.gz", ".text", ".text.gz", ".parquet")
_SUFFIX_TEXT = ".jsonl, .json, .ndjson, .txt, .text (each optionally .gz) or .parquet"
ON_ERROR = ("fail", "skip")
_FLUSH_BYTES = 1 << 18  # rows are written in buffers of at most ~256 KiB
_PARQUET_BATCH = 4096
_READ_BYTES = 1 << 16


class CorpusIOError(ValueError):
    """A problem with an input or output file, reported in one line."""


# ---------------------------------------------------------------- inputs

def file_kind(path: str, fmt: str = "auto") -> Optional[str]:
    """``"jsonl"``, ``"txt"`` or ``"parquet"``: ``fmt`` unless ``"auto"``, else from the name
    (case-insensitive, ``.gz`` looked through); None when the name does not tell."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        return fmt
    name = os.path.basename(path).lower()
    gz = name.endswith(".gz")
    kind = _KINDS.get(os.path.splitext(name[:-3] if gz else name)[1])
    return None if gz and kind == "parquet" else kind


def expand_inputs(paths: Sequence[str], fmt: str = "auto", *, option: str = "--input") -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively, glob patterns), in
    order, each once; missing ones, and named files of an unknown kind (unless ``fmt`` names
    it), raise :class:`CorpusIOError`."""
    files, seen = [], set()

    def add(path):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, dirs, names in os.walk(path) for name in names
                if file_kind(name) and not name.startswith(".")
            )
            if not found:
                raise CorpusIOError(f"directory {path!r} holds no {_SUFFIX_TEXT} file")
            for f in found:
                add(f)
        elif os.path.isfile(path):
            if file_kind(path, fmt) is None:
                hint = " (or pass --format)" if option == "--input" else ""
                raise CorpusIOError(f"input {path!r}: unsupported file type: expected "
                                    f"{_SUFFIX_TEXT}{hint}")
            add(path)
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True)
                           if os.path.isfile(p) and file_kind(p))
            if not found:
                raise CorpusIOError(f"pattern {path!r} matches no {_SUFFIX_TEXT} file")
            for f in found:
                add(f)
        else:
            raise CorpusIOError(f"input {path!r} does not exist")
    if not files:
        raise CorpusIOError("no input given")
    return files


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


def _record_error(name, line, reason) -> ReadError:
    return ReadError(name, line, reason, f"{name}:{line}: {reason}", False)


def _file_error(name, line, reason) -> ReadError:
    return ReadError(name, line, reason, f"cannot read {name!r}: {reason}", True)


class _Broken(Exception):
    """Raised inside a reader when the rest of a file cannot be read."""

    def __init__(self, error: ReadError):
        self.error = error


def _id_of(record: dict, id_field: str) -> Optional[str]:
    value = record.get(id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _document(record, name, line, text_field, id_field, keep_record):
    if not isinstance(record, dict):
        return _record_error(name, line, "not a JSON object")
    text = record.get(text_field)
    if text is None and text_field in record:
        text = ""  # a null text is an empty document
    if not isinstance(text, str):
        return _record_error(name, line, f"no string field {text_field!r}")
    if id_field:
        doc_id = _id_of(record, id_field)
        if doc_id is None:
            return _record_error(name, line, f"no string or integer field {id_field!r}")
    else:
        doc_id = f"{name}:{line}"
    return Document(doc_id, text, name, line, record if keep_record else None)


@contextlib.contextmanager
def _reading(path: str):
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


_READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_txt(path, name, text_field, keep_record):
    try:
        with _reading(path) as f:
            data = f.read()
    except _READ_ERRORS as exc:
        return _file_error(name, None, str(exc))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _file_error(name, data.count(b"\n", 0, exc.start) + 1, str(exc))
    return Document(name, text, name, None, {text_field: text} if keep_record else None)


def _json_records(path, name):
    """``(n, object or ReadError)`` of a JSON file, lines or one array; :class:`_Broken` when the
    rest of the file cannot be read."""
    lineno = 0
    try:
        with _reading(path) as f:
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
    except _READ_ERRORS as exc:
        raise _Broken(_file_error(name, lineno + 1, str(exc))) from None


def _json_line(raw: bytes, name, lineno):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _record_error(name, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start} "
                                           "of the line)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return _record_error(name, lineno, f"not valid JSON ({exc.msg})")


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
            raise _Broken(_file_error(self.name, self.count + 1, f"not valid UTF-8 ({exc.reason}, "
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
        raise _Broken(ReadError(self.name, n, reason, f"{self.name}:{n}: {reason}", True))

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
        """``(n, element)`` in order; :class:`_Broken` at a syntax error."""
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


def _parquet_records(path, name, columns):
    pq = require("pyarrow.parquet", extra="parquet", feature="reading .parquet files")
    row = 0
    try:
        pfile = pq.ParquetFile(path)
        if columns is not None:
            names = set(pfile.schema_arrow.names)
            columns = [c for c in columns if c in names]
        for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise _Broken(_file_error(name, row + 1, str(exc).splitlines()[0])) from None


def iter_records(files: Sequence[str], *, text_field: str = "text", id_field: Optional[str] = None,
                 fmt: str = "auto", keep_record: bool = False,
                 names: Optional[Sequence[str]] = None) -> Iterator[Union[Document, ReadError]]:
    """Every record of ``files`` (from :func:`expand_inputs`), in order: a :class:`Document`,
    or a :class:`ReadError` for one that cannot be read (ids not yet checked for repeats: see
    :func:`iter_documents`).

    ``names``: the name of each file in default ids and messages (default: the path itself), so
    that a worker that opens a file by its absolute path gives the ids of the run that named it.
    """
    if names is None:
        names = files
    elif len(names) != len(files):
        raise ValueError(f"names has {len(names)} entries for {len(files)} files")
    for path, name in zip(files, names):
        kind = file_kind(path, fmt) or file_kind(name, fmt)
        if kind == "txt":
            yield _read_txt(path, name, text_field, keep_record)
            continue
        if kind == "parquet":
            columns = None if keep_record else [text_field] + ([id_field] if id_field else [])
            records = _parquet_records(path, name, columns)
        elif kind == "jsonl":
            records = _json_records(path, name)
        else:
            yield _file_error(name, None, "unsupported file type")
            continue
        try:
            for n, record in records:
                if isinstance(record, ReadError):
                    yield record
                else:
                    yield _document(record, name, n, text_field, id_field, keep_record)
        except _Broken as broken:
            yield broken.error


class RecordCheck:
    """The rules over a run's records, in reading order: ids are unique, and a record that cannot
    be read stops the run (``on_error="fail"``: :class:`CorpusIOError` with its one line) or is
    handed to ``on_skip`` and counted (``"skip"``). ``check(item)``: the document, or None."""

    def __init__(self, on_error: str = "fail", on_skip: Optional[Callable[[ReadError], None]] = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.on_skip = on_error, on_skip
        self.ids = IdIndex()
        self.skipped = 0

    def check(self, item: Union[Document, ReadError]) -> Optional[Document]:
        if isinstance(item, Document):
            if self.ids.add(item.id):
                return item
            item = ReadError(item.file, item.line, f"duplicate id {item.id!r}",
                             f"{item.where}: duplicate id {item.id!r}", False)
        if self.on_error == "fail":
            raise CorpusIOError(item.message)
        self.skipped += 1
        if self.on_skip is not None:
            self.on_skip(item)
        return None


def iter_documents(files: Sequence[str], *, text_field: str = "text", id_field: Optional[str] = None,
                   fmt: str = "auto", keep_record: bool = False,
                   names: Optional[Sequence[str]] = None, on_error: str = "fail",
                   on_skip: Optional[Callable[[ReadError], None]] = None,
                   check: Optional[RecordCheck] = None) -> Iterator[Document]:
    """The documents of ``files`` in order, under the rules of :class:`RecordCheck` (pass
    ``check`` to read its count of skipped records afterwards)."""
    check = check or RecordCheck(on_error, on_skip)
    for item in iter_records(files, text_field=text_field, id_field=id_field, fmt=fmt,
                             keep_record=keep_record, names=names):
        doc = check.check(item)
        if doc is not None:
            yield doc


def id_digest(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=16).digest()


def _key(doc_id: str) -> Tuple[int, int]:
    digest = id_digest(doc_id)
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


class IdIndex:
    """A set of document ids in 16 bytes each: 128-bit hashes as pairs of uint64 (every bit
    pattern kept, NUL bytes included), the recent ones in a Python set, the rest in sorted numpy
    runs merged like a binary counter (amortised O(log n) work per id, at most ~log2(n) runs to
    search)."""

    _RUN = 4096

    def __init__(self) -> None:
        self._runs: List[Tuple[np.ndarray, np.ndarray]] = []  # (high, low) halves, sorted
        self._recent: set = set()

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self._runs) + len(self._recent)

    def _has(self, key: Tuple[int, int]) -> bool:
        if key in self._recent:
            return True
        if not self._runs:
            return False
        high, low = np.uint64(key[0]), key[1]
        for highs, lows in self._runs:
            i = highs.searchsorted(high)
            while i < len(highs) and highs[i] == high:  # 64-bit halves rarely repeat
                if int(lows[i]) == low:
                    return True
                i += 1
        return False

    def __contains__(self, doc_id: str) -> bool:
        return self._has(_key(doc_id))

    def add(self, doc_id: str) -> bool:
        """Add ``doc_id``; False if it was already there."""
        key = _key(doc_id)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self._RUN:
            pairs = np.array(sorted(self._recent), dtype=np.uint64)
            self._runs.append((pairs[:, 0].copy(), pairs[:, 1].copy()))
            self._recent = set()
            while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                high2, low2 = self._runs.pop()
                high1, low1 = self._runs[-1]
                high, low = np.concatenate([high1, high2]), np.concatenate([low1, low2])
                order = np.lexsort((low, high))
                self._runs[-1] = (high[order], low[order])
        return True


# ---------------------------------------------------------------- outputs: checks and locks

class _Target(NamedTuple):
    path: str  # where the bytes go: the symlink's target for a regular file
    regular: bool  # a regular file (or none yet): written atomically; else written directly
                   # (a FIFO, a device, a path under /dev or /proc)


def _target(label: Optional[str], path: str) -> _Target:
    what = f"{label} {path!r}" if label else repr(path)
    if os.path.abspath(path).startswith(("/dev/", "/proc/")):
        return _Target(path, False)  # /dev/stdout: written directly, whatever it resolves to
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return _Target(os.path.realpath(path), True)  # a dangling symlink: its target is created
    except OSError as exc:
        raise CorpusIOError(f"cannot write {what}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CorpusIOError(f"{what} is a directory")
    if stat.S_ISREG(st.st_mode):
        return _Target(os.path.realpath(path), True)
    return _Target(path, False)


def check_output(label: str, path: str) -> _Target:
    """Refuse now, not after the work, an output that cannot be written: a directory, a file in
    a missing or read-only directory, an unwritable device."""
    target = _target(label, path)
    if not target.regular:
        if not os.access(path, os.W_OK):
            raise CorpusIOError(f"{label} {path!r} is not writable")
        return target
    directory = os.path.dirname(target.path)
    if not os.path.isdir(directory):
        raise CorpusIOError(f"{label} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise CorpusIOError(f"{label} {path!r}: directory {directory!r} is not writable")
    if os.path.exists(target.path) and not os.access(target.path, os.W_OK):
        raise CorpusIOError(f"{label} {path!r} is not writable")
    return target


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(outputs: Sequence[Tuple[str, Optional[str]]],
                  inputs: Sequence[Tuple[str, str]] = ()) -> None:
    """Before any work: each output (``(option, path)``, None for absent) is writable (see
    :func:`check_output`), and none is an input (``(option, path)``) or another output (the
    same file by path, symlink or hard link). Devices and FIFOs may repeat."""
    seen = []
    for label, path in outputs:
        if path is None:
            continue
        if not check_output(label, path).regular:
            continue
        for input_label, input_path in inputs:
            if _same_file(path, input_path):
                raise CorpusIOError(f"{label} {path!r} is also an input ({input_label} "
                                    f"{input_path!r}): writing it would destroy it; choose "
                                    "another file")
        for other_label, other_path in seen:
            if _same_file(path, other_path):
                raise CorpusIOError(f"{label} {path!r} is also {other_label} {other_path!r}: "
                                    "choose another file")
        seen.append((label, path))


def _lock_name(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _lock(label: str, path: str) -> Optional[Tuple[str, int]]:
    target = _target(label, path)
    if not target.regular:
        return None
    name = _lock_name(target.path)
    while True:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise CorpusIOError(f"cannot lock {label} {path!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise CorpusIOError(f"cannot lock {label} {path!r}: {exc.strerror}") from None
            raise CorpusIOError(f"{label} {path!r} is being written by another run"
                                + (f" (process {owner})" if owner.isdigit() else "")
                                + ": wait for it to end, or choose another file") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(name).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder before us removed the name while we waited: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return name, fd
        os.close(fd)


@contextlib.contextmanager
def lock_outputs(outputs: Sequence[Tuple[str, Optional[str]]]):
    """Hold an exclusive lock on each regular output (``(option, path)``) for the block: a second
    run that writes one of them fails at once, naming it. The lock is ``flock`` on a hidden
    ``.NAME.lock`` beside the target, removed when released (the kernel releases it when a
    process dies)."""
    held = []
    try:
        for label, path in outputs:
            if path is not None:
                lock = _lock(label, path)
                if lock is not None:
                    held.append(lock)
        yield
    finally:
        for name, fd in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(name)
            os.close(fd)


# ---------------------------------------------------------------- writing rows

def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def dump_row(row: dict) -> str:
    """One JSON line; NaN and infinities become null."""
    return json.dumps(_json_value(row), ensure_ascii=False, default=str) + "\n"


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C back while a buffer is written, then raise it: no torn line from SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def repair_tail(path: str) -> None:
    """Cut a torn last line (no newline: the writer was killed during a write)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos - step + cut + 1)
                return
            pos -= step
        f.truncate(0)


class RowAppender:
    """Append JSON rows to a file in buffers of at most ~256 KiB of whole lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise CorpusIOError(f"cannot write {path!r}: {exc.strerror}") from None
        self._buffer: List[bytes] = []
        self._size = 0

    def write(self, row: dict) -> None:
        line = dump_row(row).encode("utf-8")
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._size = [], 0
        with _sigint_held():
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._fd, view)
                except OSError as exc:
                    raise CorpusIOError(f"cannot write {self.path!r}: {exc.strerror}") from None
                view = view[written:]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _temporary_name(path: str, pid: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{pid}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: str) -> List[str]:
    """Remove the temporary files of :func:`atomic_output` that writers of ``path`` (through a
    symlink: of its target) killed before their rename left behind: ``.NAME.tmp-PID`` whose
    process no longer runs on this machine (a live writer's file is kept). Returns the removed
    paths."""
    target = _target(None, path)
    if not target.regular:
        return []
    directory = os.path.dirname(target.path)
    prefix = f".{os.path.basename(target.path)}.tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for entry in sorted(entries):
        pid = entry[len(prefix):]
        if not entry.startswith(prefix) or not pid.isdigit() or int(pid) <= 0:
            continue
        if int(pid) == os.getpid() or _running(int(pid)):
            continue
        stale = os.path.join(directory, entry)
        try:
            os.unlink(stale)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CorpusIOError(f"cannot remove the stale temporary file {stale!r}: "
                                f"{exc.strerror}") from None
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", *, label: Optional[str] = None):
    """Write the output ``path`` whole: through a temporary file beside it (its target, for a
    symlink), renamed into place when the block completes; an interrupted write leaves the
    previous file (or none), never a truncated one. A FIFO or a device is written directly.

    ``mode`` ``"w"`` gives a text file (gzip-compressed when ``path`` ends in ``.gz``), ``"path"``
    gives the path to write, for writers that open it on their own (matplotlib, pyarrow). A new
    file gets the umask's mode, a replaced one keeps its mode. ``label`` (the option, e.g.
    ``--json``) names the output in the one-line :class:`CorpusIOError` of a failed write.
    """
    what = f"{label} {path!r}" if label else repr(path)
    target = _target(label, path)
    gz = os.fspath(path).lower().endswith(".gz")
    if not target.regular:
        try:
            if mode == "path":
                yield path
            else:
                with open(path, "ab") as raw, _text(raw, gz) as f:  # no truncation
                    yield f
        except OSError as exc:
            raise CorpusIOError(f"cannot write {what}: {exc.strerror or exc}") from None
        return
    directory = os.path.dirname(target.path)
    if not os.path.isdir(directory):
        raise CorpusIOError(f"cannot write {what}: directory {directory!r} does not exist")
    tmp = _temporary_name(target.path, os.getpid())
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a dead writer's, whose pid this process now has
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode
        try:
            keep = stat.S_IMODE(os.stat(target.path).st_mode)
        except FileNotFoundError:
            keep = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode == "path":
            os.close(fd)
            yield tmp
        else:
            with open(fd, "wb") as raw:
                with _text(raw, gz) as f:
                    yield f
                raw.flush()
                os.fsync(raw.fileno())
        os.chmod(tmp, keep)  # also when a writer made the file anew
        os.replace(tmp, target.path)
    except OSError as exc:
        raise CorpusIOError(f"cannot write {what}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _text(raw, gz: bool):
    stream = gzip.GzipFile(fileobj=raw, mode="wb") if gz else raw
    f = io.TextIOWrapper(stream, encoding="utf-8", write_through=False)
    try:
        yield f
        f.flush()
    finally:
        f.detach()
        if gz:
            stream.close()  # writes gzip's trailer; raw stays open


# ---------------------------------------------------------------- reading score rows

def iter_score_rows(path: str) -> Iterator[dict]:
    """Rows of a score file: JSON lines (null read as NaN) or parquet; torn last line ignored."""
    if path.lower().endswith(".parquet"):
        try:
            for _, row in _parquet_records(path, path, None):
                yield {k: (math.nan if v is None and k != "outlier" else v) for k, v in row.items()}
        except _Broken as broken:
            raise CorpusIOError(broken.error.message) from None
        return
    try:
        with _reading(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn by a kill: not a row
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise CorpusIOError(f"{path}:{lineno}: not a score row (invalid JSON)") from None
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    raise CorpusIOError(f"{path}:{lineno}: not a score row (no string 'id')")
                yield {k: (math.nan if v is None and k not in ("outlier", "id") else v)
                       for k, v in row.items()}
    except _READ_ERRORS as exc:
        raise CorpusIOError(f"cannot read {path!r}: {exc}") from None


def write_parquet(path: str, rows: Iterable[dict], columns: Sequence[tuple]) -> int:
    """Write ``rows`` to a parquet file atomically, ``_PARQUET_BATCH * 16`` rows per row group.

    ``columns``: ``(name, kind)`` pairs, kind one of ``"str"``, ``"int"``, ``"float"``,
    ``"bool"``; NaN is stored as null. Returns the number of rows.
    """
    pa = require("pyarrow", extra="parquet", feature="writing .parquet files")
    pq = require("pyarrow.parquet", extra="parquet", feature="writing .parquet files")
    kinds = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    schema = pa.schema([(name, kinds[kind]) for name, kind in columns])
    count = 0
    with atomic_output(path, "path") as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: List[dict] = []
            for row in rows:
                batch.append({k: (None if isinstance(v, float) and math.isnan(v) else v)
                              for k, v in row.items()})
                if len(batch) >= _PARQUET_BATCH * 16:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count += len(batch)
                    batch = []
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
    return count
