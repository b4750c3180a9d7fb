"""The one document reader and the one output writer on their own: the id index at scale, an
interrupted atomic write, a JSON array streamed across reads (through every command:
tests/cli/test_cli_io.py)."""
import json
import os
import random
import stat

import pytest


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_id_index_finds_every_id_at_scale():
    from pplfast.corpus.ids import IdIndex, id_digest

    ids = [f"doc-{i}" for i in range(20000)]
    # about 1 digest in 256 ends in a NUL byte (numpy's S16 strips those when read back)
    assert sum(id_digest(i).endswith(b"\x00") for i in ids) > 40
    index = IdIndex()
    assert all(index.add(i) for i in ids)
    assert len(index) == len(ids) and len(index._runs) > 1
    missing = [i for i in ids if i not in index]
    assert missing == []
    assert not any(index.add(i) for i in ids) and len(index) == len(ids)
    assert not any(f"other-{i}" in index for i in range(2000))


def test_atomic_output_keeps_the_old_file_on_failure_and_cleans_up(tmp_path):
    from pplfast.corpus.io import CorpusIOError
    from pplfast.corpus.writer import atomic_output

    path = tmp_path / "out.jsonl"
    path.write_text("complete\n")
    os.chmod(path, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_output(str(path)) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "complete\n" and os.listdir(tmp_path) == ["out.jsonl"]
    with atomic_output(str(path), label="--json") as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and mode(path) == 0o640
    with pytest.raises(CorpusIOError, match=r"^cannot write --json '.*nope/x.json': directory .* does not exist$"):
        with atomic_output(str(tmp_path / "nope" / "x.json"), label="--json"):
            pass


def test_json_array_streamed_across_buffers(tmp_path):
    from pplfast.corpus.io import CorpusIOError, iter_documents

    rng = random.Random(11)
    # elements, multi-byte characters and numbers cut by the 64 KiB reads at every offset
    records = [{"text": "é東✓ " * rng.randint(0, 40) + str(i), "n": rng.random() * 10 ** rng.randint(0, 30)}
               for i in range(3000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=rng.choice([None, 1])),
                    encoding="utf-8")
    docs = list(iter_documents([str(path)], keep_record=True))
    assert [d.record for d in docs] == records and docs[-1].id == f"{path}:3000"
    for content, message in (
            ("[]", None),
            ('  [ {"text": "a"} ]  \n', None),
            ('[{"text": "a"}, 7]', "e.json:2: not a JSON object"),
            ('[{"text": "a"},]', "e.json:2: not valid JSON (Illegal trailing comma before end of array: line 1 column 16)"),
            ('[{"text": "a"}', "e.json:2: not valid JSON (the array is not closed: line 1 column 15)"),
            ('[{"text": "a"}] x', "e.json:2: not valid JSON (Extra data after the array: line 1 column 17)"),
            ('[{"text": "a"},\n {"text": "b\n', "e.json:2: not valid JSON (Invalid control character at: line 2 column 13)")):
        (tmp_path / "e.json").write_text(content)
        if message is None:
            assert len(list(iter_documents([str(tmp_path / "e.json")]))) == content.count("{")
            continue
        with pytest.raises(CorpusIOError) as info:
            list(iter_documents([str(tmp_path / "e.json")]))
        assert str(info.value) == f"{tmp_path}/{message}", content
