"""`pplfast eval`: lm-eval's command line with the pplfast model, as a user runs it; the model
directory, tokenizer and pplfast_backend= checked before lm-eval loads anything, each mistake one
line (the model itself: tests/models/test_lm_eval.py)."""
import os
import subprocess
import sys

import pytest

from builders import build_model, local_task, save_tiny_llama, train_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONTEXT = 48
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_llama(root, context=CONTEXT)
    return root


def test_pplfast_eval_command(saved):
    tasks = local_task(saved)
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "eval", "--model_args",
         f"pretrained={saved / 'model'},dtype=float32,backend=causal,pplfast_backend=cpu",
         "--device", "cpu", "--tasks", "pplfast_local_text", "--include_path", str(tasks),
         "--batch_size", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pplfast" in proc.stdout and "word_perplexity" in proc.stdout
    assert "Loading weights" not in proc.stderr  # transformers' bar is silenced, as in score


def test_eval_missing_model_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "pplfast.cli", "eval", "--model_args",
         f"pretrained={missing},dtype=float32", "--tasks", "wikitext"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr == f"pplfast eval: error: model directory '{missing}' does not exist\n"


@pytest.mark.parametrize("model_args", [
    ["--model_args", "pretrained={dir},dtype=float32"],
    ["--model_args=dtype=float32,pretrained={dir}"],
    ["-a", "dtype=float32", "pretrained={dir}"],
    ["--model_args", '{{"pretrained": "{dir}", "dtype": "float32"}}'],
])
def test_eval_checks_the_model_directory(tmp_path, capsys, model_args):
    from argparse import Namespace

    from pplfast.cli import eval as eval_cli

    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(dir=empty) for a in model_args] + ["--tasks", "wikitext"]
    assert eval_cli.run(Namespace(lm_eval_args=args)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"pplfast eval: error: model directory '{empty}' has no config.json")


def parse(argv, monkeypatch):
    """``argv`` as ``pplfast eval`` hands it to lm-eval's own parser."""
    from lm_eval._cli import HarnessCLI

    from pplfast.cli.eval import lm_eval_argv

    monkeypatch.setattr(sys, "argv", ["lm-eval", *lm_eval_argv(argv)])
    return HarnessCLI().parse_args()


def test_eval_model_check_scope(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from pplfast.cli.eval import check_model
    from pplfast.models.loading import ModelLoadError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelLoadError, match="model directory './b' does not exist"):
        # the last one given wins, as lm-eval merges them
        check_model(parse(["--model_args", "pretrained=./a,dtype=float32", "--model_args",
                           "pretrained=./b", "--tasks", "x"], monkeypatch))
    check_model(parse(["--model_args", "pretrained=gpt2", "--tasks", "x"], monkeypatch))  # hub
    check_model(parse(["--model", "vllm", "--model_args", "pretrained=./none"], monkeypatch))
    check_model(parse(["ls", "tasks"], monkeypatch))
    with pytest.raises(ValueError, match="pplfast_backend must be one of .*, got 'gpu'"):
        check_model(parse(["-a", "pplfast_backend=gpu", "--tasks", "x"], monkeypatch))
    check_model(parse(["-M", "hf", "-a", "pplfast_backend=gpu", "--tasks", "x"], monkeypatch))
    with pytest.raises(ValueError, match="backend= is lm-eval's model type"):
        check_model(parse(["-a", "pretrained=gpt2", "backend=cpu", "--tasks", "x"], monkeypatch))
    # owner/name: a hub id, unless the cache lacks it and owner is a local folder
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="model directory 'models/x' does not exist"):
        check_model(parse(["-a", "pretrained=models/x", "--tasks", "x"], monkeypatch))
    check_model(parse(["-a", "pretrained=owner/x", "--tasks", "x"], monkeypatch))
    (tmp_path / "cache" / "models--models--x").mkdir(parents=True)
    check_model(parse(["-a", "pretrained=models/x", "--tasks", "x"], monkeypatch))
    # offline: a hub id must be in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_model(parse(["-a", "pretrained=models/x", "--tasks", "x"], monkeypatch))
    with pytest.raises(ModelLoadError, match="'owner/x' is neither a local directory nor in"):
        check_model(parse(["-a", "pretrained=owner/x", "--tasks", "x"], monkeypatch))
    with pytest.raises(ModelLoadError, match="tokenizer directory './tok' does not exist"):
        check_model(parse(["-a", "pretrained=models/x", "tokenizer=./tok", "--tasks", "x"],
                          monkeypatch))


