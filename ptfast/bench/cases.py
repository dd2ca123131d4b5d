"""What is measured: shapes, cases (mode x shape x batch x dtype), the named grids and the providers of a case.

Providers (what is timed; not every provider runs in every mode or on every device):

* ``peft``           PEFT's ``PromptEncoder``, eager: the reference.
* ``peft-graph``     the same eager PEFT calls replayed from a CUDA graph (CUDA only, no-grad modes): removes the
                     launch overhead PEFT pays, so the comparison with ptfast's kernels is fair at tiny shapes.
* ``peft-inference`` PEFT's path for an adapter in ``inference_mode`` (what ``PeftModel.from_pretrained`` gives by
                     default): ``PeftModel.get_prompt`` returns the saved table, ``embedding.weight.repeat(B, 1, 1)``,
                     with no MLP (no-grad modes). The fair baseline for ``ptfast-cached`` on a loaded adapter; ``peft``
                     is PEFT in its training configuration (evaluation during training, generation right after it).
* ``ptfast``         ``ptfast.PromptEncoder`` without its table cache (its backend as ``PTFAST_BACKEND`` says: under
                     ``auto`` eager on CPU and CUDA, ``triton`` for the kernels). In no-grad
                     modes the cache is dropped before every call, so each call is a cache miss.
* ``ptfast-cached``  ``ptfast.PromptEncoder`` with its cache (no-grad modes only): the steady state of inference.
* ``compile``        ``torch.compile(peft_encoder)``, default mode.
* ``compile-mat``    ``torch.compile(peft_encoder, mode="max-autotune-no-cudagraphs")`` (CUDA only).

Modes:

* ``infer``   ``encoder(indices)`` with grad disabled (once around each timing round, not per call); indices are
              ``arange(M)`` expanded to ``(B, M)``. ``peft-inference`` has no encoder call (PEFT's forward needs the
              MLP an inference-mode encoder lacks): its row is ``get_prompt``'s table path for the same ``(B, M)``.
* ``train``   forward + ``backward(grad_out)`` with a fixed random ``grad_out``; grads are reset (set to None)
              every call, for every provider.
* ``prompt``  the PeftModel prompt path, by recipe, no grad: ``encoder(tokens[:1]).repeat(B, 1, 1)`` then
              ``torch.cat((prompts, inputs_embeds), 1)``, as ``PeftModel.get_prompt`` +
              ``PeftModelForCausalLM.forward`` do.
* ``model``   the same path through a real ``PeftModelForCausalLM`` over a tiny random causal LM (built from a
              config, nothing downloaded): ``word_embeddings(input_ids)``, ``get_prompt(B)``, ``.to(dtype)``,
              ``torch.cat``. ptfast's row is a deep copy converted by ``ptfast.integrations.peft.patch``;
              ``peft-inference``'s is the adapter saved and loaded again with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PROVIDERS = ("peft", "peft-graph", "peft-inference", "ptfast", "ptfast-cached", "compile", "compile-mat")
MODES = ("infer", "train", "prompt", "model")
NO_GRAD_MODES = ("infer", "prompt", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SEQ_LEN = 128
#: The batch of the parity check (``ptfast.bench.report.parity``); the vocabulary of the model row's tiny Llama.
PARITY_BATCH = 2
TINY_LM_VOCAB = 512


class Unavailable(Exception):
    """This provider cannot run this case here (the message says why); callers skip it."""


@dataclass(frozen=True, order=True)
class Shape:
    """A prompt-encoder shape: M virtual tokens, token_dim D, encoder_hidden_size H."""

    M: int
    D: int
    H: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        parts = re.split(r"[x,:/]", text.strip().lower())
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape {text!r}: expected MxDxH with positive ints, e.g. 20x1024x128")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.M}x{self.D}x{self.H}"

    @property
    def label(self) -> str:
        return f"M{self.M}-D{self.D}-H{self.H}"

    @property
    def weight_elems(self) -> int:
        """Elements of the MLP head: ``Linear(D,H)``, ``Linear(H,H)``, ``Linear(H,D)`` with biases."""
        D, H = self.D, self.H
        return H * D + H + H * H + H + D * H + D


SEED_SHAPE = Shape(20, 1024, 128)
SHAPES = (SEED_SHAPE, Shape(20, 4096, 4096), Shape(100, 4096, 1024), Shape(20, 8192, 1024))
BATCHES = (1, 8)


@dataclass(frozen=True)
class Case:
    mode: str
    shape: Shape
    batch: int
    dtype: str = "fp32"
    seq_len: int = DEFAULT_SEQ_LEN

    @property
    def id(self) -> str:
        seq = f"-S{self.seq_len}" if self.mode in ("prompt", "model") else ""
        return f"{self.mode}-{self.shape.label}-B{self.batch}{seq}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def grid(
    name: str,
    device: str,
    *,
    shapes: Sequence[Shape] | None = None,
    batches: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> list[Case]:
    """The cases of a named grid, optionally narrowed.

    * ``quick``: the seed shape, batches 1 and 8, every mode, fp32 (the CLI default).
    * ``cpu``:   ``quick`` plus the three large shapes at batch 1 for ``infer`` and ``train`` (the pytest default on
                 CPU; the large shapes cost tens of ms per call there).
    * ``full``:  every shape x batch x mode (``model`` at the seed shape only), fp32 plus bf16 on CUDA.
    """
    cuda = device.startswith("cuda")
    if name not in ("quick", "cpu", "full"):
        raise ValueError(f"unknown grid {name!r}: use quick, cpu or full")
    default_dtypes = ("fp32", "bf16") if (cuda and name == "full") else ("fp32",)
    dtypes = tuple(dtypes or default_dtypes)
    modes = tuple(modes or MODES)
    batches = tuple(batches or BATCHES)
    if shapes is not None:
        shape_list = tuple(shapes)
    else:
        shape_list = (SEED_SHAPE,) if name == "quick" else SHAPES
    cases = []
    for dtype in dtypes:
        for shape in shape_list:
            for mode in modes:
                for batch in batches:
                    if shapes is None and shape != SEED_SHAPE:
                        if mode == "model":
                            continue  # the tiny LM's width grows with D; the prompt recipe covers large shapes
                        if name == "cpu" and (batch != 1 or mode not in ("infer", "train")):
                            continue
                    cases.append(Case(mode, shape, batch, dtype, seq_len))
    return cases


def providers_for(case: Case, device: str, *, compile: bool = True) -> list[str]:
    """The providers that apply to ``case`` on ``device`` (``compile=False`` drops the torch.compile baselines)."""
    cuda = device.startswith("cuda")
    out = ["peft"]
    if cuda and case.mode in ("infer", "prompt"):
        out.append("peft-graph")
    if case.mode in NO_GRAD_MODES:
        out.append("peft-inference")
    out.append("ptfast")
    if case.mode in NO_GRAD_MODES:
        out.append("ptfast-cached")
    if compile and case.mode != "model":
        out.append("compile")
        if cuda:
            out.append("compile-mat")
    return out


def footprint_bytes(case: Case, *, parity: bool = True) -> int:
    """A lower bound on the memory one case holds at its peak, in bytes; the CLI refuses a run that cannot fit.

    Counted: the embedding table and MLP head of PEFT's encoder and of ptfast's copy, with their gradients in
    ``train``; PEFT's activations on ``B*M`` rows (``H``, ``H`` and ``D`` wide) and the output, twice in ``train``
    (saved for backward, and ``grad_out``); ``inputs_embeds`` and the concatenated output in the prompt modes; the
    model row's token embeddings. With ``parity``: the parity check's encoders with gradients and its float64 copy
    with gradients, at batch 2. Allocator slack and torch.compile's workspace are not counted.
    """
    M, D, H, B = case.shape.M, case.shape.D, case.shape.H, case.batch
    es = DTYPES[case.dtype].itemsize
    params = case.shape.weight_elems + M * D
    passes = 2 if case.mode == "train" else 1
    nbytes = (2 * params + B * M * (D + 2 * H)) * es * passes
    if case.mode in ("prompt", "model"):
        nbytes += (B * case.seq_len * D + B * (M + case.seq_len) * D) * es
    if case.mode == "model":
        nbytes += 2 * TINY_LM_VOCAB * D * es
    if parity:
        check = 2 * 2 * params * es + 2 * params * 8 + PARITY_BATCH * M * (D + 2 * H) * (es + 8)
        nbytes = max(nbytes, check)
    return nbytes
