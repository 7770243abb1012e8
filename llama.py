"""
Llama (Touvron et al. 2023, "LLaMA" and "Llama 2"; Llama 3 team 2024, "The Llama 3 Herd of Models"), in one file.

Differences from GPT-2, each a few lines below: RMSNorm instead of LayerNorm, rotary position embeddings
(RoPE, Su et al. 2021) instead of learned ones, with Llama 3's optional rescaling of the low frequencies
for long context; grouped-query attention (GQA, Ainslie et al. 2023): n_head query heads share n_kv_head
key/value heads, so the KV cache shrinks by n_head / n_kv_head; a SwiGLU feed-forward (Shazeer 2020); no
biases anywhere; input embedding and output head tied or not. Loads and saves the Hugging Face
LlamaForCausalLM layout (config.json + safetensors, sharded or not).

The model contract every gaia model file follows is written in README.md ("The model contract").
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class Config:
    vocab_size: int = 32000   # train.py sets this from the tokenizer
    block_size: int = 256     # maximum context length (max_position_embeddings in HF)
    n_layer: int = 4
    n_head: int = 4           # query heads
    n_kv_head: int = 2        # key/value heads: n_head is MHA, a divisor of n_head is GQA, 1 is MQA
    n_embd: int = 128
    dropout: float = 0.0      # Llama trains without; kept as a key like every gaia model
    norm_eps: float = 1e-5
    intermediate_size: int | None = None  # SwiGLU hidden width; None: Meta's rule from the two keys below
    multiple_of: int = 32            # Meta's rule rounds the hidden width up to a multiple of this (256 in Llama 2)
    ffn_dim_multiplier: float = 1.0  # Meta's rule scales 2/3 * 4 * n_embd by this (1.3 in Llama 3 8B)
    rope_theta: float = 10000.0      # RoPE base (500000 in Llama 3)
    rope_factor: float = 1.0         # Llama 3 frequency scaling; 1.0 = plain RoPE, Llama 3.1 uses 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192  # context length the unscaled model was trained at
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B tie the head to the embedding, the larger ones do not

    def __post_init__(self):
        if self.vocab_size is not None and self.vocab_size < 1:  # train.py builds the Config with None, then sets it
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1")
        for key in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "multiple_of",
                    "rope_original_max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.n_head % self.n_kv_head:  # each key/value head serves a whole group of query heads
            *rest, last = [str(d) for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            options = f"{', '.join(rest)} or {last}" if rest else last
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; n_kv_head must divide "
                             f"n_head (e.g. {options})")
        if self.n_embd % (2 * self.n_head):  # head_dim = n_embd / n_head must be whole, and even: RoPE turns pairs
            problem = (f"is not divisible by n_head={self.n_head}" if self.n_embd % self.n_head else
                       f"/ n_head={self.n_head} = head_dim {self.head_dim} is odd, but RoPE turns pairs")
            step = 2 * self.n_head
            fixes = [f"--n_embd={max(step, self.n_embd - self.n_embd % step)}"]
            heads = [h for h in range(self.n_kv_head, self.n_embd // 2 + 1, self.n_kv_head) if self.n_embd % (2 * h) == 0]
            if heads:  # the head count nearest n_head that suits both n_embd and n_kv_head
                fixes.append(f"--n_head={min(heads, key=lambda h: (abs(h - self.n_head), -h))}")
            raise ValueError(f"n_embd={self.n_embd} {problem}; choose n_embd as a multiple of 2 * n_head "
                             f"(e.g. {' or '.join(fixes)})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); e.g. --dropout=0.1")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0 (it keeps 1/rms finite); e.g. --norm_eps=1e-5")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size={self.intermediate_size} must be >= 1, or None for Meta's rule "
                             f"from multiple_of and ffn_dim_multiplier")
        if not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ffn_dim_multiplier={self.ffn_dim_multiplier} must be > 0; e.g. --ffn_dim_multiplier=1.3")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0; e.g. --rope_theta=10000 (500000 in Llama 3)")
        if not self.rope_factor >= 1:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1 (1 is plain RoPE); e.g. --rope_factor=8")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
                             f"{self.rope_high_freq_factor} must satisfy 0 < low < high (the smoothed band lies "
                             f"between them); e.g. --rope_low_freq_factor=1 --rope_high_freq_factor=4")
        if self.intermediate_size is None:
            # Meta's rule (model.py): SwiGLU has three matrices instead of two, so 2/3 of GPT's 4 * n_embd keeps the
            # parameter count, then scaled by ffn_dim_multiplier and rounded up to multiple_of
            # (Llama 2 7B: 4096 -> 11008; Llama 3 8B: 4096 -> 14336)
            hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.n_embd / 3))
            self.intermediate_size = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean and the bias. Computed in fp32,
    as Meta and HF do, because the mean of squares of bf16 activations loses too much."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # weight * x / sqrt(mean(x^2) + eps), fp32 statistics


def rope_frequencies(config, dim):
    """inv_freq_i = rope_theta^(-2i / dim), i = 0 .. dim/2 - 1: the angle per position of pair i, (dim/2,).
    With rope_factor != 1, Llama 3's scaling (Meta's apply_scaling): wavelengths shorter than
    original_max / high_freq_factor are kept, longer than original_max / low_freq_factor are stretched by
    rope_factor, and those in between are interpolated smoothly; the model then sees a longer context as
    the short one it was trained on, in its slow (position-carrying) frequencies only."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
    if config.rope_factor == 1.0:
        return inv_freq
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at wavelen = old_len/low, 1 at old_len/high
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, (1 - smooth) * inv_freq / factor + smooth * inv_freq)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


