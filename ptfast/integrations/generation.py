"""KV-cached ``generate`` for P-tuned (and prompt-tuned) decoder-only PEFT models.

``ptfast.patch`` and ``ptfast.patch_peft`` give each patched ``PeftModel`` instance this ``generate`` where the
installed PEFT needs it (``peft_generate_is_broken``); the class and unpatched models are left alone.

The bug (seen with PEFT 0.21.2 + transformers 5.19 and 5.24): ``PeftModelForCausalLM.prepare_inputs_for_generation`` decides whether
to prepend the virtual tokens by looking for the KV cache under ``model_kwargs["past_key_values"]``. transformers 5.x
returns it under ``"cache"`` instead, so PEFT never sees a cache: it prepends the T virtual tokens again at *every*
decode step (T+1 new cache entries per step while the 2D attention mask grows by one). Positions, masks and the
cache then disagree: wrong tokens (Llama, Qwen2), alibi shape errors (Bloom with padding), position-embedding
IndexError (GPT-2 once past + 1 + T*(steps) exceeds n_positions).

The fix does what PEFT already does for seq2seq prompt learning: build the prompt once and let transformers'
own generation loop run on it. It calls the *base* model's ``generate`` with

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
semantics stay PEFT's (counted on input_ids, virtual tokens not counted). ``use_cache=False``, seq2seq models,
prefix tuning, non-prompt-learning adapters, calls without ``input_ids`` and calls inside ``disable_adapter()`` (where
PEFT prepends nothing and generates as the base model) go to PEFT's own ``generate`` unchanged.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import warnings

import torch

from .peft import bind_to_instance, peft_type_name, unbind_from_instance

__all__ = [
    "generate_with_prompts",
    "patch_generate",
    "unpatch_generate",
    "peft_generate_is_broken",
]

_FIXED_TYPES = ("P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING")


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


def _handles(peft_model, args, kwargs) -> bool:
    """Whether the call is one this fix takes over (everything else goes to PEFT's generate)."""
    cfg = peft_model.active_peft_config
    if not getattr(cfg, "is_prompt_learning", False) or peft_type_name(cfg) not in _FIXED_TYPES:
        return False
    if not _peft_would_prepend(peft_model):
        return False
    base = peft_model.get_base_model()
    if getattr(base.config, "is_encoder_decoder", False):
        return False  # PEFT's seq2seq generate already passes inputs_embeds to the encoder: correct as is
    if len(args) > 1 or kwargs.get("inputs_embeds") is not None:
        return False
    if (args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))) is None:
        return False
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        return False  # assisted decoding re-feeds candidate tokens; not covered here
    # Without a cache PEFT re-runs the whole prompt every step, which is correct: leave use_cache=False to PEFT.
    use_cache = _setting(kwargs, base, "use_cache")
    return bool(getattr(base.config, "use_cache", True) if use_cache is None else use_cache)


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


@functools.lru_cache(maxsize=None)
def _forward_takes(cls, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def generate_with_prompts(peft_model, *args, **kwargs):
    """``peft_model.generate(...)`` with the virtual tokens prepended once and a correct KV cache.

    Same return value as PEFT's generate for decoder-only models: a LongTensor (or a ``GenerateDecoderOnlyOutput``)
    whose sequences are ``input_ids`` followed by the new tokens. Calls it does not cover go to PEFT's generate.
    """
    if not _handles(peft_model, args, kwargs):
        return type(peft_model).generate(peft_model, *args, **kwargs)

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

    return base.generate(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
    )


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


def patch_generate(peft_model, *, force: bool = False) -> bool:
    """Give this PeftModel instance (only) the fixed ``generate``. No-op where PEFT already generates correctly,
    unless ``force``, and for models that are not decoder-only (PEFT's seq2seq path is correct). Returns True if the
    instance was patched."""
    base = peft_model.get_base_model()
    if getattr(base.config, "is_encoder_decoder", False) or not hasattr(base, "generate"):
        return False
    if not force and not peft_generate_is_broken():
        return False
    bind_to_instance(peft_model, "generate", _patched_generate)  # instance attribute: class untouched
    return True


def unpatch_generate(peft_model) -> None:
    """Give the instance PEFT's own ``generate`` back."""
    unbind_from_instance(peft_model, "generate", _patched_generate)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour detector
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _probe(peft_version: str, transformers_version: str) -> bool:
    """Run PEFT's own cached generate once on a throwaway 1-layer Llama with P-tuning; True if it is wrong.

    Two checks, on a left-padded batch of 2 with 3 new tokens:
    - structure: correct KV-cached generation feeds the base model T+L positions at prefill, then one position per
      decode step over a cache of T+L, T+L+1 (the PEFT 0.21.2 + transformers 5.x bug re-feeds the T virtual tokens
      at every step);
    - numbers: the per-step logits equal PEFT's own forward loop (prompt weights scaled so the prompts matter).
    A crash counts as broken. 0.2-0.5 s on 2 CPU cores (model build included); cached per (peft, transformers) pair.
    """
    from peft import PromptEncoderConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    n_virtual, length, steps = 3, 2, 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
            )
        )
        model = get_peft_model(
            base, PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual, encoder_hidden_size=8)
        ).eval()
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                if p.dim() == 2 and p.shape[0] == n_virtual:  # the virtual-token embedding table
                    p.mul_(10)
    ids = torch.tensor([[0, 6], [7, 8]])
    mask = torch.tensor([[0, 1], [1, 1]])
    seen = []

    def spy(module, args, kw):
        x = kw.get("inputs_embeds")
        if x is None:
            x = kw.get("input_ids")
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        seen.append((x.shape[1], past))

    handle = base.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = type(model).generate(
                model, input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
                return_dict_in_generate=True, output_logits=True,
            )
            handle.remove()
            cur, mk = ids, mask
            for step_logits in out.logits:
                want = model(input_ids=cur, attention_mask=mk).logits[:, -1].float()
                if not torch.allclose(step_logits.float(), want, rtol=1e-4, atol=1e-5):
                    return True
                cur = torch.cat([cur, want.argmax(-1, keepdim=True)], 1)
                mk = torch.cat([mk, torch.ones_like(mk[:, :1])], 1)
    except Exception:
        return True
    finally:
        handle.remove()
    expected = [(n_virtual + length, 0)] + [(1, n_virtual + length + i) for i in range(steps - 1)]
    return seen != expected or not torch.equal(out.sequences, cur)


_probing = threading.local()


def peft_generate_is_broken() -> bool:
    """True where the installed PEFT/transformers pair generates wrongly with a KV cache for P-tuning."""
    import peft
    import transformers

    if getattr(_probing, "active", False):
        # Asked again while the probe builds its model: under patch_peft, get_peft_model comes back here. The probe
        # calls PEFT's class-level generate, so its own model needs no answer.
        return False
    _probing.active = True
    try:
        return _probe(peft.__version__, transformers.__version__)
    finally:
        _probing.active = False
