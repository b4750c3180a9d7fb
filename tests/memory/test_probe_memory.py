"""The probe that checks a model's body and output layer against its logits makes no float32
copy of the output layer (a 2 GB copy for Llama-3-8B): its extra peak memory, measured in a fresh
process (:mod:`memory_harness`), stays under half the bf16 layer, where the old probe's float32
GEMM (the live control) exceeds it."""
import os

import pytest

from memory_harness import in_child, peak_growth


def child(which):
    """In the child: the extra peak of the probe (``probe``) or of the float32 GEMM (``control``)
    on a bf16 output layer of 64 MiB."""
    import torch
    import torch.nn.functional as F

    from pplfast.models.head import Head, probe

    V, D = 32768, 1024  # a bf16 output layer of 64 MiB; its float32 copy would be 128 MiB

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, D, dtype=torch.bfloat16)

        def forward(self, input_ids):
            return self.embed(input_ids)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Body()
            self.lm_head = torch.nn.Linear(D, V, bias=False, dtype=torch.bfloat16)

        def forward(self, input_ids):
            return self.lm_head(self.body(input_ids))

    torch.manual_seed(0)
    model = LM().eval()
    head = Head(model.body, model.lm_head.weight, None, None, 1.0)
    ids = torch.randint(0, 64, (1, 16))
    run = {
        "probe": lambda: probe(model, head, ids),
        "control": lambda: F.linear(model.body(ids).float(), head.weight.float()),  # the old probe
    }[which]
    with torch.inference_mode():
        probe(model, head, ids[:, :2])  # load and warm up
        result, extra = peak_growth(run, strict=False)
    return {"extra": extra, "weight_bytes": V * D * 2,
            "why": result if isinstance(result, str) else None}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_probe_makes_no_float32_copy_of_the_output_layer():
    ours = in_child(__file__, "child", which="probe")
    assert ours["why"] is None  # body + head agree with the model
    bound = ours["weight_bytes"] // 2
    assert ours["extra"] <= bound, f"probe grew peak memory by {ours['extra'] / 2**20:.0f} MiB"
    control = in_child(__file__, "child", which="control")
    assert control["extra"] > bound, f"control stayed within the bound: {control}"