# The rotation itself is kernels.rope(q, k, cos, sin): x cos + rotate_half(x) sin, pairs (i, i + dim/2) turning by
# angle pos * inv_freq[i]. This is HF's layout; the RoPE paper and Meta's code pair adjacent dims (2i, 2i+1) instead,
# which is the same model up to a permutation of the rows of q_proj and k_proj (the same for q and k, so every q.k is
# unchanged).


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        # separate q, k, v: each can be sharded by heads for tensor parallel (tp_plan); k and v are smaller
        # than q under GQA, n_kv_head * head_dim wide
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        # -1 heads, so a tensor-parallel shard sees only its own heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # float32 buffers; under autocast q and k are bf16
        q, k = kernels.rope(q, k, cos, sin)  # pairs (i, i + head_dim/2) turn by angle pos * inv_freq[i]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        # Grouped-query attention: q has n_head heads, k and v n_kv_head, and each k/v head serves a group of
        # n_rep = n_head / n_kv_head consecutive query heads: query head h reads k/v head h // n_rep. With
        # n_head=8, n_kv_head=2: q (B, 8, T, hd), k, v (B, 2, T, hd); q heads 0-3 use k/v head 0, 4-7 head 1.
        # enable_gqa makes SDPA do that grouping itself (the same as k.repeat_interleave(n_rep, dim=1), HF's
        # repeat_kv), so neither this code nor the cache ever holds the repeated k, v.
        if cache is None:
            y = kernels.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v, mask = cache.update(layer, k, v)  # k, v: (B, n_kv_head, pos + T, head_dim), the whole prefix
            y = cached_attention(q, k, v, mask)  # SDPA with enable_gqa; one-token decoding faster below the speed fence
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim): heads side by side again
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Meta calls gate, down, up w1, w2, w3."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x))))  # silu(gate) * up


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys (already rotated) and values of every layer, preallocated for the whole generation. It holds the
    n_kv_head heads only, never the repeated ones: n_head / n_kv_head times less than multi-head attention."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self):
        """Bytes the cache grows by per token of one sequence, over all layers:
        2 (k and v) * n_layer * n_kv_head * head_dim * dtype size."""
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        return 2 * n_layer * n_kv_head * head_dim * self.k.element_size()

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        # new query i (absolute position pos + i) may see keys 0 .. pos + i
        mask = None
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # cos and sin of every (position, pair) angle up to block_size, (block_size, head_dim): each of the
        # head_dim/2 frequencies twice, once per member of its pair (i, i + head_dim/2); computed once, not saved
        angles = torch.outer(torch.arange(config.block_size).float(), rope_frequencies(config, config.head_dim))
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # after the rest, so the random draws keep their order
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        """GPT-2's init, as nanoGPT (Meta's code leaves init to the trainer):
        | tensor                                           | init                                  |
        | transformer.wte, q/k/v_proj, gate/up_proj, lm_head | normal(0, 0.02)                     |
        | o_proj, down_proj (they write into the residual)   | normal(0, 0.02 / sqrt(2 * n_layer)),  |
        |                                                    | so the residual's variance does not   |
        |                                                    | grow with depth (in Model.__init__)   |
        | RMSNorm weights (ln_1, ln_2, ln_f)                 | 1                                     |
        | rope_cos, rope_sin                                 | buffers, computed from rope_theta     |"""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        cos = self.rope_cos[start:start + T, None]  # (T, 1, head_dim): the same angles for every head
        sin = self.rope_sin[start:start + T, None]
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is not None and not need_logits:  # the loss alone (training): the head and the loss fused
            loss = kernels.linear_cross_entropy(x, self.lm_head, targets)  # chunk by chunk, no (B, T, vocab) logits
            logits = None
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameters; by default without the input embedding table, a lookup that costs no FLOPs (when tied it
        is also the output head and counts)."""
        n = sum(p.numel() for p in self.parameters())  # a tied weight is listed once
        if non_embedding and not self.config.tie_word_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter for the matmuls, plus attention's
        QK^T and AV, 2 * 2 * n_layer * seq_len * n_head * head_dim forward, times 3 with backward (PaLM paper,
        appendix B). GQA shrinks k_proj, v_proj and the cache, not these: every query head still attends."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def tp_plan(self):
        """Tensor parallel (Megatron-LM) with sequence parallel (Korthikanti et al. 2022), as torchtitan runs
        Llama. Inside attention and the MLP, q, k, v and the SwiGLU gate/up are split by output rows (whole heads,
        whole hidden units per rank), o and down by input columns. Between them the residual stream and the
        RMSNorms are split along the sequence, so each rank stores 1/tp of those activations: an all-gather
        before each attention/MLP, a reduce-scatter after. Needs n_head, n_kv_head (not MQA) and
        intermediate_size divisible by the TP degree; the embedding and the head stay replicated."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                       RowwiseParallel, SequenceParallel)

        def gather(n_args):  # the first argument arrives split along the sequence; the module needs all of it
            return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                      desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
                                      use_local_output=True)

        return {"transformer.wte": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "transformer.h.*.ln_1": SequenceParallel(use_local_output=True),
                "transformer.h.*.attn": gather(5),  # (x, cos, sin, cache, layer)
                "transformer.h.*.attn.q_proj": ColwiseParallel(),
                "transformer.h.*.attn.k_proj": ColwiseParallel(),
                "transformer.h.*.attn.v_proj": ColwiseParallel(),
                "transformer.h.*.attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "transformer.h.*.ln_2": SequenceParallel(use_local_output=True),
                "transformer.h.*.mlp": gather(1),
                "transformer.h.*.mlp.gate_proj": ColwiseParallel(),
                "transformer.h.*.mlp.up_proj": ColwiseParallel(),
                "transformer.h.*.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
                "transformer.ln_f": SequenceParallel(use_local_output=True),
                "lm_head": gather(1)}

    # ---------------------------------------------------------------- generation with a KV cache

    def make_cache(self, batch, max_len):
        """An empty KV cache for batch sequences of up to max_len tokens, n_kv_head heads per layer."""
        c, param = self.config, self.lm_head.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, param.device, param.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        block_size = self.config.block_size
        max_len = min(idx.shape[1] + max_new_tokens, block_size)
        cache = self.make_cache(idx.shape[0], max_len)
        logits, _ = self(idx[:, -block_size:], cache=cache)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if cache.pos == max_len:  # the context is full: nanoGPT's crop, the last block_size tokens afresh
                cache = self.make_cache(idx.shape[0], max_len)
                logits, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    @classmethod
    def from_pretrained(cls, path):
        """A local Hugging Face directory (config.json + safetensors, sharded or not); interop below the fence."""
        return from_hf(path)

    def save_pretrained(self, path):
        to_hf(self, path)


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick the next token (B, 1) from logits (B, vocab): greedy at temperature 0, else softmax sampling
    restricted to the top_k most likely tokens and/or the smallest set whose probability exceeds top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep tokens until the mass before them passes top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# === speed: the same math, faster ===