def test_eval_argv():
    from pplfast.cli.eval import lm_eval_argv

    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "pplfast", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf"]) == ["run", "--model", "hf"]
    assert lm_eval_argv(["-M", "hf", "--tasks", "x"]) == ["run", "-M", "hf", "--tasks", "x"]
    assert lm_eval_argv(["--model=hf"]) == ["run", "--model=hf"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]


def run_eval(args, *, cwd=None, env=None):
    """``python -m pplfast eval ARGS``, as a user runs it: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "pplfast", "eval", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def test_eval_bad_pplfast_backend_is_one_line(saved):
    rc, out, err = run_eval(["--model_args", f"pretrained={saved / 'model'},pplfast_backend=gpu",
                             "--tasks", "wikitext"])
    assert (rc, out) == (1, "") and "Traceback" not in err, err[-3000:]
    assert err.splitlines() == ["pplfast eval: error: pplfast_backend must be one of ('auto', "
                                "'reference', 'cpu', 'triton', 'cuda'), got 'gpu'"]


def test_eval_model_without_tokenizer_is_one_line(tmp_path):
    tokenizer = train_tokenizer()
    build_model("llama", len(tokenizer), context=CONTEXT).save_pretrained(tmp_path / "bare")
    rc, out, err = run_eval(["--model_args", f"pretrained={tmp_path / 'bare'}",
                             "--tasks", "wikitext"])
    assert (rc, out) == (1, "") and "Traceback" not in err, err[-3000:]
    assert err.splitlines() == [
        f"pplfast eval: error: cannot load the tokenizer of '{tmp_path / 'bare'}': the directory "
        "has no tokenizer.json or tokenizer_config.json (save the tokenizer there with "
        "tokenizer.save_pretrained(dir))"]


def test_eval_missing_local_folder_is_said_at_once(tmp_path):
    """``models/x`` reads like a hub id ``owner/name``; with a local ``models`` folder beside it
    (and no such model in the Hugging Face cache) it is that folder's missing ``x``: said at
    once, not after the hub's connection retries. Offline, a name in neither place is refused
    at once too."""
    cache = tmp_path / "hf-home"
    (tmp_path / "models").mkdir()
    online = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(cache)}
    rc, out, err = run_eval(["--model_args", "pretrained=models/x", "--tasks", "wikitext"],
                            cwd=tmp_path, env=online)
    assert (rc, out) == (1, "") and "Traceback" not in err, err[-3000:]
    assert err == "pplfast eval: error: model directory 'models/x' does not exist\n"
    rc, out, err = run_eval(["--model_args", "pretrained=owner/name", "--tasks", "wikitext"],
                            cwd=tmp_path, env={**online, "HF_HUB_OFFLINE": "1"})
    assert (rc, out) == (1, "") and "Traceback" not in err, err[-3000:]
    assert err == ("pplfast eval: error: model 'owner/name' is neither a local directory nor in "
                   "the Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE)\n")


def test_eval_model_lm_eval_cannot_load_is_one_line(saved, tmp_path):
    """A directory that passes the checks (config.json, a tokenizer) but holds no weights: the
    error comes from lm-eval's loading, as one line."""
    import shutil

    weightless = tmp_path / "weightless"
    shutil.copytree(saved / "model", weightless,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    rc, out, err = run_eval(["--model_args", f"pretrained={weightless},dtype=float32",
                             "--device", "cpu", "--tasks", "pplfast_local_text",
                             "--include_path", local_task(tmp_path)])
    assert (rc, out) == (1, "") and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith(f"pplfast eval: error: cannot load model '{weightless}': ")
