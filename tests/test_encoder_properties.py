"""Property test: any batch, any length, any in-range index pattern gives PEFT's output, cached or not."""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftEncoder

from ptfast import PromptEncoder


def _pair(kind, nvt, subs):
    cfg = PeftConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=nvt,
        token_dim=24,
        encoder_hidden_size=11,
        num_transformer_submodules=subs,
        encoder_reparameterization_type=kind,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftEncoder(cfg)
    return ref, PromptEncoder.from_peft(ref)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["MLP", "LSTM"]))
    nvt, subs = draw(st.integers(1, 9)), draw(st.integers(1, 2))
    batch, length = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    n = nvt * subs
    if draw(st.booleans()):  # PeftModel's pattern: every row the full arange
        indices = torch.arange(n).unsqueeze(0).expand(batch, -1)
    else:
        flat = draw(st.lists(st.integers(0, n - 1), min_size=batch * length, max_size=batch * length))
        indices = torch.tensor(flat).view(batch, length)
    return kind, nvt, subs, indices, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_any_index_pattern_matches_peft(case):
    kind, nvt, subs, indices, grad = case
    torch.manual_seed(nvt * 10 + subs)
    ref, ours = _pair(kind, nvt, subs)
    with torch.set_grad_enabled(grad):
        expected = ref(indices)
        for _ in range(2):  # the second call is served from the cache when grad is off
            torch.testing.assert_close(ours(indices), expected, rtol=1e-5, atol=1e-6)
