"""Tiny Hugging Face models with random weights, built from configs (no downloads), for tests.

Every builder seeds torch first, so two calls with the same arguments give the same weights, and returns the model in
``eval()`` mode (no dropout), fp32, on CPU unless told otherwise. They are generic: nothing here knows about ptfast.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 128


def _finish(model, dtype, device):
    return model.to(device=device, dtype=dtype).eval()


def _llama_config(hidden_size: int, num_layers: int, vocab_size: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        **extra,
    )


def tiny_llama_causal_lm(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype=torch.float32,
    device="cpu",
):
    """A 2-layer ``LlamaForCausalLM`` (4 heads, 2 KV heads)."""
    from transformers import LlamaForCausalLM

    config = _llama_config(
        hidden_size, num_layers, vocab_size, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config), dtype, device)


def tiny_bloom_causal_lm(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype=torch.float32,
    device="cpu",
):
    """A 2-layer ``BloomForCausalLM`` (4 heads, tied embeddings, like bloomz)."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        n_layer=num_layers,
        n_head=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return _finish(BloomForCausalLM(config), dtype, device)


def tiny_t5_seq2seq(
    *,
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype=torch.float32,
    device="cpu",
):
    """A 2+2-layer ``T5ForConditionalGeneration`` (PEFT gives it ``num_transformer_submodules=2``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return _finish(T5ForConditionalGeneration(config), dtype, device)


def tiny_bert_seq_cls(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    num_labels: int = 3,
    dtype=torch.float32,
    device="cpu",
):
    """A 2-layer ``BertForSequenceClassification`` (no dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return _finish(BertForSequenceClassification(config), dtype, device)


def tiny_llama_seq_cls(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    num_labels: int = 3,
    dtype=torch.float32,
    device="cpu",
):
    """A 2-layer ``LlamaForSequenceClassification`` (pad token 0)."""
    from transformers import LlamaForSequenceClassification

    config = _llama_config(hidden_size, num_layers, vocab_size, num_labels=num_labels)
    torch.manual_seed(seed)
    return _finish(LlamaForSequenceClassification(config), dtype, device)


CAUSAL_LM_ARCHS = ("opt", "gpt2", "gptj", "llama", "qwen2", "gemma3")


def tiny_causal_lm(
    arch: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    dtype=torch.float32,
    device="cpu",
):
    """A 2-layer decoder-only LM of one of ``CAUSAL_LM_ARCHS`` (4 heads; pad 0, bos 1, eos 2): the architectures
    PEFT's own decoder tests use, at random weights."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "opt":
        config = tf.OPTConfig(
            hidden_size=hidden_size,
            ffn_dim=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden_size,
            dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
        cls = tf.OPTForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        cls = tf.GPT2LMHeadModel
    elif arch == "gptj":
        config = tf.GPTJConfig(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            rotary_dim=hidden_size // 8,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        cls = tf.GPTJForCausalLM
    elif arch == "llama":
        config = _llama_config(hidden_size, num_layers, vocab_size, bos_token_id=1, eos_token_id=2)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **ids,
        )
        cls = tf.Qwen2ForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            max_position_embeddings=256,
            sliding_window=16,
            **ids,
        )
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {CAUSAL_LM_ARCHS}")
    torch.manual_seed(seed)
    return _finish(cls(config), dtype, device)


def random_batch(batch_size: int, seq_len: int, *, vocab_size: int = VOCAB_SIZE, seed: int = 1234, device="cpu"):
    """``input_ids`` in ``[3, vocab_size)`` (no pad/bos/eos) and an all-ones ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g).to(device)
    return input_ids, torch.ones_like(input_ids)


def greedy_margin(step_logits) -> float:
    """The smallest top-1 minus top-2 logit gap over the steps (each ``(B, V)``) of a greedy run: how far its token
    choices are from a tie, i.e. what rounding differences between two implementations could flip."""
    return min(float(top[:, 0].sub(top[:, 1]).min()) for top in (step.topk(2, -1).values for step in step_logits))
