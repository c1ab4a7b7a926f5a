"""Tiny configs of the supported architectures, built in code (no hub): used by the tests and the demo."""

import torch

ARCHS = ("gpt2", "llama", "qwen2", "gemma", "gemma2", "bert", "t5", "bart")
CAUSAL = ("gpt2", "llama", "qwen2", "gemma", "gemma2", "cohere", "granite")
SCALED = ("cohere", "granite")  # logit scaling quirks, tested for the loss only


def build(arch, vocab=96, seed=0, dtype=torch.float64, **overrides):
    """A small ``arch`` model (2 layers, hidden 32) with every dropout at 0, seeded, in ``dtype``."""
    import transformers as T

    dec = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        cls = T.GPT2LMHeadModel
    elif arch == "llama":
        cfg, cls = T.LlamaConfig(**dec), T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(**dec), T.Qwen2ForCausalLM
    elif arch == "gemma":
        cfg, cls = T.GemmaConfig(head_dim=8, **dec), T.GemmaForCausalLM
    elif arch == "gemma2":
        # A small cap so that the softcap really bends the logits of a tiny model.
        cfg = T.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=50.0, sliding_window=16,
                             query_pre_attn_scalar=8, **dec)
        cls = T.Gemma2ForCausalLM
    elif arch == "cohere":  # logits * logit_scale
        cfg, cls = T.CohereConfig(logit_scale=0.5, **dec), T.CohereForCausalLM
    elif arch == "granite":  # logits / logits_scaling
        cfg, cls = T.GraniteConfig(logits_scaling=4.0, **dec), T.GraniteForCausalLM
    elif arch == "bert":
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=0)
        cls = T.BertForMaskedLM
    elif arch == "t5":
        cfg = T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
        cls = T.T5ForConditionalGeneration
    elif arch == "bart":
        cfg = T.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           scale_embedding=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=2, forced_eos_token_id=None, tie_word_embeddings=True)
        cls = T.BartForConditionalGeneration
    else:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    if arch == "bart":
        # Zero at init; make it matter in the tests.
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    if arch == "bert":
        with torch.no_grad():
            model.cls.predictions.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return model.eval()


def batch(arch, model, batch_size=2, seq=9, seed=1):
    """Inputs with ``labels`` (some ignored) for ``model``'s task."""
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, v, (batch_size, seq), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    if arch == "bert":
        labels = torch.full_like(ids, -100)
        mask = torch.rand(ids.shape, generator=g) < 0.4
        mask[:, 1] = True
        labels[mask] = ids[mask]
        return {"input_ids": ids, "labels": labels}
    if arch in ("t5", "bart"):
        tgt = torch.randint(3, v, (batch_size, seq - 2), generator=g)
        tgt[1, -1] = -100
        return {"input_ids": ids, "labels": tgt}
    return {"input_ids": ids, "labels": labels}
