"""`attn_implementation: sdpa_varlen` - packed (padding-free) batches at the cost of their documents, with plain SDPA.

TRL's padding-free collator flattens a packed batch into one row and passes the document boundaries as
`cu_seq_lens_q`. flash_attention_2/3 take those boundaries; transformers' `sdpa` and `eager` instead build one
block-diagonal mask over the whole row and compute attention over all of it, masked part included, so a flattened
batch of B documents of length n costs (B n)^2 instead of B n^2 and packing's saving on padding is lost (measured in
docs/BENCHMARKS.md). This function runs SDPA once per document with `is_causal=True` - the sum of per-document costs,
with no mask - wherever flash-attn is not available (CPU, GPUs without a flash-attn build). Without `cu_seq_lens_q`
(unpacked batches, generation, evaluation with padding) it is exactly transformers' `sdpa`.

    from varlen_attention import register; register()          # then load the model with
    AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_varlen")
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"


def sdpa_varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    packed = (
        cu_seq_lens is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no cache: every query sees only its own document
        and kwargs.get("cu_seq_lens_k") is not None
        and torch.equal(cu_seq_lens, kwargs["cu_seq_lens_k"])
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    bounds = cu_seq_lens.tolist()  # one host sync per layer; the collator built it on the CPU anyway
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, is_causal=True, scale=scaling
        )
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    if bounds[-1] < query.shape[2]:  # right padding after the last document (pad_to_multiple_of): attend to itself
        s = bounds[-1]
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:], key[:, :, s:], value[:, :, s:], is_causal=True, scale=scaling
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register():
    """Make `attn_implementation="sdpa_varlen"` loadable (idempotent). The mask is sdpa's, for the unpacked path."""
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
