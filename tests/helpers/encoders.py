"""PEFT's encoder and ours side by side: configs, identical pairs, index patterns, dtype-aware comparisons."""

import copy
import warnings

import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftEncoder

from ptfast import PromptEncoder


def peft_config(kind, nvt, dim, hidden, subs, **extra):
    return PeftConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=nvt,
        token_dim=dim,
        encoder_hidden_size=hidden,
        num_transformer_submodules=subs,
        encoder_reparameterization_type=kind,
        **extra,
    )


def fp64_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``encoder`` (the reference the tolerances are measured against); ``encoder`` is untouched."""
    return copy.deepcopy(encoder).double()


def make_pair(*args, dtype=torch.float32, **extra):
    """PEFT's encoder and ours from the same seed (so also a check that init matches)."""
    cfg = peft_config(*args, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1234)
        ref = PeftEncoder(cfg)
        torch.manual_seed(1234)
        ours = PromptEncoder(cfg)
    return ref.to(dtype), ours.to(dtype)


def index_patterns(n, batch):
    """The index tensors a caller can pass: PeftModel's expanded arange, a materialized repeat, random rows."""
    arange = torch.arange(n)
    return {
        "expanded-arange": arange.unsqueeze(0).expand(batch, -1),
        "repeated-arange": arange.repeat(batch, 1),
        "random": torch.randint(0, n, (batch, n + 3)),
        "permuted-short": torch.stack([torch.randperm(n)[: max(1, n - 2)] for _ in range(batch)]),
    }


def tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]


def assert_close_to_peft(ours, ref, fp64_ref, dtype):
    """Equal within the dtype's rounding: |ours - ref| small, and ours no further from fp64 than 2x PEFT is."""
    tol = tolerance(dtype)
    scale = fp64_ref.abs().max().item()
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    err_ours = (ours.double() - fp64_ref).abs().max().item()
    err_ref = (ref.double() - fp64_ref).abs().max().item()
    assert err_ours <= 2 * err_ref + tol * scale, (err_ours, err_ref)
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * scale)


def check_forward_and_grads(kind, nvt, dim, hidden, subs, batch):
    """Forward and every gradient of ours against PEFT and a float64 PEFT, over every index pattern."""
    ref, ours = make_pair(kind, nvt, dim, hidden, subs)
    ref64 = fp64_copy(ref)
    for name, idx in index_patterns(ours.total_virtual_tokens, batch).items():
        grad_out = torch.randn(*idx.shape, dim)
        outs, grads = [], []
        for enc in (ours, ref, ref64):
            enc.zero_grad(set_to_none=True)
            out = enc(idx)
            (out * grad_out.to(out.dtype)).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad for n, p in enc.named_parameters()})
        assert_close_to_peft(outs[0], outs[1], outs[2], torch.float32)
        for n in grads[1]:
            assert_close_to_peft(grads[0][n], grads[1][n], grads[2][n], torch.float32)


# ---------------------------------------------------------------------------------------------------- prefix tuning
def prefix_config(nvt, dim, layers, hidden=None, *, projection, **extra):
    """PEFT's ``PrefixTuningConfig`` for its ``PrefixEncoder`` (and ours)."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=nvt,
        token_dim=dim,
        num_layers=layers,
        encoder_hidden_size=hidden,
        prefix_projection=projection,
        **extra,
    )


def make_prefix_pair(*args, dtype=torch.float32, seed=1234, **extra):
    """PEFT's prefix encoder and ours from the same seed (so also a check that init matches)."""
    from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

    from ptfast import PrefixEncoder

    cfg = prefix_config(*args, **extra)
    torch.manual_seed(seed)
    ref = PeftPrefixEncoder(cfg)
    torch.manual_seed(seed)
    ours = PrefixEncoder(cfg)
    return ref.to(dtype), ours.to(dtype)


def forward_and_grads(encoder, indices, grad_out):
    """``encoder(indices)`` (detached) and every parameter's gradient of ``(out * grad_out).sum()``."""
    encoder.zero_grad(set_to_none=True)
    out = encoder(indices)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad for n, p in encoder.named_parameters()}
