"""The documentation tells the truth about the code (README.md, docs/*.md).

- every relative link points at a file that exists, and at a heading that exists where it names
  an anchor (GitHub's anchor rule);
- every documented signature (a line of a ``python`` code block of the form
  ``pplfast.<name>(...) -> ...``) matches ``inspect.signature`` of the real object: parameter
  names, order, kinds and defaults;
- every ``pplfast.X`` / ``pplfast.X.Y`` name resolves (a module, or an attribute of one);
- every ``--flag`` given to a command (``pplfast CMD ...`` in a code block or a code span, or a
  ``--flag`` code span in a section whose heading names ``pplfast CMD``) exists in that
  command's parser (``pplfast eval``: lm-eval's ``run`` parser); a ``--flag`` code span in a
  section that names no command must exist in some command;
- every repository path written as a code span (``pplfast/api.py``, ``tests/engine/``) exists.

Each check is a function from a markdown file to a list of problems; the ``can_fail`` tests run
each on a deliberately broken document.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 300

# ---- reading markdown ----------------------------------------------------------------------------


class Block(NamedTuple):
    lang: str
    text: str
    line: int  # first line of the block's content


class Heading(NamedTuple):
    level: int
    text: str
    line: int


def split_markdown(text: str) -> Tuple[List[Tuple[int, str]], List[Block]]:
    """``(prose lines as (line number, text), fenced code blocks)``."""
    prose, blocks = [], []
    fence, lang, body, start = None, "", [], 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None:
            found = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if found:
                fence, lang, body, start = found.group(1), found.group(2).lower(), [], number + 1
            else:
                prose.append((number, line))
        elif stripped.startswith(fence) and not stripped[len(fence):].strip():
            blocks.append(Block(lang, "\n".join(body), start))
            fence = None
        else:
            body.append(line)
    return prose, blocks


def headings(text: str) -> List[Heading]:
    prose, _ = split_markdown(text)
    out = []
    for number, line in prose:
        found = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if found:
            out.append(Heading(len(found.group(1)), found.group(2), number))
    return out


def anchors(text: str) -> Set[str]:
    """GitHub's heading anchors: lower case, markup and punctuation dropped (hyphens and
    underscores kept), spaces as hyphens, ``-1``, ``-2`` ... for repeats."""
    seen: Dict[str, int] = {}
    out = set()
    for heading in headings(text):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.text)  # a link: its text
        plain = plain.replace("`", "").strip().lower()
        slug = "".join(c for c in plain if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def code_spans(line: str) -> List[str]:
    return re.findall(r"(?<!`)`([^`]+)`(?!`)", line)


def joined_prose(prose: List[Tuple[int, str]]) -> List[Tuple[int, str]]:
    """The prose lines with a code span that wraps onto the next line joined to it (numbered by
    its first line); a heading or a blank line ends a join."""
    out: List[Tuple[int, str]] = []
    for number, line in prose:
        if (out and out[-1][1].count("`") % 2 == 1 and line.strip()
                and not line.lstrip().startswith("#")):
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        else:
            out.append((number, line))
    return out


# ---- links ------------------------------------------------------------------------------------

LINK = re.compile(r"\[(?:[^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(path: Path) -> List[str]:
    text = path.read_text(encoding="utf-8")
    prose, _ = split_markdown(text)
    problems = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is no link
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            where = f"{path.name}:{number}: link {target!r}"
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{where}: {dest.relative_to(ROOT) if ROOT in dest.parents else dest}"
                                " does not exist")
                continue
            if anchor:
                if dest.is_dir() or dest.suffix != ".md":
                    problems.append(f"{where}: an anchor into a file that is not markdown")
                elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                    problems.append(f"{where}: no heading of {dest.name} has the anchor "
                                    f"#{anchor}")
    return problems


# ---- names --------------------------------------------------------------------------------------

NAME = re.compile(r"(?<![\w./-])pplfast(?:\.[A-Za-z_]\w*)+")
OPTIONAL_EXTENSIONS = {"pplfast._cuda_C"}  # built only where nvcc exists (setup.py)


def resolve(dotted: str):
    """The object ``dotted`` names: each part an attribute or a submodule of the one before."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if not inspect.ismodule(obj):
            raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {part!r}")
        obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def name_problems(path: Path) -> List[str]:
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for dotted in NAME.findall(line):
            try:
                resolve(dotted)
            except ImportError as exc:
                if dotted in OPTIONAL_EXTENSIONS and "cuda_C" in (ROOT / "setup.py").read_text():
                    continue
                problems.append(f"{path.name}:{number}: {dotted} does not import: {exc}")
            except AttributeError as exc:
                problems.append(f"{path.name}:{number}: {dotted} does not resolve: {exc}")
    return problems


