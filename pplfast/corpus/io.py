"""Reading documents: the one reader of every command.

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

The files of each kind are read by :mod:`pplfast.corpus.formats`; the ids a run has seen are kept
by :class:`pplfast.corpus.ids.IdIndex`; outputs are written by :mod:`pplfast.corpus.writer`.
:func:`iter_score_rows` reads back the score rows that ``pplfast score-corpus`` writes.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Callable, Iterator, List, Optional, Sequence, Union

from .formats import (Broken, Document, ReadError, READ_ERRORS, file_error, json_records,
                      open_content, parquet_records, read_txt, record_document)
from .ids import IdIndex

FORMATS = ("auto", "jsonl", "txt", "parquet")
_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt",
          ".parquet": "parquet"}
JSON_SUFFIXES = tuple(s + gz for s in (".jsonl", ".json", ".ndjson") for gz in ("", ".gz"))
SUFFIXES = JSON_SUFFIXES + (".txt", ".txt.gz", ".text", ".text.gz", ".parquet")
_SUFFIX_TEXT = ".jsonl, .json, .ndjson, .txt, .text (each optionally .gz) or .parquet"
ON_ERROR = ("fail", "skip")


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
            yield read_txt(path, name, text_field, keep_record)
            continue
        if kind == "parquet":
            columns = None if keep_record else [text_field] + ([id_field] if id_field else [])
            records = parquet_records(path, name, columns)
        elif kind == "jsonl":
            records = json_records(path, name)
        else:
            yield file_error(name, None, "unsupported file type")
            continue
        try:
            for n, record in records:
                if isinstance(record, ReadError):
                    yield record
                else:
                    yield record_document(record, name, n, text_field, id_field, keep_record)
        except Broken as broken:
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


# ---------------------------------------------------------------- reading score rows

def iter_score_rows(path: str) -> Iterator[dict]:
    """Rows of a score file: JSON lines (null read as NaN) or parquet; torn last line ignored."""
    if path.lower().endswith(".parquet"):
        try:
            for _, row in parquet_records(path, path, None):
                yield {k: (math.nan if v is None and k != "outlier" else v) for k, v in row.items()}
        except Broken as broken:
            raise CorpusIOError(broken.error.message) from None
        return
    try:
        with open_content(path) as f:
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
    except READ_ERRORS as exc:
        raise CorpusIOError(f"cannot read {path!r}: {exc}") from None

