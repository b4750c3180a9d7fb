"""The server's passes, in process: prefix-tree rows (grouping, masks, positions, shared reads)
and the engine over them, against each sequence run alone through the model's own logits."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from helpers import assert_nll_close  # noqa: E402
from builders import build_model  # noqa: E402

from pplfast.serve.engine import ModelEngine  # noqa: E402
from pplfast.serve.packing import (NO_TARGET, Pass, Row, Sequence, group_rows,  # noqa: E402
                                   pass_inputs, pass_reads, plan_passes)

V = 320
RTOL = 1e-5  # float32 passes against the float64 loss of the model's own logits


def seq(ids, *, stats=True, top_k=2, generate=True):
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids)
    positions = torch.arange(n if generate else n - 1)
    targets = ids[1:] if not generate else torch.cat([ids[1:], torch.tensor([NO_TARGET])])
    return Sequence(ids, positions, targets, stats=stats, top_k=top_k)


def random_ids(n, seed):
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_group_rows_maximises_shared_tokens():
    """Sorted, the four continuations of a long context sit next to a sequence that shares only
    a short system prefix with them: the best rows keep the long context shared (greedy growth
    from the first sequence would share the short prefix only)."""
    system = random_ids(10, 0)
    context = system + random_ids(40, 1)
    lone = Sequence(torch.tensor(system + [1, 2, 3]), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long))
    members = [seq(context + [4 + k, 9]) for k in range(4)]
    rows = group_rows([lone, *members], min_shared=8, max_row=1000)
    trees = [r for r in rows if r.is_tree]
    assert len(rows) == 2 and len(trees) == 1
    assert trees[0].prefix == 50 and set(map(id, trees[0].members)) == set(map(id, members))
    assert trees[0].length == 50 + 4 * 2
    # trees off, or too short a shared prefix, or rows over the limit: plain rows only
    assert all(not r.is_tree for r in group_rows(members, min_shared=0, max_row=1000))
    assert all(not r.is_tree for r in group_rows(members, min_shared=51, max_row=1000))
    assert all(not r.is_tree for r in group_rows(members, min_shared=8, max_row=53))
    assert [len(r.members) for r in group_rows(members, min_shared=8, max_row=54)] == [2, 2]


def test_plan_passes_respects_the_token_budget():
    seqs = [seq(random_ids(n, n)) for n in (30, 12, 25, 7, 19, 3)]
    passes = plan_passes(seqs, max_tokens=64)
    assert sorted(id(s) for p in passes for s in p.sequences) == sorted(map(id, seqs))
    for p in passes:
        assert p.tokens <= 64 or len(p.rows) == 1
        assert p.width == max(len(s) for s in p.sequences)
    widths = [p.width for p in passes]
    assert widths == sorted(widths, reverse=True)  # longest first, as score_model packs
    assert plan_passes([seq(random_ids(90, 1))], max_tokens=64)[0].tokens == 90  # alone


def test_tree_mask_and_positions():
    prefix = random_ids(9, 2)
    a, b = seq(prefix + [5, 6]), seq(prefix + [7, 8, 9])
    plain = seq(random_ids(4, 3))
    p = Pass([Row([a, b], 9), Row([plain], 4)])
    inputs = pass_inputs(p, torch.bool)
    T = 9 + 2 + 3
    assert inputs.ids.shape == (2, T) and inputs.attention_mask.shape == (2, 1, T, T)
    assert inputs.ids[0].tolist() == prefix + [5, 6, 7, 8, 9]
    assert inputs.position_ids[0].tolist() == list(range(11)) + [9, 10, 11]
    mask = inputs.attention_mask[:, 0]
    # b's first token (row position 11) sees the prefix and itself, not a's suffix
    assert mask[0, 11].tolist() == [True] * 9 + [False, False, True, False, False]
    assert mask[0, 13, 11:].tolist() == [True, True, True]
    assert mask[0, 10, :11].all() and not mask[0, 10, 11:].any()
    # the plain row is causal over its 4 tokens; its padding sees itself only
    assert mask[1, 3, :4].all() and not mask[1, 3, 4:].any()
    assert mask[1, 6].nonzero().flatten().tolist() == [6]
    additive = pass_inputs(p, torch.float32).attention_mask
    assert torch.equal(additive == 0, inputs.attention_mask)
    assert float(additive.min()) == torch.finfo(torch.float32).min
    # the prefix's reads are computed once, but for its last position, whose target differs
    reads = pass_reads(p)
    assert len(reads.stats_index) == 8 + 2 + 2 + 3 + 4 < len(a.positions) + len(b.positions) + 4


@pytest.fixture(scope="module")
def engines():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {kind: ModelEngine(kind, build_model(kind, V, context=128), None)
                for kind in ("llama", "gpt2", "gemma2")}


def alone(model, s: Sequence):
    """float64 NLL, argmax and log-probabilities of ``s`` from the model's own logits."""
    with torch.no_grad():
        logits = model(s.ids[None]).logits[0].double()
    logp = logits.log_softmax(-1)[s.positions]
    valid = s.targets >= 0
    nll = torch.full((len(s.positions),), math.nan, dtype=torch.float64)
    nll[valid] = F.nll_loss(logp[valid], s.targets[valid], reduction="none")
    return nll, logits[s.positions].argmax(-1), logp


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_tree_rows_equal_each_sequence_alone(engines, kind):
    engine = engines[kind]
    assert engine.tree is not None  # the probe accepts these bodies
    context = random_ids(30, 4)
    seqs = [seq(context + random_ids(n, 10 + n), top_k=3) for n in (1, 4, 2, 6)]
    seqs.append(seq(context[:12] + random_ids(5, 99), stats=False, top_k=0, generate=False))
    seqs.append(seq(random_ids(17, 5), top_k=1))
    passes = plan_passes(seqs, max_tokens=96, min_shared=8, max_row=engine.tree.max_row)
    assert any(r.is_tree for p in passes for r in p.rows)
    fed = sum(len(s) for s in seqs)
    assert sum(p.tokens for p in passes) < fed  # the shared context ran once
    for p in passes:
        engine.run(p)
    for s in seqs:
        nll, argmax, logp = alone(engine.model, s)
        scored = s.targets >= 0
        assert_nll_close(s.result["nll"][scored], nll[scored], rtol=RTOL)
        assert torch.isnan(s.result["nll"][~scored]).all()
        if s.stats:
            assert torch.equal(s.result["argmax"], argmax)
            top = logp.topk(s.top_k, -1)
            assert torch.equal(s.result["top_k_ids"], top.indices)
            assert_nll_close(s.result["top_k_logprobs"], top.values.float().double(), rtol=RTOL,
                             what="top_k_logprobs")
            assert_nll_close(s.result["max_logprob"], logp.max(-1).values, rtol=RTOL,
                             what="max_logprob")