# ---- signatures -------------------------------------------------------------------------------


class Signature(NamedTuple):
    name: str
    params: str  # the text between the parentheses
    line: int


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis that closes the one at ``start``."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def documented_signatures(text: str) -> List[Signature]:
    """Lines ``pplfast.<name>(...) -> ...`` of the python code blocks (the call may span
    lines; comments are dropped)."""
    _, blocks = split_markdown(text)
    out = []
    for block in blocks:
        if block.lang not in ("python", "py"):
            continue
        body = "\n".join(re.sub(r"\s+#.*$", "", line) for line in block.text.splitlines())
        for found in re.finditer(r"(?m)^\s*(pplfast(?:\.\w+)+)\(", body):
            close = _closing(body, found.end() - 1)
            if close < 0 or not re.match(r"\s*->", body[close + 1:]):
                continue  # a call, not a signature
            line = block.line + body[: found.start()].count("\n") + (body[found.start()] == "\n")
            out.append(Signature(found.group(1), body[found.end(): close], line))
    return out


KINDS = {"posonly": inspect.Parameter.POSITIONAL_ONLY,
         "args": inspect.Parameter.POSITIONAL_OR_KEYWORD,
         "vararg": inspect.Parameter.VAR_POSITIONAL,
         "kwonly": inspect.Parameter.KEYWORD_ONLY,
         "kwarg": inspect.Parameter.VAR_KEYWORD}
_NO_DEFAULT = inspect.Parameter.empty


def parse_params(params: str) -> List[Tuple[str, inspect._ParameterKind, object]]:
    """``(name, kind, default)`` of a documented parameter list; defaults must be literals."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    out = []
    positional = [*args.posonlyargs, *args.args]
    defaults = [_NO_DEFAULT] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = KINDS["posonly"] if i < len(args.posonlyargs) else KINDS["args"]
        out.append((arg.arg, kind, default))
    if args.vararg:
        out.append((args.vararg.arg, KINDS["vararg"], _NO_DEFAULT))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, KINDS["kwonly"], _NO_DEFAULT if default is None else default))
    if args.kwarg:
        out.append((args.kwarg.arg, KINDS["kwarg"], _NO_DEFAULT))
    return [(name, kind, default if default is _NO_DEFAULT else ast.literal_eval(default))
            for name, kind, default in out]


def real_params(dotted: str) -> List[Tuple[str, inspect._ParameterKind, object]]:
    obj = resolve(dotted)
    owner = resolve(dotted.rpartition(".")[0])
    params = list(inspect.signature(obj).parameters.values())
    member = inspect.getattr_static(owner, dotted.rpartition(".")[2]) if inspect.isclass(owner) \
        else None
    if inspect.isclass(owner) and inspect.isfunction(member):
        params = params[1:]  # a method documented without self
    return [(p.name, p.kind, p.default) for p in params]


def _same_default(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def signature_problems(path: Path) -> List[str]:
    problems = []
    for sig in documented_signatures(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{sig.line}: {sig.name}"
        try:
            documented = parse_params(sig.params)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"{where}: the documented parameters do not parse ({exc})")
            continue
        try:
            real = real_params(sig.name)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            problems.append(f"{where}: no signature to compare with ({exc})")
            continue
        if [p[:2] for p in documented] != [p[:2] for p in real]:
            problems.append(
                f"{where}: documented ({', '.join(f'{n} {k.name}' for n, k, _ in documented)}) "
                f"but the code has ({', '.join(f'{n} {k.name}' for n, k, _ in real)})")
            continue
        for (name, _, want), (_, _, got) in zip(documented, real):
            if not _same_default(want, got):
                problems.append(f"{where}: {name} defaults to {got!r} in the code, "
                                f"{want!r} in the docs")
    return problems


# ---- command-line flags -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def command_flags() -> Dict[str, frozenset]:
    """Every command's long options, from the parser the console script builds (``eval``: its
    own and lm-eval's ``run`` options)."""
    from pplfast.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: frozenset(s for s in p._option_string_actions if s.startswith("--"))
             for name, p in sub.choices.items()}
    top = frozenset(s for s in parser._option_string_actions if s.startswith("--"))
    flags[""] = top
    try:
        from lm_eval._cli import HarnessCLI
    except ImportError:  # without lm-eval, pplfast eval's flags cannot be known
        flags["eval"] = None
    else:
        lm = HarnessCLI()._parser
        lm_sub = next(a for a in lm._actions if isinstance(a, argparse._SubParsersAction))
        flags["eval"] = flags["eval"] | frozenset(
            s for s in lm_sub.choices["run"]._option_string_actions if s.startswith("--"))
    return flags


