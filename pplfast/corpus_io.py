"""Reading corpora and writing score files, a bounded buffer at a time.

Inputs: ``.jsonl`` / ``.json`` (one JSON object per line, as Ray's ``write_json`` writes them),
``.jsonl.gz`` / ``.json.gz``, ``.txt`` (the whole file is one document) and ``.parquet`` (with
the ``parquet`` extra), named as files, directories (searched recursively for those suffixes) or
glob patterns. A document's default id is ``<file>:<line>`` (``<file>:<row>`` for parquet, both
counted from 1; ``<file>`` for ``.txt``), with ``<file>`` the path as named or found.

Outputs are append-safe: rows are written as whole lines, a bounded buffer at a time, with
Ctrl-C held back during each write, so after any kill every complete line of the file is a valid
row; a torn last line (a kill during a write) is cut off before a resumed run appends. Files
that are produced in one go (a finished score file, a filtered corpus) are written to a
temporary name in the same directory (``.NAME.tmp-PID``) and renamed into place; a writer
killed before the rename (SIGKILL, power loss) leaves that temporary file behind, and the next
run that writes ``NAME`` removes it (:func:`remove_stale_temporaries`: only those of processes
that no longer run on this machine).
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import math
import os
import signal
import threading
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from ._optional import require

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUFFIXES = JSON_SUFFIXES + (".txt", ".parquet")
_FLUSH_BYTES = 1 << 18  # rows are written in buffers of at most ~256 KiB
_PARQUET_BATCH = 4096


class CorpusIOError(ValueError):
    """A problem with an input or output file, reported in one line."""


class Document(NamedTuple):
    id: str
    text: str
    where: str  # file:line, for error messages
    record: Optional[dict]  # the whole input object, when asked for


def _suffix(path: str) -> Optional[str]:
    lower = path.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively, glob patterns), in
    order, each once; unsupported or missing ones raise :class:`CorpusIOError`."""
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
                if _suffix(name) and not name.startswith(".")
            )
            if not found:
                raise CorpusIOError(f"directory {path!r} holds no {', '.join(SUFFIXES)} file")
            for f in found:
                add(f)
        elif os.path.isfile(path):
            if _suffix(path) is None:
                raise CorpusIOError(f"input {path!r}: unsupported file type (expected one of "
                                    f"{', '.join(SUFFIXES)})")
            add(path)
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and _suffix(p))
            if not found:
                raise CorpusIOError(f"pattern {path!r} matches no {', '.join(SUFFIXES)} file")
            for f in found:
                add(f)
        else:
            raise CorpusIOError(f"input {path!r} does not exist")
    if not files:
        raise CorpusIOError("no input given")
    return files


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _id_of(record: dict, id_field: str, where: str) -> str:
    value = record.get(id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusIOError(f"{where}: no string or integer field {id_field!r}")
    return str(value)


def _iter_json_lines(path: str, name: Optional[str] = None):
    """(line number, object) of a JSON-lines file; blank lines skipped (and counted)."""
    name = path if name is None else name
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusIOError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise CorpusIOError(f"{name}:{lineno}: not a JSON object")
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CorpusIOError(f"cannot read {name!r}: {exc}") from None


def _iter_parquet(path: str, columns=None, name: Optional[str] = None):
    name = path if name is None else name
    pq = require("pyarrow.parquet", extra="parquet", feature="reading .parquet files")
    try:
        pfile = pq.ParquetFile(path)
        if columns is not None:
            names = set(pfile.schema_arrow.names)
            columns = [c for c in columns if c in names]
        row = 0
        for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CorpusIOError(f"cannot read {name!r}: {str(exc).splitlines()[0]}") from None


def iter_documents(files: Sequence[str], *, text_field: str = "text", id_field: Optional[str] = None,
                   keep_record: bool = False, names: Optional[Sequence[str]] = None) -> Iterator[Document]:
    """Stream the documents of ``files`` (from :func:`expand_inputs`), in order.

    ``names``: the name of each file in default ids and messages (default: the path itself),
    so that a worker that opens a file by its absolute path gives the ids of the run that named
    it relatively.
    """
    if names is None:
        names = files
    elif len(names) != len(files):
        raise ValueError(f"names has {len(names)} entries for {len(files)} files")
    for path, name in zip(files, names):
        suffix = _suffix(path)
        if suffix == ".txt":
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise CorpusIOError(f"cannot read {name!r}: {exc}") from None
            yield Document(name, text, name, {text_field: text} if keep_record else None)
            continue
        if suffix == ".parquet":
            columns = None if keep_record else [text_field] + ([id_field] if id_field else [])
            rows = _iter_parquet(path, columns, name)
        else:
            rows = _iter_json_lines(path, name)
        for lineno, record in rows:
            where = f"{name}:{lineno}"
            text = record.get(text_field)
            if text is None and text_field in record:
                text = ""  # a null text is an empty document
            if not isinstance(text, str):
                raise CorpusIOError(f"{where}: no string field {text_field!r}")
            doc_id = _id_of(record, id_field, where) if id_field else where
            yield Document(doc_id, text, where, record if keep_record else None)


def id_digest(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=16).digest()


class IdIndex:
    """A set of document ids in about 16 bytes each: 128-bit hashes, the recent ones in a Python
    set, the rest in sorted numpy runs merged like a binary counter (amortised O(log n) work per
    id, at most ~log2(n) runs to search)."""

    _RUN = 4096

    def __init__(self) -> None:
        self._runs: List[np.ndarray] = []
        self._recent: set = set()

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs) + len(self._recent)

    def _has(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        for run in self._runs:
            i = int(np.searchsorted(run, key))
            if i < len(run) and run[i] == key:
                return True
        return False

    def __contains__(self, doc_id: str) -> bool:
        return self._has(id_digest(doc_id))

    def add(self, doc_id: str) -> bool:
        """Add ``doc_id``; False if it was already there."""
        key = id_digest(doc_id)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self._RUN:
            self._runs.append(np.sort(np.array(list(self._recent), dtype="S16")))
            self._recent = set()
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                last = self._runs.pop()
                self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]), kind="mergesort")
        return True


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
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
    """Remove the temporary files of :func:`atomic_output` that writers of ``path`` killed
    before their rename left behind: ``.NAME.tmp-PID`` whose process no longer runs on this
    machine (a live writer's file is kept). Returns the removed paths."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.tmp-"
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
def atomic_output(path: str, mode: str = "w"):
    """Write ``path`` through a temporary file in its directory, renamed into place on success.

    ``mode`` ``"w"`` gives a text file (gzip-compressed when ``path`` ends in ``.gz``), ``"path"``
    gives the temporary path itself, for writers that open it on their own.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CorpusIOError(f"cannot write {path!r}: directory {directory!r} does not exist")
    tmp = _temporary_name(path, os.getpid())
    try:
        if mode == "path":
            yield tmp
        else:
            raw = gzip.open(tmp, "wb") if path.lower().endswith(".gz") else open(tmp, "wb")
            with io.TextIOWrapper(raw, encoding="utf-8", write_through=False) as f:
                yield f
                f.flush()
                if not path.lower().endswith(".gz"):
                    os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CorpusIOError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- reading score rows

def iter_score_rows(path: str) -> Iterator[dict]:
    """Rows of a score file: JSON lines (null read as NaN) or parquet; torn last line ignored."""
    if path.lower().endswith(".parquet"):
        for _, row in _iter_parquet(path):
            yield {k: (math.nan if v is None and k != "outlier" else v) for k, v in row.items()}
        return
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # torn by a kill: not a row
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise CorpusIOError(f"{path}:{lineno}: not a score row (invalid JSON)") from None
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    raise CorpusIOError(f"{path}:{lineno}: not a score row (no string 'id')")
                yield {k: (math.nan if v is None and k not in ("outlier", "id") else v)
                       for k, v in row.items()}
    except (OSError, EOFError, UnicodeDecodeError) as exc:
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
