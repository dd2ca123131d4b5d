"""Correct ``generate`` for PEFT prompt-learning models: P-tuning, prompt tuning, multitask prompt tuning (virtual
tokens prepended as input embeddings) and prefix tuning / P-tuning v2 (the prefix as a key/value cache).

``ptfast.patch`` and ``ptfast.patch_peft`` give each patched ``PeftModel`` instance this ``generate`` where the
installed PEFT needs it (``peft_generate_is_broken(peft_type)``, a probe per method); the class and unpatched models
are left alone.

The bugs (seen with PEFT 0.21.2 + transformers 5.19 and 5.24) share one cause: transformers 5 renamed the model
argument ``past_key_values`` to ``cache``, and PEFT still reads and writes the old name.

* Virtual-token methods. ``PeftModelForCausalLM.prepare_inputs_for_generation`` decides whether to prepend the
  virtual tokens by looking for the KV cache under ``model_kwargs["past_key_values"]``; transformers 5.x returns it
  under ``"cache"``, so PEFT never sees a cache: it prepends the T virtual tokens again at *every* decode step (T+1
  new cache entries per step while the 2D attention mask grows by one). Positions, masks and the cache then disagree:
  wrong tokens (Llama, Qwen2), alibi shape errors (Bloom with padding), position-embedding IndexError (GPT-2 once
  past + 1 + T*(steps) exceeds n_positions).
* Prefix tuning. PEFT hands the prefix to the model as ``past_key_values`` next to the ``cache`` that generate made;
  transformers' ``deprecate_kwarg`` keeps ``cache`` and drops ``past_key_values`` when both are given, so the prefix
  is ignored (cached generate is the base model's, with the wrong attention mask). Without a cache, generate numbers
  the positions over the user's mask, not after the prefix as PEFT's forward does (left-padded rows differ), and
  Bloom fails on the alibi shape. Seq2seq models (T5) lose the prefix of the decoder's self-attention the same way
  with a cache; PEFT's ``use_cache=False`` path is correct there. PEFT's *forward* passes ``past_key_values`` alone,
  which transformers renames: training sees the prefix, only generation is wrong.

The fix for virtual tokens does what PEFT already does for seq2seq prompt learning: build the prompt once and let
transformers' own generation loop run on it. It calls the *base* model's ``generate`` with

    input_ids      = the user's ids              (bookkeeping; the returned sequences start with them, as PEFT's do;
                                                  logits processors such as repetition_penalty see them, as in PEFT)
    inputs_embeds  = cat(prompts, embed(input_ids))   (used at prefill only)
    attention_mask = cat(ones(B, T), mask)       (transformers appends a 1 per generated token)
    position_ids   = arange(T + L) per row       (only if the base forward takes them; PEFT's forward ignores
                                                  position ids, so the model uses its default, 0..T+L-1 even for
                                                  left-padded rows: this keeps generate identical to PEFT's forward
                                                  and training. OPT's default counts positions over the attention
                                                  mask instead, and so do we for it)

and converts an explicit ``max_length`` / ``min_length`` into ``max_new_tokens`` / ``min_new_tokens`` so the length
semantics stay PEFT's (counted on input_ids, virtual tokens not counted).

The fix for prefix tuning calls the base model's ``generate`` with the user's ``input_ids``, the attention mask
extended by T ones and (decoder-only) the positions PEFT's forward uses (T..T+L-1, or OPT's count over the mask),
while a forward pre-hook on the base model gives it PEFT's prefix (``get_prompt``, a fresh cache of the current,
beam-expanded batch size) under the argument name the model takes: at prefill when generate caches, at every step
when it does not (each step then re-runs the whole sequence over a fresh prefix, as PEFT's forward does).

Calls this fix does not cover go to PEFT's own ``generate`` unchanged: virtual-token methods with
``use_cache=False`` and on seq2seq models, prefix tuning on seq2seq models with ``use_cache=False`` (all correct in
PEFT), non-prompt-learning adapters, calls without ``input_ids``, assisted decoding, and calls inside
``disable_adapter()`` (where PEFT prepends nothing and generates as the base model). Prefix tuning refuses, with a
ValueError, what it cannot do right: a cache of the caller's (``cache`` / ``past_key_values``), a
``cache_implementation`` other than the dynamic cache, and a ``decoder_attention_mask``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import warnings

import torch

from ..config import peft_type_name
from .binding import bind_to_instance, unbind_from_instance

__all__ = [
    "generate_with_prompts",
    "patch_generate",
    "unpatch_generate",
    "peft_generate_is_broken",
    "EMBEDDING_TYPES",
    "PREFIX_TYPES",
    "FIXED_TYPES",
]

# Methods whose virtual tokens are prepended to the input embeddings, and methods whose prefix is a key/value cache.
EMBEDDING_TYPES = ("P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING")
PREFIX_TYPES = ("PREFIX_TUNING",)
FIXED_TYPES = EMBEDDING_TYPES + PREFIX_TYPES


def _peft_would_prepend(peft_model) -> bool:
    """Whether PEFT's own generate prepends the prompt now.

    PEFT prepends it in ``PeftModelForCausalLM.prepare_inputs_for_generation``. ``disable_adapter()`` sets
    ``_adapters_disabled`` and puts the base model's ``prepare_inputs_for_generation`` (and ``forward``) on the
    instance, so PEFT then generates exactly as the base model does; any other instance-level replacement of that
    hook is someone else's choice of what to prepend. Both cases are PEFT's generate to run.
    """
    if peft_model.__dict__.get("_adapters_disabled", False):
        return False
    prepare = peft_model.__dict__.get("prepare_inputs_for_generation")
    return prepare is None or getattr(prepare, "__func__", None) is type(peft_model).prepare_inputs_for_generation


def _handles(peft_model, args, kwargs):
    """Which fix takes the call over: ``"embeddings"``, ``"prefix"``, or None (PEFT's generate runs)."""
    cfg = peft_model.active_peft_config
    peft_type = peft_type_name(cfg)
    if not getattr(cfg, "is_prompt_learning", False) or peft_type not in FIXED_TYPES:
        return None
    if not _peft_would_prepend(peft_model):
        return None
    base = peft_model.get_base_model()
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    if seq2seq and peft_type not in PREFIX_TYPES:
        return None  # PEFT's seq2seq generate already passes inputs_embeds to the encoder: correct as is
    if len(args) > 1 or kwargs.get("inputs_embeds") is not None:
        return None
    if (args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))) is None:
        return None
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        return None  # assisted decoding re-feeds candidate tokens; not covered here
    use_cache = _setting(kwargs, base, "use_cache")
    use_cache = bool(getattr(base.config, "use_cache", True) if use_cache is None else use_cache)
    if peft_type in PREFIX_TYPES:
        # Decoder-only: PEFT is wrong with and without a cache. Seq2seq without a cache: PEFT is right.
        return "prefix" if use_cache or not seq2seq else None
    # Without a cache PEFT re-runs the whole prompt every step, which is correct: leave use_cache=False to PEFT.
    return "embeddings" if use_cache else None