# a shell command line's pplfast command: at the start of the line or after &&, ; or |, behind
# environment assignments and `python -m` / `torchrun ... -m`
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3? -m |torchrun\s.*?-m )?"
                     r"pplfast\s+([a-z][a-z-]*)(?=\s|$)")


def _flags_in(words: str) -> List[str]:
    out = []
    for token in words.split():
        token = token.strip("[](),;:")
        if token.startswith("--") and len(token) > 2:
            out.append(token.split("=", 1)[0])
    return out


def command_lines(text: str) -> Iterator[Tuple[str, List[str]]]:
    """``(command, flags)`` of each ``pplfast CMD ...`` in ``text`` (one shell line): each part
    between ``&&``, ``;`` and pipes, up to a redirection."""
    for part in re.split(r"&&|;|\s\|\s", text):
        part = re.split(r"\s2?>", part)[0].strip()
        found = COMMAND.match(part)
        if found:
            yield found.group(1), _flags_in(part[found.end():])


def _check(flags_by_command, commands, flag) -> Optional[str]:
    """None when ``flag`` belongs to one of ``commands`` (every command when empty)."""
    known = flags_by_command()
    names = commands or [c for c in known if c]
    sets = [known.get(c) for c in names]
    if any(s is None for s in sets):
        return None  # a command whose flags cannot be read here (eval without lm-eval)
    if any(flag in s for s in sets):
        return None
    return (f"{flag} is not an option of {' or '.join('pplfast ' + c for c in names)}"
            if commands else f"{flag} is not an option of any pplfast command")


def flag_problems(path: Path, flags_by_command=command_flags) -> List[str]:
    text = path.read_text(encoding="utf-8")
    prose, blocks = split_markdown(text)
    problems = []
    known = flags_by_command()

    def check_line(number, line):
        for command, flags in command_lines(line):
            if command not in known:
                problems.append(f"{path.name}:{number}: pplfast {command} is not a command")
                continue
            for flag in flags:
                why = _check(flags_by_command, [command], flag)
                if why:
                    problems.append(f"{path.name}:{number}: {why}")

    for block in blocks:
        if block.lang in ("python", "py", "json", "jsonl"):
            continue
        joined = block.text.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            check_line(block.line + offset, re.sub(r"\s#\s.*$", "", line))

    stack: List[Tuple[int, List[str]]] = []  # (heading level, the commands it names)
    for number, line in joined_prose(prose):
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        if heading:
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            named = [c for span in code_spans(heading.group(2))
                     for c, _ in command_lines(span) if c in known]
            stack.append((level, named))
            continue
        section = next((named for _, named in reversed(stack) if named), [])
        for span in code_spans(line):
            if any(True for _ in command_lines(span)):
                check_line(number, span)
            elif span.startswith("--"):
                for flag in _flags_in(span):
                    why = _check(flags_by_command, section, flag)
                    if why:
                        problems.append(f"{path.name}:{number}: {why}")
    return problems


