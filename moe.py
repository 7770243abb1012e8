"""
Sparse mixture-of-experts transformer (Mixtral, Jiang et al. 2024; Qwen3-MoE), in one file.

Nearest gaia model: llama.py. The attention half of each block is Llama's: RMSNorm, rotary position
embeddings, grouped-query attention (n_kv_head key/value heads shared by n_head query heads), optionally
with Qwen3's per-head RMSNorm of queries and keys (qk_norm). The feed-forward half is where they differ:
a sparse MoE layer instead of one SwiGLU MLP. A linear router scores n_experts SwiGLU experts, each token
goes to its top n_experts_per_tok of them (softmax first, then top-k, optionally renormalised:
norm_topk_prob), and the experts' outputs are summed with those weights.

Dispatch is dropless (no capacity factor, no token is ever dropped) and vectorised: the N*k
(token, expert) pairs are sorted by expert so every expert multiplies one contiguous slice of rows,
once, and index_add sums each token's k results back into its row. The experts' weights are stacked 3-D
parameters (n_experts, out, in), so wherever torch._grouped_mm runs (bf16 on recent CUDA GPUs, the CPU in
recent torch) the whole slice loop is one call; elsewhere it is a Python loop over experts, never tokens.

Two losses keep the router healthy, both added to the returned loss and averaged over layers:
- load balancing (Switch Transformer, Fedus et al. 2021, eq. 4-6): n_experts * sum_i f_i * P_i, with
  f_i = fraction of tokens that have expert i among their top k (the f_i sum to k, as transformers counts
  them, so an even routing scores k) and P_i = mean router probability of expert i; weight aux_loss_coef.
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(router_logits)^2,
  which keeps the router's logits small; weight z_loss_coef.
For a single layer the balancing loss equals transformers' load_balancing_loss_func. With several
layers transformers pools f and P over all layers before the product; gaia averages the per-layer
losses instead, so every layer is balanced on its own (one layer's imbalance cannot hide another's).

Loads and saves the Hugging Face MixtralForCausalLM (qk_norm=False) and Qwen3MoeForCausalLM (qk_norm=True)
layouts (interop at the end of the file).
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
    vocab_size: int = 50257      # train.py sets this from the tokenizer
    block_size: int = 256        # maximum context (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4              # query heads
    n_kv_head: int = 2           # key/value heads: = n_head is MHA, a divisor of it GQA, 1 is MQA
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3-MoE sets it explicitly)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    n_experts: int = 8
    n_experts_per_tok: int = 2   # k of top-k routing
    intermediate_size: int = 256  # hidden width of each SwiGLU expert
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities to sum to 1 (Mixtral always does)
    qk_norm: bool = False        # RMSNorm of each query/key head before RoPE (Qwen3-MoE)
    aux_loss_coef: float = 0.01  # Switch Transformer's load-balancing loss weight (their 1e-2)
    z_loss_coef: float = 0.001   # ST-MoE's router z-loss weight (their 1e-3)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "n_experts",
                    "n_experts_per_tok", "intermediate_size"):
            value = getattr(self, key)
            if value is not None and value < 1:  # None: vocab_size set by train.py, head_dim derived below
                raise ValueError(f"{key}={value} must be >= 1")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                near = min((d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0),
                           key=lambda d: (abs(d - self.n_head), -d))  # the divisor of n_embd nearest n_head
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose n_embd as a "
                                 f"multiple of n_head (e.g. --n_embd={self.n_embd // self.n_head * self.n_head or self.n_head} "
                                 f"or --n_head={near}), or set --head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; RoPE turns pairs of dimensions, so choose an even head_dim "
                             f"(n_embd / n_head, or --head_dim)")
        if self.n_head % self.n_kv_head:
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; n_kv_head must divide "
                             f"n_head (e.g. {', '.join(map(str, divisors[:-1]))} or {divisors[-1]})")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(f"n_experts_per_tok={self.n_experts_per_tok} is more than n_experts={self.n_experts}; each "
                             f"token picks n_experts_per_tok of the experts (e.g. --n_experts_per_tok={self.n_experts} "
                             f"or --n_experts={self.n_experts_per_tok})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); e.g. --dropout=0.1")
        for key in ("norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0; e.g. --{key}={getattr(Config, key)}")
        for key in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0 (0 turns that loss off); "
                                 f"e.g. --{key}={getattr(Config, key)}")


# Config fields that weight the training loss, not the weights: fine-tuning a Hugging Face checkpoint may set them
LOSS_WEIGHTS = ("aux_loss_coef", "z_loss_coef")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # weight * x / sqrt(mean(x^2) + eps), fp32 statistics


def rope_frequencies(config, dim):
    """Inverse frequencies (dim/2,) of plain RoPE (Su et al. 2021): pair i turns by pos * theta^(-2i/dim)."""
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# The rotation itself is kernels.rope(q, k, cos, sin): x cos + rotate_half(x) sin, pairs (i, i + dim/2) turning by
# angle pos * inv_freq[i].


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.n_rep = config.n_head // config.n_kv_head  # query heads per key/value head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        # -1 heads, so a tensor-parallel shard sees only its own heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # cos, sin (T, head_dim) -> (T, 1, head_dim): every head alike; in q's dtype (bf16 under autocast)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q, k = kernels.rope(q, k, cos, sin)  # pairs (i, i + head_dim/2) turn by angle pos * inv_freq[i]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, heads, T, head_dim)
        # GQA: query head h reads key/value head h // n_rep; kernels.attention and SDPA broadcast them, nothing copied
        if cache is None:  # flash attention on GPUs (kernels.py)
            y = kernels.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v, mask = cache.update(layer, k, v)  # the whole prefix, still n_kv_head heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_rep > 1)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.resid_dropout(self.o_proj(y))


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        E, C, I = config.n_experts, config.n_embd, config.intermediate_size
        self.router = nn.Linear(C, E, bias=False)
        # every expert's SwiGLU, stacked along dim 0 as (n_experts, out, in): expert e maps x to
        # down_proj[e] @ (silu(gate_proj[e] @ x) * (up_proj[e] @ x)) (Mixtral's w1, w3, w2)
        self.gate_proj = nn.Parameter(torch.empty(E, I, C))
        self.up_proj = nn.Parameter(torch.empty(E, I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))
        self.use_grouped_mm = None  # None: probed (speed fence); True/False forces a path (tests, benchmarks)
        self.load = None  # (E,) fraction of the last forward's routed tokens per expert (detached)

    def forward(self, x):
        """Returns the layer's output (B, T, C), its balancing loss and its router z-loss."""
        B, T, C = x.shape
        E, k = self.config.n_experts, self.config.n_experts_per_tok
        x = x.reshape(-1, C)  # (N, C), N = B * T tokens
        logits = self.router(x).float()  # (N, E); the softmax and its losses in fp32
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(k, dim=-1)  # (N, k) each
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # sort the N*k (token, expert) pairs by expert: each expert's rows become one contiguous slice
        pair_expert = experts.flatten()  # (N*k,), pair p is token p // k's (p % k)-th choice
        order = pair_expert.argsort(stable=True)  # sorted row r holds pair order[r]
        token = order // k  # (N*k,) the token of each sorted row
        counts = torch.bincount(pair_expert, minlength=E)  # (E,) rows per expert
        xs = x.index_select(0, token)  # (N*k, C) the tokens, grouped by expert
        # expert_matmul(rows, w, counts): the counts[e] rows of expert e times w[e].T, for every e (a loop over
        # experts or one grouped_mm, below the speed fence). Gate and up as two matmuls, not one fused (2I)-wide
        # one: its chunk's backward would copy a (N*k, 2I) gradient, where two matmuls' input gradients add up in
        # a (N*k, C) one (CPU: 3-11% faster per layer with 8 wide experts, even with 64 narrow ones)
        gate = expert_matmul(xs, self.gate_proj, counts, self.use_grouped_mm)  # (N*k, I)
        up = expert_matmul(xs, self.up_proj, counts, self.use_grouped_mm)  # (N*k, I)
        h = kernels.swiglu(gate, up)  # (N*k, I) each expert's SwiGLU, silu(gate) * up
        # each row is scaled by its routing weight; the down projection is linear, so do it on the narrower side
        scale = weights.flatten()[order].unsqueeze(1).to(h.dtype)  # (N*k, 1)
        narrow_hidden = h.shape[1] < C
        if narrow_hidden:
            h = h * scale
        ys = expert_matmul(h, self.down_proj, counts, self.use_grouped_mm)  # (N*k, C)
        if not narrow_hidden:
            ys = ys * scale
        # each token sums its k experts' rows (on a GPU in an atomic, run-to-run varying order for k > 2,
        # unless torch.use_deterministic_algorithms(True))
        y = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))  # (N, C)

        f = counts.float() / x.shape[0]  # (E,) tokens that chose expert i / tokens; sums to k
        P = probs.mean(dim=0)  # (E,) mean router probability of expert i; sums to 1
        aux_loss = E * (f * P).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.load = (f / k).detach()
        return y.view(B, T, C), aux_loss, z_loss


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config)
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        y, aux_loss, z_loss = self.mlp(self.ln_2(x))
        return x + self.mlp_dropout(y), aux_loss, z_loss


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation, n_kv_head heads (never the
    repeated ones): decoding one token computes only its q, k, v and attends to the stored prefix."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self):
        """Bytes the cache holds per token of one sequence, all layers: 2 (k, v) * n_layer * n_kv_head * head_dim *
        dtype size."""
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
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # RoPE's cos and sin of every position, (block_size, head_dim) in HF's rotate-half layout; not saved
        angles = torch.arange(config.block_size, dtype=torch.float32)[:, None] * rope_frequencies(config, config.head_dim)
        angles = torch.cat((angles, angles), dim=-1)  # dims i and i + head_dim/2 turn by the same angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        # as GPT-2: the projections that write into the residual stream get 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._metrics = {}

    def _init_weights(self, module):
        """GPT-2's init, as gpt2.py:
        | tensor                                            | init                                                   |
        | Linear weights (q, k, v_proj, router, lm_head)    | normal(0, 0.02)                                        |
        | o_proj weight                                     | normal(0, 0.02 / sqrt(2 * n_layer)), in __init__ after |
        | experts' gate_proj, up_proj (n_experts, out, in)  | normal(0, 0.02)                                        |
        | experts' down_proj                                | normal(0, 0.02 / sqrt(2 * n_layer)), in __init__ after |
        | wte (= lm_head if tied)                           | normal(0, 0.02)                                        |
        | RMSNorm gains (ln_1, ln_2, ln_f, q_norm, k_norm)  | 1 (RMSNorm's own)                                      |"""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MoE):
            for w in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        B, T = idx.shape
        c = self.config
        start = cache.pos if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={c.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # (T, head_dim) the positions of idx
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        aux_loss = z_loss = 0.0
        for i, block in enumerate(self.transformer.h):
            x, layer_aux, layer_z = block(x, cos, sin, cache, i)
            aux_loss, z_loss = aux_loss + layer_aux, z_loss + layer_z
        aux_loss, z_loss = aux_loss / c.n_layer, z_loss / c.n_layer  # mean over layers
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        load = torch.stack([block.mlp.load for block in self.transformer.h])  # (n_layer, n_experts)
        self._metrics = dict(expert_load=load,
                             # how much busier the busiest expert is than a balanced one (1 = perfect), mean over layers
                             expert_imbalance=(load.amax(dim=1) * c.n_experts).mean(),
                             aux_loss=aux_loss.detach(), z_loss=z_loss.detach())
        if targets is not None and not need_logits:  # the loss alone (training): the head and the loss fused
            loss = kernels.linear_cross_entropy(x, self.lm_head, targets)  # chunk by chunk, no (B, T, vocab) logits
            logits = None
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss + c.aux_loss_coef * aux_loss + c.z_loss_coef * z_loss

    def metrics(self):
        """Router statistics of the last forward, detached: expert_load (n_layer, n_experts), the fraction
        of routed tokens each expert got; expert_imbalance, max/mean load averaged over layers; aux_loss,
        z_loss, unweighted means over layers."""
        return dict(self._metrics)

    def make_cache(self, batch, max_len):
        """An empty KV cache for batch sequences of up to max_len tokens, n_kv_head heads per layer, in the
        parameters' dtype and device."""
        c = self.config
        param = self.lm_head.weight
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

    def num_params(self, non_embedding=True, active=False):
        """Parameters, without the token embedding by default (it is a lookup, not a matmul; if it is tied
        to the head it counts as the head). active=True counts only the n_experts_per_tok experts a token uses."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not c.tie_word_embeddings:
            n -= self.transformer.wte.weight.numel()
        if active:
            n -= c.n_layer * (c.n_experts - c.n_experts_per_tok) * 3 * c.intermediate_size * c.n_embd
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per active parameter (the router, the k chosen
        experts, attention, the head), plus attention's QK^T and AV, 2 * 2 * n_layer * seq_len * n_head *
        head_dim forward, times 3 with backward (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params(active=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def tp_plan(self):
        """Tensor parallel over attention heads with sequence parallel (Korthikanti et al. 2022): q, k, v split
        by output (heads), o_proj by input (n_kv_head must divide by the TP degree). Between attention and the
        MoE the residual stream and the RMSNorms are split along the sequence (1/tp of those activations per
        rank): an all-gather before attention and before the MoE, a reduce-scatter after attention. The router
        and experts stay replicated: every rank runs the whole MoE on every token of the gathered sequence
        (correct, not sharded; expert parallelism would be the way to split them) and keeps its own slice of
        the output. With qk_norm, the q_norm/k_norm gains are shared by all heads while each rank holds some
        heads: as DTensors split on the heads dim (dim 2 of (B, T, heads, head_dim)), their gradients are
        summed over the TP group."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                       RowwiseParallel, SequenceParallel)

        def gather(n_args):  # the first argument arrives split along the sequence; the module needs all of it
            return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                      desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
                                      use_local_output=True)

        heads = SequenceParallel(sequence_dim=2, use_local_output=True)  # qk_norm's gains, see above
        return {"transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "transformer.h.*.ln_1": SequenceParallel(use_local_output=True),
                "transformer.h.*.attn": gather(5),  # (x, cos, sin, cache, layer)
                "transformer.h.*.attn.q_proj": ColwiseParallel(),
                "transformer.h.*.attn.k_proj": ColwiseParallel(),
                "transformer.h.*.attn.v_proj": ColwiseParallel(),
                **({"transformer.h.*.attn.q_norm": heads, "transformer.h.*.attn.k_norm": heads}
                   if self.config.qk_norm else {}),
                "transformer.h.*.attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "transformer.h.*.ln_2": SequenceParallel(use_local_output=True),
                "transformer.h.*.mlp": gather(1),
                # the MoE's output is whole on every rank: keep this rank's slice of the sequence
                "transformer.h.*.mlp_dropout": PrepareModuleInput(input_layouts=(Replicate(),),
                                                                  desired_input_layouts=(Shard(1),),
                                                                  use_local_output=True),
                "transformer.ln_f": SequenceParallel(use_local_output=True),
                "lm_head": gather(1)}

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