def cached_attention(q, k, v, mask):
    """SDPA of q (B, n_head, T, hd) over the cached prefix k, v (B, n_kv_head, S, hd), with enable_gqa.
    Decoding one token under GQA, the n_rep query heads of a group see the same keys and no mask, so they are
    n_rep queries of one head, (B, n_kv_head, n_rep, hd): each cached k/v head is read once per group instead of
    once per query head (on the CPU, enable_gqa alone gains little from the sharing: README)."""
    B, n_head, T, head_dim = q.shape
    if T == 1 and n_head != k.shape[1]:
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, head_dim), k, v)
        return y.reshape(B, n_head, 1, head_dim)  # query head h = group h // n_rep
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_head != k.shape[1])


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
             "norm_eps": "rms_norm_eps", "intermediate_size": "intermediate_size",
             "tie_word_embeddings": "tie_word_embeddings"}
# the RoPE keys, inside config.json's rope_parameters (transformers >= 5) or rope_scaling (4.x, with rope_theta
# beside it); multiple_of and ffn_dim_multiplier only derive intermediate_size, which HF stores as is
HF_ROPE = {"rope_theta": "rope_theta", "rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
           "rope_high_freq_factor": "high_freq_factor",
           "rope_original_max_position_embeddings": "original_max_position_embeddings"}
