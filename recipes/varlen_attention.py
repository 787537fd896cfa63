"""`attn_implementation: sdpa_varlen` - packed (padding-free) batches at the cost of their documents, with plain SDPA.

TRL's padding-free collator flattens a packed batch into one row and passes the document boundaries as
`cu_seq_lens_q`. flash_attention_2/3 take those boundaries; transformers' `sdpa` and `eager` instead build one
block-diagonal mask over the whole row and compute attention over all of it, masked part included, so a flattened
batch of B documents of length n costs (B n)^2 instead of B n^2 and packing's saving on padding is lost (measured in
docs/BENCHMARKS.md). This function puts the documents side by side and runs one causal SDPA call over them - the cost
of B documents of length n, with no mask - wherever flash-attn is not available (CPU, GPUs without a flash-attn build). Without `cu_seq_lens_q`
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
    # Documents side by side in a (documents, heads, longest, dim) batch, right-padded: under a causal mask a real
    # query only sees keys at or before it, all in its own document, so one unmasked SDPA call needs no mask at all.
    lengths = cu_seq_lens.diff().tolist()  # one host sync per layer; the collator built it on the CPU anyway
    if sum(lengths) != query.shape[2]:  # positions after the last document (pad_to_multiple_of): their own document
        lengths.append(query.shape[2] - sum(lengths))
    n_docs, longest = len(lengths), max(lengths)
    slot = torch.cat([torch.arange(n, device=query.device) + i * longest for i, n in enumerate(lengths)])

    def to_docs(x):
        heads, dim = x.shape[1], x.shape[3]
        docs = x.new_zeros(heads, n_docs * longest, dim).index_copy(1, slot, x[0])
        return docs.view(heads, n_docs, longest, dim).transpose(0, 1)

    out = torch.nn.functional.scaled_dot_product_attention(
        to_docs(query), to_docs(key), to_docs(value), dropout_p=dropout, is_causal=True, scale=scaling
    )  # (documents, heads, longest, dim)
    out = out.transpose(0, 1).reshape(out.shape[1], n_docs * longest, out.shape[3]).index_select(1, slot)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None  # (1, length, heads, dim), as transformers' sdpa


def register():
    """Make `attn_implementation="sdpa_varlen"` loadable (idempotent). The mask is sdpa's, for the unpacked path."""
    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