def expert_matmul(x, w, counts, use_grouped_mm=None):
    """Rows sorted by expert, counts[e] of them for expert e, each times its expert's matrix:
    x (R, in), w (n_experts, out, in) -> (R, out), the rows of expert e multiplied by w[e].T. One
    torch._grouped_mm call where it runs (use_grouped_mm=None probes that), else a loop over experts."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware: cast by hand
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_works(x, w)
    if use_grouped_mm:  # one call; the kernel reads each expert's slice from the offsets
        return torch._grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    # one matmul per expert on its contiguous slice. unbind, not w[e]: its backward stacks the experts'
    # gradients once instead of writing each into a fresh full-size zero tensor
    return torch.cat([xe @ we.t() for xe, we in zip(x.split(counts.tolist()), w.unbind(0))])


_grouped_mm_verdicts = {}  # (device type, dtype) -> whether torch._grouped_mm ran correctly there


def grouped_mm_works(x, w):
    """Whether torch._grouped_mm can multiply x (R, in) by the experts' w (n_experts, out, in) on x's device and
    dtype. Kernels exist for bf16 on CUDA (compute capability 8.0+ from torch 2.9) and on the CPU (where it beats
    the slice loop by a few percent); rows must be 16-byte aligned. Rather than trust a version table, one tiny
    trial call (forward and backward, checked against plain matmuls) decides, once per device type and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if w.shape[1] % align or w.shape[2] % align:
        return False
    if torch.compiler.is_compiling():  # no trial calls while tracing; inductor lowers grouped_mm for bf16 only
        return x.is_cuda and x.dtype == torch.bfloat16
    key = (x.device.type, x.dtype)
    if key not in _grouped_mm_verdicts:
        _grouped_mm_verdicts[key] = _try_grouped_mm(x.device, x.dtype)
    return _grouped_mm_verdicts[key]