def test_results_do_not_depend_on_the_rest_of_the_pass(engines):
    """One sequence alone, then padded among longer rows, then inside a tree row: the same
    numbers within float32 rounding."""
    engine = engines["llama"]
    ids = random_ids(20, 7)
    runs = []
    for others in ([], [random_ids(60, 8)], [ids[:15] + random_ids(9, 9)]):
        s = seq(ids, top_k=2)
        group = [s] + [seq(o) for o in others]
        for p in plan_passes(group, max_tokens=512, min_shared=8, max_row=512):
            engine.run(p)
        runs.append(s.result)
    for other in runs[1:]:
        assert_nll_close(other["nll"][:-1], runs[0]["nll"][:-1].double(), rtol=RTOL)
        assert torch.equal(other["argmax"], runs[0]["argmax"])


def test_a_body_that_ignores_positions_gets_no_trees():
    """The probe finds a body that drops position ids and custom masks: shared prefixes then run
    once per sequence, with a warning, and the numbers stay right."""
    import transformers as tf

    class Blind(tf.LlamaModel):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    plain = build_model("llama", V, context=128)
    model = tf.LlamaForCausalLM(plain.config).eval()
    model.model = Blind(plain.config)
    model.load_state_dict(plain.state_dict())
    model.eval()
    with pytest.warns(UserWarning, match="shared prefixes are run once per sequence"):
        engine = ModelEngine("blind", model, None)
    assert engine.tree is None
    context = random_ids(20, 11)
    seqs = [seq(context + [5 + k]) for k in range(3)]
    for p in plan_passes(seqs, max_tokens=256):
        assert not any(r.is_tree for r in p.rows)
        engine.run(p)
    for s in seqs:
        nll, argmax, _ = alone(plain, s)
        assert_nll_close(s.result["nll"][:-1], nll[:-1], rtol=RTOL)
        assert torch.equal(s.result["argmax"], argmax)


def test_a_model_scored_only_through_its_logits_is_refused():
    import transformers as tf

    from pplfast.serve.engine import ModelLoadError

    class Scaled(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    plain = build_model("llama", V, context=128)
    model = Scaled(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    with pytest.raises(ModelLoadError, match="without building its logits.*logits differ"):
        ModelEngine("scaled", model, None)