# ---- repository paths ------------------------------------------------------------------------------

REPO_PATH = re.compile(r"^(?:pplfast|kernels|csrc|tests|benchmarks|docs|\.ci)/[\w./-]*$")


def path_problems(path: Path) -> List[str]:
    problems = []
    prose, blocks = split_markdown(path.read_text(encoding="utf-8"))
    spans = [(number, span) for number, line in joined_prose(prose) for span in code_spans(line)]
    for block in blocks:
        if block.lang in ("bash", "sh", "shell", "console"):
            for offset, line in enumerate(block.text.splitlines()):
                spans += [(block.line + offset, word) for word in line.split()]
    for number, span in spans:
        span = span.strip().rstrip(",;:)")
        if REPO_PATH.match(span) and not (ROOT / span).exists():
            problems.append(f"{path.name}:{number}: {span} does not exist")
    return problems


# ---- the checks on the real documents ---------------------------------------------------------------


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in LINKED}
    for required in ("README.md", "CHANGELOG.md", "benchmarks/README.md", "docs/install.md",
                     "docs/ops.md", "docs/models.md", "docs/compare.md", "docs/corpus.md",
                     "docs/cli.md", "docs/architecture.md", "docs/serve.md"):
        assert required in names and (ROOT / required).is_file(), required


def test_readme_is_short_and_keeps_the_quickstart_block():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    # .ci/run reads the fenced block after this marker
    block = text.split("<!-- ci:quickstart -->", 1)[1].split("```", 2)[1]
    assert block.splitlines()[1:] == [
        'pip install torch==2.13.0 && pip install -e ".[test]" && pplfast bench',
        "python -m pytest"]


def test_readme_links_every_doc():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(LINK.findall(text))
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in linked, f"README.md does not link docs/{doc.name}"
    assert "benchmarks/README.md" in linked and "CHANGELOG.md" in linked


@pytest.mark.parametrize("path", LINKED, ids=_ids(LINKED))
def test_links_resolve(path):
    assert link_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_documented_signatures_match_the_code(path):
    assert signature_problems(path) == []


def test_the_op_reference_documents_every_public_function():
    documented = {s.name for p in DOCS for s in documented_signatures(p.read_text("utf-8"))}
    import pplfast

    functions = {f"pplfast.{n}" for n in pplfast.__all__
                 if inspect.isfunction(getattr(pplfast, n))}
    assert functions <= documented, sorted(functions - documented)


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_mentioned_names_resolve(path):
    assert name_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_documented_flags_exist(path):
    assert flag_problems(path) == []


def cli_sections(text: str) -> Dict[str, str]:
    """Command -> the text of its section in docs/cli.md (a heading naming `pplfast CMD`, up to
    the next heading of the same or a higher level)."""
    lines = text.splitlines()
    marks = headings(text)
    out = {}
    for i, heading in enumerate(marks):
        named = [c for span in code_spans(heading.text) for c, _ in command_lines(span)]
        if len(named) != 1:
            continue
        end = next((h.line for h in marks[i + 1:] if h.level <= heading.level), len(lines) + 1)
        out[named[0]] = "\n".join(lines[heading.line: end - 1])
    return out