def _try_grouped_mm(device, dtype):
    # small integers: every product and sum is exact in bf16 too; no RNG, so training's random stream is untouched
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        a = (torch.arange(6 * 16, device=device) % 5 - 2).to(dtype).view(6, 16).requires_grad_()
        b = (torch.arange(2 * 16 * 8, device=device) % 3 - 1).to(dtype).view(2, 16, 8).requires_grad_()
        try:
            out = torch._grouped_mm(a, b, offs=torch.tensor([2, 6], dtype=torch.int32, device=device))
            out.backward(torch.ones_like(out))
        except (RuntimeError, NotImplementedError):
            return False
        return (torch.equal(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))
                and torch.equal(b.grad[0], a[:2].t() @ torch.ones(2, 8, device=device, dtype=dtype)))


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
             "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "n_experts_per_tok": "num_experts_per_tok",
             "aux_loss_coef": "router_aux_loss_coef", "rope_theta": "rope_theta",
             "tie_word_embeddings": "tie_word_embeddings"}
# what the two families name, fix and default differently (defaults: transformers', for keys a config.json omits)
HF_FAMILIES = {
    "mixtral": dict(architecture="MixtralForCausalLM",
                    config={"n_experts": "num_local_experts", "intermediate_size": "intermediate_size"},
                    fixed=dict(qk_norm=False, norm_topk_prob=True),  # Mixtral always renormalises the top k
                    defaults={"rope_theta": 1e6, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.001}),
    "qwen3_moe": dict(architecture="Qwen3MoeForCausalLM",
                      config={"n_experts": "num_experts", "intermediate_size": "moe_intermediate_size",
                              "norm_topk_prob": "norm_topk_prob"},
                      fixed=dict(qk_norm=True),
                      defaults={"rope_theta": 1e4, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
                                "norm_topk_prob": False}),
}

