"""The user's side of the API: one clear error for values that would give a wrong number
(the command line's side: tests/cli/test_user_side.py)."""
import numpy as np
import pytest
import torch

import pplfast
import pplfast.reference


# ---- the API: clear errors for values that would give a wrong number ---------------------------

@pytest.mark.parametrize("option,value", [("softcap", 1e39), ("softcap", 1e300),
                                          ("temperature", 1e39), ("temperature", 1e-300)])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_scale_outside_float32_range_is_refused(option, value, path):
    logits, targets = torch.randn(3, 11), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=f"{option} must lie in"):
        if path == "logits":
            pplfast.token_nll(logits, targets, **{option: value})
        else:
            pplfast.linear_token_nll(torch.randn(3, 4), torch.randn(11, 4), targets,
                                     **{option: value})


@pytest.mark.parametrize("box", [np.float32, np.float64, lambda v: torch.tensor(v)])
def test_numpy_scalars_and_0d_tensors_accepted(box):
    logits, targets = torch.randn(4, 13), torch.tensor([1, 2, -1, 3])
    want = pplfast.token_nll(logits, targets, ignore_index=-1, softcap=5.0, temperature=0.5)
    got = pplfast.token_nll(logits, targets, ignore_index=np.int64(-1) if box is not np.float32
                            else torch.tensor(-1), softcap=box(5.0), temperature=box(0.5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(ignore_index=2 ** 63), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(temperature=torch.ones(2)), TypeError, "temperature must be a number"),
])
def test_option_messages(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        pplfast.token_nll(torch.randn(2, 5), torch.tensor([0, 1]), **kwargs)


def test_float64_refused_with_the_way_out():
    with pytest.raises(TypeError, match=r"logits is float64.*logits\.float\(\).*pplfast\.reference"):
        pplfast.token_nll(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))


def test_meta_tensors_with_auto_do_not_suggest_auto():
    with pytest.raises(ValueError, match="meta device") as info:
        pplfast.token_nll(torch.randn(2, 5, device="meta"), torch.tensor([0, 1], device="meta"))
    assert "auto" not in str(info.value)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_with_zero_width_hidden(backend, with_bias):
    targets = torch.tensor([[1, 2], [3, -100]])
    bias = torch.randn(10) if with_bias else None
    got = pplfast.linear_token_nll(torch.randn(2, 2, 0), torch.randn(10, 0), targets, bias=bias,
                                   softcap=2.0, backend=backend)
    logits = (bias if with_bias else torch.zeros(10)).expand(2, 2, 10)
    want = pplfast.reference.token_nll(logits, targets, softcap=2.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


def test_update_nll_names_the_dtype():
    with pytest.raises(TypeError, match="torch.int64"):
        pplfast.Perplexity().update_nll(torch.tensor([1, 2]))