def test_the_cli_reference_documents_every_flag():
    sections = cli_sections((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    missing = []
    for command, flags in sorted(command_flags().items()):
        if not command:
            continue
        assert command in sections, f"docs/cli.md has no section for pplfast {command}"
        if command == "eval":  # lm-eval's own options, documented by lm-eval
            continue
        spans = " ".join(code_spans(sections[command].replace("\n", " ")))
        missing += [f"pplfast {command} {flag}" for flag in sorted(flags - {"--help"})
                    if flag not in _flags_in(spans)]
    assert not missing, "flags docs/cli.md does not document: " + ", ".join(missing)


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_mentioned_paths_exist(path):
    assert path_problems(path) == []


# ---- each check can fail ---------------------------------------------------------------------------

BROKEN = '''\
# A broken page

## `pplfast score`

Links: [no file](missing.md), [no heading](ops.md#no-such-heading),
[fine](#a-broken-page), [fine too](https://example.org/x.md).

```python
pplfast.windows.make_windows(num_tokens, *, window=None, stride=None,
                             mode="rolling") -> List[Window]
pplfast.windows.sliding_windows(num_tokens, window) -> List[Window]
pplfast.perplexity(targets, logits, **options) -> Tensor
pplfast.Perplexity.update(self, logits, targets) -> None
res = pplfast.token_nll(logits, targets, shift=True)   # a call: not checked as a signature
```

`pplfast.no_such_function`, `pplfast.corpus.no_such_module` and `pplfast.reference.token_nll`.

Options: `--window 16` and `--no-such-flag`; `pplfast filter --max-perplexity 3
--windowz 2`.

```bash
pplfast score --model m --input a.txt \\
    --strid 4 | jq .perplexity
pplfast frobnicate --x
```

Files: `pplfast/api.py`, `pplfast/no_such_file.py`.
'''


@pytest.fixture
def broken_doc(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ops.md").write_text("# Ops\n\n## Special values\n")
    page = docs / "broken.md"
    page.write_text(BROKEN)
    return page


def test_link_check_can_fail(broken_doc):
    problems = link_problems(broken_doc)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "does not exist" in problems[0]
    assert "#no-such-heading" in problems[1]
    assert "special-values" in anchors((broken_doc.parent / "ops.md").read_text())


def test_signature_check_can_fail(broken_doc):
    problems = signature_problems(broken_doc)
    assert len(problems) == 4, problems
    assert problems[0].endswith("pplfast.windows.make_windows: mode defaults to 'sliding' in "
                                "the code, 'rolling' in the docs")
    assert "pplfast.windows.sliding_windows: documented (num_tokens POSITIONAL_OR_KEYWORD, " \
           "window POSITIONAL_OR_KEYWORD) but the code has (num_tokens POSITIONAL_OR_KEYWORD, " \
           "window POSITIONAL_OR_KEYWORD, stride POSITIONAL_OR_KEYWORD)" in problems[1]
    assert "pplfast.perplexity: documented (targets" in problems[2]
    assert "pplfast.Perplexity.update: documented (self" in problems[3]


def test_signature_check_sees_a_missing_parameter():
    import pplfast

    params = [n for n, _, _ in real_params("pplfast.token_stats")]
    assert params[:2] == ["logits", "targets"] and "top_k" in params
    assert real_params("pplfast.Perplexity.update")[0][0] == "logits"  # self dropped
    assert [n for n, _, _ in real_params("pplfast.CorpusScorer")][:2] == ["model", "tokenizer"]
    assert pplfast.token_stats is resolve("pplfast.token_stats")


def test_name_check_can_fail(broken_doc):
    problems = name_problems(broken_doc)
    assert len(problems) == 2, problems
    assert "pplfast.no_such_function" in problems[0]
    assert "pplfast.corpus.no_such_module" in problems[1]


def test_flag_check_can_fail(broken_doc):
    problems = flag_problems(broken_doc)
    assert any("--strid is not an option of pplfast score" in p for p in problems), problems
    assert any("pplfast frobnicate is not a command" in p for p in problems), problems
    assert any("--windowz is not an option of pplfast filter" in p for p in problems), problems
    assert any("--no-such-flag is not an option of pplfast score" in p for p in problems)
    assert len(problems) == 4, problems  # --window (score), --model, --input, --max-perplexity
    # outside a command's section a flag must belong to some command
    page = broken_doc.with_name("loose.md")
    page.write_text("# Loose\n\n`--window` and `--per-document`, `--no-such-flag`\n")
    assert flag_problems(page) == ["loose.md:3: --no-such-flag is not an option of any pplfast "
                                   "command"]


def test_path_check_can_fail(broken_doc):
    problems = path_problems(broken_doc)
    line = BROKEN.splitlines().index("Files: `pplfast/api.py`, `pplfast/no_such_file.py`.") + 1
    assert problems == [f"broken.md:{line}: pplfast/no_such_file.py does not exist"], problems