HF_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.h.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "transformer.h.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "transformer.h.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "transformer.h.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",  # qk_norm only
    "transformer.h.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",  # qk_norm only
    "transformer.h.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.h.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "transformer.h.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    # expert j's (out, in) matrix; gaia stacks the experts into one (n_experts, out, in) tensor
    "transformer.h.{i}.mlp.gate_proj": "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
    "transformer.h.{i}.mlp.up_proj": "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
    "transformer.h.{i}.mlp.down_proj": "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",  # not stored when tied to wte
}
# Mixtral's checkpoints name the MoE block_sparse_moe and its experts' matrices w1 (gate), w3 (up), w2 (down)
MIXTRAL_NAMES = {".mlp.": ".block_sparse_moe.", ".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
# the gaia file that loads each Hugging Face model_type, for the error when a checkpoint meets the wrong one
GAIA_FILES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "moe", "qwen3_moe": "moe", "mamba": "mamba",
              "mamba2": "mamba", "deepseek_v3": "mla"}


def layer_names(model):
    """HF_NAMES for this model: {i} filled in for every layer ({j} left for the experts), without the tensors
    it does not have (q_norm, k_norm without qk_norm; lm_head when tied)."""
    own = dict(model.named_parameters(remove_duplicate=True))
    return {ours.format(i=i): theirs.replace("{i}", str(i))
            for ours, theirs in HF_NAMES.items() for i in range(model.config.n_layer) if ours.format(i=i) in own}


