"""
Llama (Touvron et al. 2023, "LLaMA" and "Llama 2"; Llama 3 team 2024, "The Llama 3 Herd of Models"), in one file.

Differences from GPT-2, each a few lines below: RMSNorm instead of LayerNorm, rotary position embeddings
(RoPE, Su et al. 2021) instead of learned ones, with Llama 3's optional rescaling of the low frequencies
for long context; grouped-query attention (GQA, Ainslie et al. 2023): n_head query heads share n_kv_head
key/value heads, so the KV cache shrinks by n_head / n_kv_head; a SwiGLU feed-forward (Shazeer 2020); no
biases anywhere; input embedding and output head tied or not. Loads and saves the Hugging Face
LlamaForCausalLM layout (config.json + model.safetensors).

The model contract every gaia model file follows is written in README.md ("The model contract").
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 32000   # train.py sets this from the tokenizer
    block_size: int = 256     # maximum context length (max_position_embeddings in HF)
    n_layer: int = 4
    n_head: int = 4           # query heads
    n_kv_head: int = 2        # key/value heads: n_head is MHA, a divisor of n_head is GQA, 1 is MQA
    n_embd: int = 128
    intermediate_size: int = 0     # SwiGLU hidden width; 0 means Meta's rule from multiple_of, ffn_dim_multiplier
    multiple_of: int = 32          # Meta's rule rounds the hidden width up to a multiple of this (256 in Llama 2)
    ffn_dim_multiplier: float = 1.0  # Meta's rule scales 2/3 * 4 * n_embd by this (1.3 in Llama 3 8B)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0    # RoPE base (500000 in Llama 3)
    rope_factor: float = 1.0       # Llama 3 frequency scaling; 1.0 = plain RoPE, Llama 3.1 uses 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192  # context length the unscaled model was trained at
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B tie the head to the embedding, the larger ones do not
    dropout: float = 0.0           # Llama trains without; kept as a key like every gaia model


def swiglu_hidden_dim(config):
    """Width of the SwiGLU hidden layer: intermediate_size if set, else Meta's rule (model.py): SwiGLU has three
    matrices instead of two, so 2/3 of GPT's 4 * n_embd keeps the parameter count, then scaled by
    ffn_dim_multiplier and rounded up to multiple_of (Llama 2 7B: 4096 -> 11008; Llama 3 8B: 4096 -> 14336)."""
    if config.intermediate_size:
        return config.intermediate_size
    hidden = int(2 * 4 * config.n_embd / 3)
    hidden = int(config.ffn_dim_multiplier * hidden)
    return config.multiple_of * ((hidden + config.multiple_of - 1) // config.multiple_of)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean and the bias. Computed in fp32,
    as Meta and HF do, because the mean of squares of bf16 activations loses too much."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(config, head_dim):
    """theta_i = rope_theta^(-2i / head_dim), i = 0 .. head_dim/2 - 1, the angle per position of pair i.
    With rope_factor != 1, Llama 3's scaling (Meta's apply_scaling): wavelengths shorter than
    original_max / high_freq_factor are kept, longer than original_max / low_freq_factor are stretched by
    rope_factor, and those in between are interpolated smoothly; the model then sees a longer context as
    the short one it was trained on, in its slow (position-carrying) frequencies only."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim/2,)
    if config.rope_factor == 1.0:
        return inv_freq
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at wavelen = old_len/low, 1 at old_len/high
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, (1 - smooth) * inv_freq / factor + smooth * inv_freq)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def apply_rotary_emb(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by the angle pos * theta_i, as in the RoPE paper
    and Meta's model.py (which writes it as a complex multiply). x: (B, T, heads, head_dim); cos, sin: (T, head_dim/2).
    Hugging Face pairs x[i] with x[i + head_dim/2] instead (rotate_half); from_pretrained/save_pretrained permute
    the rows of q_proj and k_proj between the two layouts, so the attention scores are the same."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, head_dim/2): broadcast over heads
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, heads, head_dim/2): even and odd dims of each pair
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
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
        q = apply_rotary_emb(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin)  # (B, T, n_head, hd)
        k = apply_rotary_emb(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin)  # (B, T, n_kv_head, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)                              # (B, T, n_kv_head, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        # Grouped-query attention: q has n_head heads, k and v n_kv_head, and each k/v head serves a group of
        # n_rep = n_head / n_kv_head consecutive query heads: query head h reads k/v head h // n_rep. With
        # n_head=8, n_kv_head=2: q (B, 8, T, hd), k, v (B, 2, T, hd); q heads 0-3 use k/v head 0, 4-7 head 1.
        # enable_gqa makes SDPA do that grouping itself (the same as k.repeat_interleave(n_rep, dim=1), HF's
        # repeat_kv), so neither this code nor the cache ever holds the repeated k, v.
        gqa = q.shape[1] != k.shape[1]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=gqa)
        else:
            k, v, mask = cache.update(layer, k, v)  # k, v: (B, n_kv_head, pos + T, hd), the whole prefix
            if T == 1 and gqa:
                # decoding one token: the n_rep query heads of a group see the same keys and no mask, so they are
                # n_rep queries of one head, (B, n_kv_head, n_rep, hd), and each cached k/v head is read once per
                # group instead of once per query head (on CPU, enable_gqa gains little from the sharing: README)
                y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, self.head_dim), k, v)
                y = y.reshape(B, -1, 1, self.head_dim)  # (B, n_head, 1, hd), query head h = group h // n_rep
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * hd): heads side by side again
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Meta calls gate, down, up w1, w2, w3."""

    def __init__(self, config):
        super().__init__()
        hidden = swiglu_hidden_dim(config)
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys (already rotated) and values of every layer, preallocated for the whole generation. It holds the
    n_kv_head heads only, never the repeated ones: 2 * n_layer * n_kv_head * head_dim * dtype_size bytes per
    token, n_head / n_kv_head times less than multi-head attention."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self):
        """Bytes of the allocated cache per token of one sequence."""
        return self.nbytes // (self.k.shape[1] * self.k.shape[3])

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
        c = config
        if c.n_embd % c.n_head != 0:
            raise ValueError(f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}; pick n_embd = n_head * head_dim")
        if c.n_kv_head < 1 or c.n_head % c.n_kv_head != 0:
            raise ValueError(f"n_head={c.n_head} is not divisible by n_kv_head={c.n_kv_head}: each key/value head "
                             f"serves a whole group of query heads; use n_kv_head in "
                             f"{[d for d in range(1, c.n_head + 1) if c.n_head % d == 0]}")
        head_dim = c.n_embd // c.n_head
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim = n_embd / n_head = {c.n_embd}/{c.n_head} = {head_dim} is odd; RoPE rotates pairs "
                             f"of dimensions, so change n_embd or n_head to make head_dim even")
        self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # cos and sin of every (position, pair) angle up to block_size, (block_size, head_dim/2); not saved
        angles = torch.outer(torch.arange(c.block_size).float(), rope_frequencies(c, head_dim))
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        # as GPT-2: the projections that write into the residual stream get std 0.02 / sqrt(2 * n_layer), so the
        # variance of the sum of 2 * n_layer of them does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, head_dim/2)
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        x = self.norm(x)
        if cache is not None:
            cache.pos += T
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
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter for the matmuls, plus attention's
        QK^T and AV, 2 * 2 * n_layer * seq_len * n_head * head_dim forward, times 3 with backward (PaLM paper,
        appendix B). GQA shrinks k_proj, v_proj and the cache, not these: every query head still attends."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

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

        plan = {"embed_tokens": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "layers.*.input_layernorm": SequenceParallel(use_local_output=True),
                "layers.*.self_attn": gather(5),  # (x, cos, sin, cache, layer)
                "layers.*.post_attention_layernorm": SequenceParallel(use_local_output=True),
                "layers.*.mlp": gather(1),
                "norm": SequenceParallel(use_local_output=True),
                "lm_head": gather(1)}
        plan.update({f"layers.*.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        plan.update({"layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                     "layers.*.mlp.gate_proj": ColwiseParallel(), "layers.*.mlp.up_proj": ColwiseParallel(),
                     "layers.*.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))})
        return plan

    # ---------------------------------------------------------------- generation with a KV cache

    def make_cache(self, batch, max_len):
        """An empty KV cache for batch sequences of up to max_len tokens, n_kv_head heads per layer."""
        c = self.config
        param = self.lm_head.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.n_embd // c.n_head, param.device, param.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        c = self.config
        max_len = min(idx.shape[1] + max_new_tokens, c.block_size)
        cache = self.make_cache(idx.shape[0], max_len)
        logits, _ = self(idx[:, -c.block_size:], cache=cache)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if cache.pos == max_len:
                # the context is full: the window slides and the prefix is recomputed from position 0, since the
                # cached keys were rotated for their old positions and block_size is the largest one trained
                cache.pos = 0
                logits, _ = self(idx[:, -c.block_size:], cache=cache)  # nanoGPT's crop: the last block_size tokens
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face LlamaForCausalLM directory (config.json + model.safetensors)."""
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"{path} holds a {hf.get('model_type')!r} model, not llama; use the matching gaia model "
                             f"or a LlamaForCausalLM checkpoint")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not SwiGLU's silu; gaia's llama.py supports silu only")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{flag}=True: gaia's llama.py has no biases (as Llama); load it with transformers")
        C, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, C // n_head):
            raise ValueError(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = {C // n_head}; "
                             f"gaia's llama.py derives head_dim from n_embd / n_head")
        # transformers >= 5 writes rope_parameters (holding rope_theta); 4.x wrote rope_theta and rope_scaling
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by gaia's llama.py")
        config = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                        n_layer=hf["num_hidden_layers"], n_head=n_head,
                        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=C,
                        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                        tie_word_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0)
        if rope_type == "llama3":
            config.rope_factor = rope["factor"]
            config.rope_low_freq_factor = rope["low_freq_factor"]
            config.rope_high_freq_factor = rope["high_freq_factor"]
            config.rope_original_max_position_embeddings = rope.get("original_max_position_embeddings", config.block_size)
        elif rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r}: gaia's llama.py implements plain RoPE and Llama 3 scaling only")
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)
        state = load_file(os.path.join(path, "model.safetensors"))
        state = {k.removeprefix("model."): v for k, v in state.items()}
        hd = config.n_embd // config.n_head
        for k in state:
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                state[k] = _rope_rows_hf_to_pairs(state[k], hd)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as embed_tokens, when a writer saved both
        missing, unexpected = model.load_state_dict(state, strict=False)
        if config.tie_word_embeddings:
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path} does not match Llama's layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face LlamaForCausalLM directory: transformers' from_pretrained loads it."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        c = self.config
        hd = c.n_embd // c.n_head
        state = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight" and c.tie_word_embeddings:
                continue  # HF re-ties it to embed_tokens
            v = v.detach().float().cpu()
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                v = _rope_rows_pairs_to_hf(v, hd)
            state[k if k.startswith("lm_head") else "model." + k] = v.contiguous()
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        rope = dict(rope_type="default", rope_theta=c.rope_theta)
        if c.rope_factor != 1.0:
            rope.update(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                        high_freq_factor=c.rope_high_freq_factor,
                        original_max_position_embeddings=c.rope_original_max_position_embeddings)
        hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
                  hidden_size=c.n_embd, intermediate_size=swiglu_hidden_dim(c), num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=hd, hidden_act="silu",
                  max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_parameters=rope,
                  attention_bias=False, mlp_bias=False, attention_dropout=c.dropout,
                  tie_word_embeddings=c.tie_word_embeddings, initializer_range=0.02, dtype="float32",
                  bos_token_id=None, eos_token_id=None)
        if c.vocab_size > 50256:  # the GPT-2 tokenizer's <|endoftext|>, which train.py's gpt2 tokenizer uses
            hf.update(bos_token_id=50256, eos_token_id=50256)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


# RoPE layouts. Here (as in Meta's checkpoints) the rotated pairs of a head are adjacent dims (2i, 2i+1); in HF's
# they are (i, i + head_dim/2). Only q and k get rotated, and a permutation of the dims within each head, the same
# for q and k, leaves every q.k dot product unchanged, so converting is permuting the rows of q_proj and k_proj:
# row p * head_dim/2 + i of a head in HF (p = 0 or 1, the first or second member of pair i) is row 2i + p here.

def _rope_rows_hf_to_pairs(w, head_dim):
    out_features, in_features = w.shape  # (heads * head_dim, n_embd)
    return w.view(-1, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _rope_rows_pairs_to_hf(w, head_dim):
    out_features, in_features = w.shape
    return w.view(-1, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


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