HF_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight",
            "transformer.h.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
            "transformer.h.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
            "transformer.h.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
            "transformer.h.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
            "transformer.h.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
            "transformer.h.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
            "transformer.h.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
            "transformer.h.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
            "transformer.h.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
            "transformer.ln_f.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
# where another gaia file reads a checkpoint this one refuses
GAIA_FILES = {"gpt2": "gpt2", "mixtral": "moe", "qwen3_moe": "moe", "deepseek_v3": "mla", "mamba": "mamba",
              "mamba2": "mamba"}


def hf_names(n_layer):
    """HF_NAMES for every layer: gaia parameter -> HF tensor name."""
    return {ours.format(i=i): theirs.format(i=i) for ours, theirs in HF_NAMES.items() for i in range(n_layer)}


def read_safetensors(path):
    """Every tensor of a Hugging Face directory: model.safetensors, or each shard that
    model.safetensors.index.json lists in its weight_map (large checkpoints ship as several files)."""
    from safetensors.torch import load_file
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; a Hugging Face "
                         f"checkpoint in another format (pytorch_model.bin) must be re-saved as safetensors")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


def from_hf(path):
    """A Model from a local Hugging Face LlamaForCausalLM directory."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    t = hf.get("model_type", "llama")
    if t != "llama":
        fix = f"--model={GAIA_FILES[t]}" if t in GAIA_FILES else "a LlamaForCausalLM checkpoint"
        raise ValueError(f"{path} holds a {t!r} model, not llama; use {fix}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not SwiGLU's silu; gaia's llama.py supports silu only")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=True: gaia's llama.py has no biases (as Llama); load it with transformers")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads; gaia's llama.py "
                         f"derives head_dim from n_embd / n_head")
    # LlamaConfig's defaults where a config.json may leave a key out
    hf = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **hf}
    config = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items() if hf.get(theirs) is not None}
    config.setdefault("n_kv_head", config["n_head"])  # num_key_value_heads absent or null: multi-head attention
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_parameters") or hf.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by gaia's llama.py")
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_type={rope_type!r}: gaia's llama.py implements plain RoPE and Llama 3 scaling only")
    keys = HF_ROPE if rope_type == "llama3" else {"rope_theta": "rope_theta"}
    config.update({ours: rope[theirs] for ours, theirs in keys.items()})
    model = Model(Config(**config))  # dropout 0: how to train, not what the weights are (train.py's --dropout sets it)
    tensors = read_safetensors(path)
    names = hf_names(model.config.n_layer)
    if model.config.tie_word_embeddings:
        names["lm_head.weight"] = names["transformer.wte.weight"]  # one tensor, stored as embed_tokens
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        raise ValueError(f"{path} does not match Llama's layout: it lacks {missing[:3]}")
    model.load_state_dict({ours: tensors[theirs] for ours, theirs in names.items()})
    return model


def to_hf(model, path):
    """Write a Hugging Face LlamaForCausalLM directory (config.json + model.safetensors) that transformers loads."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    c, state = model.config, model.state_dict()
    names = hf_names(c.n_layer)
    if c.tie_word_embeddings:
        del names["lm_head.weight"]  # transformers ties it to embed_tokens again
    tensors = {theirs: state[ours].detach().float().cpu().contiguous() for ours, theirs in names.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_factor != 1.0:
        rope = {"rope_type": "llama3", **{theirs: getattr(c, ours) for ours, theirs in HF_ROPE.items()}}
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items()}
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=c.head_dim, hidden_act="silu",
              rope_parameters=rope, attention_bias=False, mlp_bias=False, attention_dropout=c.dropout,
              initializer_range=0.02, dtype="float32", bos_token_id=None, eos_token_id=None)
    if c.vocab_size > 50256:  # the GPT-2 tokenizer's <|endoftext|>, which train.py's gpt2 tokenizer uses
        hf.update(bos_token_id=50256, eos_token_id=50256)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
