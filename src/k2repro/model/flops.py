"""FLOPs per token for MFU: 6 * (non-embedding params) + attention's 12 * L * d * T
(PaLM appendix B; the same count torchtitan and nanoGPT use)."""

from __future__ import annotations


def n_params(m) -> int:  # noqa: ANN001 - schema.ModelConfig or ModelArgs
    """Exact parameter count of k2repro's LLaMA layout, without building the model."""
    head_dim = m.d_model // m.n_heads
    attn = m.d_model * (m.n_heads * head_dim) * 2 + m.d_model * (m.n_kv_heads * head_dim) * 2
    ffn = 3 * m.d_model * m.ffn_dim
    block = attn + ffn + 2 * m.d_model
    return m.n_layers * block + 2 * m.vocab_size * m.d_model + m.d_model


def flops_per_token(m, seq_len: int) -> float:  # noqa: ANN001
    """Training FLOPs per token (forward + backward)."""
    non_embed = n_params(m) - m.vocab_size * m.d_model  # the input embedding is a lookup
    return 6.0 * non_embed + 12.0 * m.n_layers * m.d_model * seq_len