def read_safetensors(path):
    """Every tensor of a Hugging Face directory: model.safetensors, or all the shards that
    model.safetensors.index.json lists in its weight_map."""
    from safetensors.torch import load_file
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; "
                         f"save the model with transformers' save_pretrained (safetensors)")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def from_hf(path):
    """A gaia Model holding the weights of a local Hugging Face MixtralForCausalLM or Qwen3MoeForCausalLM directory."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    t = hf.get("model_type")
    if t not in HF_FAMILIES:
        hint = f"use --model={GAIA_FILES[t]}" if t in GAIA_FILES else "no gaia model file loads it"
        raise ValueError(f"{path} holds a {t!r} model, not moe (mixtral or qwen3_moe); {hint}")
    family = HF_FAMILIES[t]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: gaia's moe.py has SwiGLU (silu) experts only")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 keeps rope_theta in there
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; gaia's moe.py has plain RoPE")
    window = hf.get("sliding_window") if t == "mixtral" or hf.get("use_sliding_window") else None
    if window is not None and window < hf["max_position_embeddings"]:
        raise ValueError(f"sliding_window={window} is not supported; gaia's moe.py attends to the whole context")
    if t == "qwen3_moe":
        if hf.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported; gaia's moe.py has bias-free projections")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError("dense (non-MoE) layers (mlp_only_layers, decoder_sparse_step > 1) are not "
                             "supported; gaia's moe.py puts an MoE layer in every block")
    # Mixtral's router_jitter_noise (multiplicative noise on the router input while training) is not implemented:
    # it never changes the logits of a loaded model
    hf.setdefault("rope_theta", rope.get("rope_theta"))  # transformers 5 keeps it in rope_parameters
    hf.setdefault("num_experts", hf.get("num_local_experts"))  # Qwen3's own name; transformers 5 writes the other
    # transformers' defaults for the keys a config.json leaves out; head_dim None means n_embd // n_head
    hf = {**family["defaults"], **{k: v for k, v in hf.items() if v is not None}}
    table = {**HF_CONFIG, **family["config"]}
    model = Model(Config(**{ours: hf[theirs] for ours, theirs in table.items() if theirs in hf}, **family["fixed"]))

    # Mixtral's names -> HF_NAMES' (Qwen3-MoE's and transformers 5's)
    hf_state = read_safetensors(path)
    for ours, theirs in MIXTRAL_NAMES.items():
        hf_state = {k.replace(theirs, ours): v for k, v in hf_state.items()}
    used, state = set(), {}

    def take(name):
        if name not in hf_state:
            raise ValueError(f"{path} does not match the {t} layout: it has no {name}")
        used.add(name)
        return hf_state[name]

    for ours, theirs in layer_names(model).items():
        if "{j}" not in theirs:
            state[ours] = take(theirs)
        elif theirs.format(j=0) in hf_state:  # one (out, in) matrix per expert: stack them
            state[ours] = torch.stack([take(theirs.format(j=j)) for j in range(model.config.n_experts)])
        else:  # transformers 5's in-memory layout: experts stacked, gate and up fused in one (n_experts, 2I, C)
            experts = theirs[:theirs.index("{j}")]
            if ours.endswith("down_proj"):
                state[ours] = take(experts + "down_proj")
            else:
                state[ours] = take(experts + "gate_up_proj").chunk(2, dim=1)[ours.endswith("up_proj")]
    if set(hf_state) - used - {"lm_head.weight"}:  # a tied checkpoint may still store the head
        raise ValueError(f"{path} does not match the {t} layout: unexpected {sorted(set(hf_state) - used)[:5]}")
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    return model


def to_hf(model, path):
    """Write a Hugging Face directory that transformers' from_pretrained loads: MixtralForCausalLM, or
    Qwen3MoeForCausalLM when qk_norm=True. Experts are written one tensor per expert and projection, the
    layout transformers itself saves (its 5.x loader fuses them into 3-D tensors; 4.x reads them as is)."""
    from safetensors.torch import save_file
    c = model.config
    if not c.qk_norm and not c.norm_topk_prob:
        raise ValueError("Mixtral always renormalises the top-k weights and only Qwen3-MoE (qk_norm=True) has "
                         "norm_topk_prob=False; no transformers model matches qk_norm=False, norm_topk_prob=False")
    t = "qwen3_moe" if c.qk_norm else "mixtral"
    family = HF_FAMILIES[t]
    own = model.state_dict()
    hf_state = {}
    for ours, theirs in layer_names(model).items():
        if t == "mixtral":
            for qwen_name, mixtral_name in MIXTRAL_NAMES.items():
                theirs = theirs.replace(qwen_name, mixtral_name)
        v = own[ours].detach().cpu()
        if "{j}" in theirs:  # gaia's (n_experts, out, in) -> one (out, in) matrix per expert
            hf_state.update({theirs.format(j=j): v[j].contiguous() for j in range(c.n_experts)})
        else:
            hf_state[theirs] = v.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(hf_state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = {theirs: getattr(c, ours) for ours, theirs in {**HF_CONFIG, **family["config"]}.items()}
    hf.update(model_type=t, architectures=[family["architecture"]], hidden_act="silu", attention_dropout=0.0,
              rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta), initializer_range=0.02,
              sliding_window=None, dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))
    if t == "qwen3_moe":  # its dense MLP width (unused: every layer is MoE), and no dense or sliding layers
        hf.update(intermediate_size=c.intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                  attention_bias=False, use_sliding_window=False)
    else:
        hf.update(router_jitter_noise=0.0)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