def _setting(kwargs, base, name):
    """A generation setting as generate resolves it: kwarg, then generation_config=, then the model's config."""
    if name in kwargs:
        return kwargs[name]
    for cfg in (kwargs.get("generation_config"), base.generation_config):
        if cfg is not None and getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    return None


def _pad_mask(input_ids, kwargs, base):
    """transformers' rule for a missing attention mask: mask pad tokens if pad != eos and pads occur."""
    pad = _setting(kwargs, base, "pad_token_id")
    eos = _setting(kwargs, base, "eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(pad, int) and pad not in eos and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


@functools.cache
def _forward_takes(cls, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def generate_with_prompts(peft_model, *args, **kwargs):
    """``peft_model.generate(...)`` with the virtual tokens prepended once (or the prefix in the KV cache) and a
    correct cache.

    Same return value as PEFT's generate: for decoder-only models a LongTensor (or a ``GenerateDecoderOnlyOutput``)
    whose sequences are ``input_ids`` followed by the new tokens. Calls it does not cover go to PEFT's generate.
    """
    fix = _handles(peft_model, args, kwargs)
    if fix is None:
        return type(peft_model).generate(peft_model, *args, **kwargs)
    if fix == "prefix":
        return _generate_with_prefix(peft_model, args, kwargs)

    cfg = peft_model.active_peft_config
    base = peft_model.get_base_model()
    kwargs = dict(kwargs)
    input_ids = args[0] if args else kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs")
    kwargs.pop("input_ids", None)
    task_ids = kwargs.pop("task_ids", None)

    # PEFT's forward drops position_ids and token_type_ids for prompt learning (with a warning); so do we.
    for key in ("position_ids", "token_type_ids"):
        if kwargs.pop(key, None) is not None:
            warnings.warn(f"{key} are not supported for prompt learning; ignoring them (as PEFT does).")

    batch, length = input_ids.shape
    n_virtual = cfg.num_virtual_tokens
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = _pad_mask(input_ids, kwargs, base)
    mask = mask.to(input_ids.device)

    with torch.no_grad():
        embeds = peft_model.word_embeddings(input_ids)
        prompts = peft_model.get_prompt(batch_size=batch, task_ids=task_ids).to(embeds.dtype)
        inputs_embeds = torch.cat((prompts[:, :n_virtual], embeds), dim=1)
    attention_mask = torch.cat((mask.new_ones(batch, n_virtual), mask), dim=1)
    if _forward_takes(type(base), "position_ids"):
        kwargs["position_ids"] = _default_positions(base, attention_mask)

    # Length semantics: PEFT counts max_length / min_length on input_ids. transformers, given input_ids *and*
    # inputs_embeds of different lengths, would subtract the embeds' length instead; so pass new-token counts.
    _to_new_token_counts(kwargs, base.generation_config, length)

    return base.generate(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def _generate_with_prefix(peft_model, args, kwargs):
    """Prefix tuning: the base model's generate, with PEFT's prefix given to its forward as the cache (see the module
    docstring)."""
    cfg = peft_model.active_peft_config
    base = peft_model.get_base_model()
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    kwargs = dict(kwargs)
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"generate with a prefix-tuned model: {name}= is not supported; the prefix is the cache (ptfast "
                "builds it from the adapter at prefill). Leave it out."
            )
        kwargs.pop(name, None)
    implementation = _setting(kwargs, base, "cache_implementation")
    if implementation not in (None, "dynamic"):
        raise ValueError(
            f"generate with a prefix-tuned model: cache_implementation={implementation!r} is not supported; the "
            "prefix is a DynamicCache (PEFT's get_prompt). Use the default cache."
        )
    input_ids = args[0] if args else kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = kwargs.pop("inputs")
    kwargs.pop("input_ids", None)
    kwargs.pop("task_ids", None)  # prefix tuning has no tasks; PEFT's forward ignores them too
    n_virtual = cfg.num_virtual_tokens

    if seq2seq:
        if kwargs.get("decoder_attention_mask") is not None:
            raise ValueError(
                "generate with a prefix-tuned seq2seq model: decoder_attention_mask is not supported (the decoder's "
                "mask would need the prefix's T ones in front). Leave it out."
            )
        kwargs["input_ids"] = input_ids
    else:
        if kwargs.pop("token_type_ids", None) is not None:
            warnings.warn("token_type_ids are not supported for prompt learning; ignoring them (as PEFT does).")
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = _pad_mask(input_ids, kwargs, base)
        mask = mask.to(input_ids.device)
        attention_mask = torch.cat((mask.new_ones(input_ids.shape[0], n_virtual), mask), dim=1)
        positions = kwargs.pop("position_ids", None)
        if positions is not None:
            positions = positions + n_virtual  # PEFT's forward offsets the caller's positions by the prefix
        elif _forward_takes(type(base), "position_ids"):
            positions = _default_positions(base, attention_mask)  # the last L are the prompt's (sliced by generate)
        if positions is not None:
            kwargs["position_ids"] = positions
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask)

    cache_name = "cache" if _forward_takes(type(base), "cache") else "past_key_values"

    def give_prefix(module, fwd_args, fwd_kwargs):
        cache = fwd_kwargs.get(cache_name)
        fresh = fwd_kwargs.get("use_cache") is False  # no cache kept: every step re-runs the sequence
        if cache is None or fresh or cache.get_seq_length() == 0:
            rows = next(
                x
                for x in (
                    fwd_kwargs.get(k)
                    for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
                )
                if x is not None
            )
            fwd_kwargs[cache_name] = peft_model.get_prompt(batch_size=rows.shape[0], max_cache_len=-1)
        return fwd_args, fwd_kwargs

    # First of the pre-hooks, so that any other one sees the inputs the model gets.
    handle = base.register_forward_pre_hook(give_prefix, with_kwargs=True, prepend=True)
    try:
        return base.generate(**kwargs)
    finally:
        handle.remove()


# Decoder-only models whose forward, given no position_ids, numbers the positions by counting the attention mask
# (pads get -1): in the installed transformers' modeling code, OPT's decoder. Every other one starts at 0 (or the cache
# length) and counts every position, pads included.
_MASK_COUNTED_POSITIONS = ("opt",)


def _default_positions(base, attention_mask):
    """The positions ``base``'s forward uses at prefill when given none, as in PEFT's forward (which passes none)."""
    if getattr(base.config, "model_type", None) in _MASK_COUNTED_POSITIONS:
        mask = attention_mask.long()
        return mask.cumsum(1) * mask - 1
    batch, width = attention_mask.shape
    return torch.arange(width, device=attention_mask.device).unsqueeze(0).expand(batch, -1).contiguous()


def _to_new_token_counts(kwargs, model_cfg, length):
    """Rewrite an explicit max_length / min_length (kwarg, generation_config= object, or the model's config) as
    max_new_tokens / min_new_tokens, unless a new-token count is already set somewhere."""
    user_cfg = kwargs.get("generation_config")
    if user_cfg is not None:
        user_cfg = kwargs["generation_config"] = copy.deepcopy(user_cfg)
    for new_key, len_key in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if kwargs.get(new_key) is not None or any(
            getattr(c, new_key, None) is not None for c in (user_cfg, model_cfg) if c is not None
        ):
            continue
        if kwargs.get(len_key) is not None:
            kwargs[new_key] = max(kwargs.pop(len_key) - length, 0)
        elif user_cfg is not None and getattr(user_cfg, len_key, None):
            setattr(user_cfg, new_key, max(getattr(user_cfg, len_key) - length, 0))
            setattr(user_cfg, len_key, None)
        elif getattr(model_cfg, len_key, None):
            kwargs[new_key] = max(getattr(model_cfg, len_key) - length, 0)


def _patched_generate(self, *args, **kwargs):
    return generate_with_prompts(self, *args, **kwargs)


def _fixable_types(peft_model):
    """The PEFT types among the model's prompt-learning adapters that this module fixes (PEFT refuses to mix
    prompt-learning types on one model, so at most one)."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    return sorted({peft_type_name(c) for c in configs.values() if peft_type_name(c) in FIXED_TYPES})


def patch_generate(peft_model, *, force: bool = False) -> bool:
    """Give this PeftModel instance (only) the fixed ``generate``. No-op where PEFT already generates correctly for
    the model's prompt-learning method (``peft_generate_is_broken(peft_type)``), unless ``force``; and for seq2seq
    models unless they are prefix-tuned (PEFT's seq2seq path is correct for the virtual-token methods). Returns True
    if the instance was patched."""
    base = peft_model.get_base_model()
    if not hasattr(base, "generate"):
        return False
    types = _fixable_types(peft_model)
    if getattr(base.config, "is_encoder_decoder", False):
        types = [t for t in types if t in PREFIX_TYPES]
    if not types or not (force or any(peft_generate_is_broken(t) for t in types)):
        return False
    bind_to_instance(peft_model, "generate", _patched_generate)  # instance attribute: class untouched
    return True


def unpatch_generate(peft_model) -> None:
    """Give the instance PEFT's own ``generate`` back."""
    unbind_from_instance(peft_model, "generate", _patched_generate)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour detector
# ---------------------------------------------------------------------------------------------------------------


def _probe_config(peft_type: str, n_virtual: int):
    import peft

    common = dict(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual)
    if peft_type == "P_TUNING":
        return peft.PromptEncoderConfig(encoder_hidden_size=8, **common)
    if peft_type == "PROMPT_TUNING":
        return peft.PromptTuningConfig(**common)
    if peft_type == "MULTITASK_PROMPT_TUNING":
        return peft.MultitaskPromptTuningConfig(num_tasks=2, **common)
    if peft_type == "PREFIX_TUNING":
        return peft.PrefixTuningConfig(**common)
    raise ValueError(f"no generate probe for PEFT type {peft_type!r}; expected one of {FIXED_TYPES}")


@functools.cache
def _probe(peft_type: str, peft_version: str, transformers_version: str) -> bool:
    """Run PEFT's own generate once on a throwaway 1-layer Llama with a ``peft_type`` adapter; True if it is wrong.

    Checks, on a left-padded batch of 2 with 3 new tokens:
    - structure: correct KV-cached generation feeds the base model, at prefill, T+L positions over no cache (virtual
      tokens) or L positions over the T-long prefix (prefix tuning), then one position per decode step over a cache
      of T+L, T+L+1 (the PEFT 0.21.2 + transformers 5.x bugs re-feed the T virtual tokens at every step, or drop the
      prefix);
    - numbers: the per-step logits equal PEFT's own forward loop (prompt weights scaled so the prompts matter), with
      the cache, and for prefix tuning also without it (PEFT's uncached path is ours to replace there).
    A crash counts as broken. 0.2-0.5 s on 2 CPU cores (model build included); cached per (type, peft, transformers).
    """
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    n_virtual, length, steps = 3, 2, 3
    prefix = peft_type in PREFIX_TYPES
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
        model = get_peft_model(base, _probe_config(peft_type, n_virtual)).eval()
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                if p.dim() == 2 and p.shape[0] == n_virtual:  # the virtual-token embedding table
                    p.mul_(10)
    ids = torch.tensor([[0, 6], [7, 8]])
    mask = torch.tensor([[0, 1], [1, 1]])
    tasks = dict(task_ids=torch.zeros(2, dtype=torch.long)) if peft_type == "MULTITASK_PROMPT_TUNING" else {}
    seen = []

    def spy(module, args, kw):
        x = kw.get("inputs_embeds")
        if x is None:
            x = kw.get("input_ids")
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        seen.append((x.shape[1], past))

    def generate(use_cache):
        return type(model).generate(
            model,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=use_cache,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **tasks,
        )

    handle = base.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            outputs = [generate(True)]
            handle.remove()
            if prefix:
                outputs.append(generate(False))
            cur, mk, want_logits = ids, mask, []
            for _ in range(steps):
                want = model(input_ids=cur, attention_mask=mk, **tasks).logits[:, -1].float()
                want_logits.append(want)
                cur = torch.cat([cur, want.argmax(-1, keepdim=True)], 1)
                mk = torch.cat([mk, torch.ones_like(mk[:, :1])], 1)
            for out in outputs:
                if len(out.logits) != steps or not torch.equal(out.sequences, cur):
                    return True
                for got, want in zip(out.logits, want_logits):
                    if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
                        return True
    except Exception:
        return True
    finally:
        handle.remove()
    first = (length, n_virtual) if prefix else (n_virtual + length, 0)
    expected = [first] + [(1, n_virtual + length + i) for i in range(steps - 1)]
    return seen != expected


_probing = threading.local()


def peft_generate_is_broken(peft_type: str = "P_TUNING") -> bool:
    """True where the installed PEFT/transformers pair generates wrongly for the prompt-learning method ``peft_type``
    (one of ``FIXED_TYPES``: with a KV cache; for prefix tuning, with or without one)."""
    import peft
    import transformers

    if getattr(_probing, "active", False):
        # Asked again while the probe builds its model: under patch_peft, get_peft_model comes back here. The probe
        # calls PEFT's class-level generate, so its own model needs no answer.
        return False
    _probing.active = True
    try:
        return _probe(str(peft_type), peft.__version__, transformers.__version__)
    finally:
        _probing.active = False
