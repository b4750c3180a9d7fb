"""Writing output files: the one writer of every command (see :mod:`pplfast.corpus.io` for
the reader).

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
Rows are JSON lines with NaN and infinities as null (:func:`json_safe`, the package's one JSON
sanitizer).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import json
import math
import os
import signal
import stat
import threading
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .._optional import require
from .formats import PARQUET_BATCH
from .io import CorpusIOError

_FLUSH_BYTES = 1 << 18  # rows are written in buffers of at most ~256 KiB


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

def json_safe(value):
    """``value`` for ``json.dumps``: NaN and infinities as None (JSON's null), numpy scalars as
    Python numbers, in dicts, lists and tuples too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dump_row(row: dict) -> str:
    """One JSON line; NaN and infinities become null."""
    return json.dumps(json_safe(row), ensure_ascii=False, default=str) + "\n"


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


def write_parquet(path: str, rows: Iterable[dict], columns: Sequence[tuple]) -> int:
    """Write ``rows`` to a parquet file atomically, ``PARQUET_BATCH * 16`` rows per row group.

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
                if len(batch) >= PARQUET_BATCH * 16:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count += len(batch)
                    batch = []
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
    return count
