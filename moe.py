"""
Sparse mixture-of-experts transformer (Mixtral, Jiang et al. 2024; Qwen3-MoE), in one file.

The attention half of each block is Llama's: RMSNorm, rotary position embeddings, grouped-query
attention (n_kv_head key/value heads shared by n_head query heads), optionally Qwen3's per-head RMSNorm
of queries and keys (qk_norm). The feed-forward half is a sparse MoE layer: a linear router scores
n_experts SwiGLU experts, each token goes to its top n_experts_per_tok of them (softmax first, then
top-k, optionally renormalised: norm_topk_prob), and the experts' outputs are summed with those weights.

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

Loads and saves the Hugging Face MixtralForCausalLM (qk_norm=False) and Qwen3MoeForCausalLM
(qk_norm=True) layouts. The model contract every gaia model follows is in README.md.
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 50257      # train.py sets this from the tokenizer
    block_size: int = 256        # maximum context (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4              # query heads
    n_kv_head: int = 2           # key/value heads: = n_head is MHA, a divisor of it GQA, 1 is MQA
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3-MoE sets it explicitly)
    n_experts: int = 8
    n_experts_per_tok: int = 2   # k of top-k routing
    intermediate_size: int = 256  # hidden width of each SwiGLU expert
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities to sum to 1 (Mixtral always does)
    qk_norm: bool = False        # RMSNorm of each query/key head before RoPE (Qwen3-MoE)
    aux_loss_coef: float = 0.01  # Switch Transformer's load-balancing loss weight (their 1e-2)
    z_loss_coef: float = 0.001   # ST-MoE's router z-loss weight (their 1e-3)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dropout: float = 0.0


# Config fields that weight the training loss, not the weights: fine-tuning a Hugging Face checkpoint may set them
LOSS_WEIGHTS = ("aux_loss_coef", "z_loss_coef")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32 whatever the activations' dtype, as transformers does, so bf16 runs match it
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta):
    """cos, sin (T, head_dim) of the rotation angles positions * theta^(-2i/head_dim), in fp32. The two
    halves of head_dim repeat the same frequencies: HF's layout, where dim i pairs with dim i + head_dim/2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i + head_dim/2}) pair of x (B, n_head, T, head_dim) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, heads, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # the whole prefix, still n_kv_head heads
        # GQA: query head h reads key/value head h // n_rep; SDPA broadcasts them, nothing is copied
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_rep > 1)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.resid_dropout(self.o_proj(y))


def expert_matmul(x, w, counts, use_grouped_mm):
    """Rows sorted by expert, counts[e] of them for expert e, each times its expert's matrix:
    x (R, in), w (n_experts, out, in) -> (R, out), rows of expert e multiplied by w[e].T."""
    if use_grouped_mm:  # one call; the kernel reads each expert's slice from the offsets
        return torch._grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    # one matmul per expert on its contiguous slice. unbind, not w[e]: its backward stacks the experts'
    # gradients once instead of writing each into a fresh full-size zero tensor
    return torch.cat([xe @ we.t() for xe, we in zip(x.split(counts.tolist()), w.unbind(0))])


_grouped_mm_verdicts = {}  # (device type, dtype) -> whether torch._grouped_mm ran correctly there


def grouped_mm_works(x, config):
    """Whether torch._grouped_mm can run this layer on x's device and dtype. Kernels exist for bf16 on CUDA
    (compute capability 8.0+ from torch 2.9) and on the CPU (where it beats the slice loop by a few percent);
    rows must be 16-byte aligned. Rather than trust a version table, one tiny trial call (forward and
    backward, checked against plain matmuls) decides, once per device type and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if config.n_embd % align or config.intermediate_size % align:
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
        self.use_grouped_mm = None  # None: grouped_mm_works() decides; True/False forces a path (tests, benchmarks)
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
        if torch.is_autocast_enabled(xs.device.type):  # grouped_mm is not autocast-aware: cast by hand
            xs = xs.to(torch.get_autocast_dtype(xs.device.type))
        grouped = grouped_mm_works(xs, self.config) if self.use_grouped_mm is None else self.use_grouped_mm
        # gate and up as two matmuls, not one fused (2I)-wide one: its chunk's backward would copy a (N*k, 2I)
        # gradient, where two matmuls' input gradients add up in a (N*k, C) one (CPU: 3-11% faster per layer
        # with 8 wide experts, even with 64 narrow ones)
        gate = expert_matmul(xs, self.gate_proj.to(xs.dtype), counts, grouped)  # (N*k, I)
        up = expert_matmul(xs, self.up_proj.to(xs.dtype), counts, grouped)  # (N*k, I)
        h = F.silu(gate) * up  # (N*k, I) each expert's SwiGLU
        # each row is scaled by its routing weight; the down projection is linear, so do it on the narrower side
        scale = weights.flatten()[order].unsqueeze(1).to(xs.dtype)  # (N*k, 1)
        narrow_hidden = h.shape[1] < C
        if narrow_hidden:
            h = h * scale
        ys = expert_matmul(h, self.down_proj.to(xs.dtype), counts, grouped)  # (N*k, C)
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
        self.moe = MoE(config)
        self.moe_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        y, aux_loss, z_loss = self.moe(self.ln_2(x))
        return x + self.moe_dropout(y), aux_loss, z_loss


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation, n_kv_head heads (never the
    repeated ones): decoding one token computes only its q, k, v and attends to the stored prefix."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

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
        if config.head_dim is None:
            if config.n_embd % config.n_head:
                raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}; "
                                 f"change one of them or set head_dim")
            config.head_dim = config.n_embd // config.n_head
        if config.n_head % config.n_kv_head:
            raise ValueError(f"n_head={config.n_head} is not a multiple of n_kv_head={config.n_kv_head}; "
                             f"pick n_kv_head among the divisors of n_head")
        if config.head_dim % 2:
            raise ValueError(f"head_dim={config.head_dim} is odd; RoPE rotates pairs of dimensions, make it even")
        if not 1 <= config.n_experts_per_tok <= config.n_experts:
            raise ValueError(f"n_experts_per_tok={config.n_experts_per_tok} must be between 1 and "
                             f"n_experts={config.n_experts}")
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
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # matrices; RMSNorm gains stay at 1
                # as GPT-2: the projections that write into the residual stream get 1/sqrt(2 * n_layer)
                residual = name.endswith(("o_proj.weight", "down_proj"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02)
        self._metrics = {}

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        c = self.config
        start = cache.pos if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={c.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        cos, sin = rope_cos_sin(torch.arange(start, start + T, device=idx.device), c.head_dim, c.rope_theta)
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        aux_loss = z_loss = 0.0
        for i, block in enumerate(self.transformer.h):
            x, layer_aux, layer_z = block(x, cos, sin, cache, i)
            aux_loss, z_loss = aux_loss + layer_aux, z_loss + layer_z
        aux_loss, z_loss = aux_loss / c.n_layer, z_loss / c.n_layer  # mean over layers
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        load = torch.stack([block.moe.load for block in self.transformer.h])  # (n_layer, n_experts)
        self._metrics = dict(expert_load=load,
                             # how much busier the busiest expert is than a balanced one (1 = perfect), mean over layers
                             expert_imbalance=(load.amax(dim=1) * c.n_experts).mean(),
                             aux_loss=aux_loss.detach(), z_loss=z_loss.detach())
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
        heads, so their gradients are summed over the TP group (see below)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                       RowwiseParallel, SequenceParallel)

        def gather(n_args):  # the first argument arrives split along the sequence; the module needs all of it
            return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                      desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
                                      use_local_output=True)

        plan = {"transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "transformer.ln_f": SequenceParallel(use_local_output=True),
                "lm_head": gather(1)}
        for i in range(self.config.n_layer):
            p = f"transformer.h.{i}."
            plan.update({p + "ln_1": SequenceParallel(use_local_output=True),
                         p + "attn": gather(5),  # (x, cos, sin, cache, layer)
                         p + "attn.q_proj": ColwiseParallel(), p + "attn.k_proj": ColwiseParallel(),
                         p + "attn.v_proj": ColwiseParallel(), p + "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                         p + "ln_2": SequenceParallel(use_local_output=True),
                         p + "moe": gather(1),
                         # the MoE's output is whole on every rank: keep this rank's slice of the sequence
                         p + "moe_dropout": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                               use_local_output=True)})
            if self.config.qk_norm:  # one gain for every head, each rank holding some heads (dim 2 of (B, T, heads,
                # head_dim)): as DTensors split on that dim, the gain's gradient is summed over the TP group
                plan.update({p + "attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                             p + "attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)})
        return plan

    # ---------------------------------------------------------------- generation with a KV cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        c = self.config
        B = idx.shape[0]
        param = self.lm_head.weight
        max_len = min(idx.shape[1] + max_new_tokens, c.block_size)
        cache = KVCache(c.n_layer, B, c.n_kv_head, max_len, c.head_dim, param.device, param.dtype)
        logits, _ = self(idx[:, -c.block_size:], cache=cache)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if cache.pos == max_len:
                # the context is full: the window slides, positions shift, so the prefix is recomputed
                cache.pos = 0
                logits, _ = self(idx[:, -c.block_size:], cache=cache)  # nanoGPT's crop: the last block_size tokens
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    # gaia name -> transformers name, for everything but the experts
    HF_NAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
                ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."), (".attn.", ".self_attn."),
                (".ln_2.", ".post_attention_layernorm."), (".moe.router.", ".mlp.gate.")]

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face MixtralForCausalLM or Qwen3MoeForCausalLM directory (config.json +
        model.safetensors, or sharded with model.safetensors.index.json)."""
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        kind = hf.get("model_type")
        if kind not in ("mixtral", "qwen3_moe"):
            raise ValueError(f"{path} holds a {kind!r} model; gaia's moe.py loads mixtral and qwen3_moe checkpoints")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r}: gaia's moe.py has SwiGLU (silu) experts only")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported; gaia's moe.py has plain RoPE")
        window = hf.get("sliding_window") if kind == "mixtral" or hf.get("use_sliding_window") else None
        if window is not None and window < hf["max_position_embeddings"]:
            raise ValueError(f"sliding_window={window} is not supported; gaia's moe.py attends to the whole context")
        if kind == "qwen3_moe":
            if hf.get("attention_bias"):
                raise ValueError("attention_bias=True is not supported; gaia's moe.py has bias-free projections")
            if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
                raise ValueError("dense (non-MoE) layers (mlp_only_layers, decoder_sparse_step > 1) are not "
                                 "supported; gaia's moe.py puts an MoE layer in every block")
        config = Config(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim"),
            n_experts=hf.get("num_local_experts") or hf.get("num_experts"),  # Qwen3 configs name it num_experts
            n_experts_per_tok=hf["num_experts_per_tok"],
            intermediate_size=hf["moe_intermediate_size"] if kind == "qwen3_moe" else hf["intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False) if kind == "qwen3_moe" else True,
            qk_norm=kind == "qwen3_moe",
            # Mixtral's router_jitter_noise (multiplicative noise on the router input while training) is not
            # implemented: it never changes the logits of a loaded model
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), dropout=0.0,
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e6 if kind == "mixtral" else 1e4)),
            norm_eps=hf.get("rms_norm_eps", 1e-5 if kind == "mixtral" else 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False))
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)

        index = os.path.join(path, "model.safetensors.index.json")
        files = ["model.safetensors"]
        if not os.path.exists(os.path.join(path, files[0])) and os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for file in files:
            state.update(load_file(os.path.join(path, file)))
        own, experts = {}, {}  # experts[(layer, expert or None, projection)] = tensor
        for k, v in state.items():
            k = k.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's older module name
            m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.)?(\w+?)(?:\.weight)?", k)
            if m:  # one expert's w1/w2/w3 (Mixtral) or gate/up/down_proj (Qwen3), or all experts fused (3-D)
                layer, e, name = int(m[1]), m[2] and int(m[2]), m[3]
                experts[layer, e, dict(w1="gate_proj", w3="up_proj", w2="down_proj").get(name, name)] = v
                continue
            for ours, theirs in reversed(cls.HF_NAMES):
                k = k.replace(theirs, ours)
            own[k] = v
        for i in range(config.n_layer):
            p = f"transformer.h.{i}.moe."
            if (i, None, "gate_up_proj") in experts:  # transformers 5's in-memory layout: (E, 2I, C), gate first
                own[p + "gate_proj"], own[p + "up_proj"] = experts[i, None, "gate_up_proj"].chunk(2, dim=1)
                own[p + "down_proj"] = experts[i, None, "down_proj"]
            elif (i, 0, "gate_proj") in experts:  # one (out, in) matrix per expert: stack them
                for name in ("gate_proj", "up_proj", "down_proj"):
                    own[p + name] = torch.stack([experts[i, e, name] for e in range(config.n_experts)])
        if config.tie_word_embeddings:
            own.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{path} does not match the {kind} layout: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face directory that transformers' from_pretrained loads: MixtralForCausalLM, or
        Qwen3MoeForCausalLM when qk_norm=True. Experts are written one tensor per expert and projection, the
        layout transformers itself saves (its 5.x loader fuses them into 3-D tensors; 4.x reads them as is)."""
        from safetensors.torch import save_file
        c = self.config
        qwen = c.qk_norm
        if not qwen and not c.norm_topk_prob:
            raise ValueError("Mixtral always renormalises the top-k weights and only Qwen3-MoE (qk_norm=True) has "
                             "norm_topk_prob=False; no transformers model matches qk_norm=False, norm_topk_prob=False")
        os.makedirs(path, exist_ok=True)
        mlp = ".mlp." if qwen else ".block_sparse_moe."
        names = dict(gate_proj="gate_proj", up_proj="up_proj", down_proj="down_proj") if qwen else \
            dict(gate_proj="w1", up_proj="w3", down_proj="w2")
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            m = re.fullmatch(r"transformer\.h\.(\d+)\.moe\.(gate_proj|up_proj|down_proj)", k)
            if m:  # (E, out, in) -> one (out, in) matrix per expert
                for e in range(c.n_experts):
                    state[f"model.layers.{m[1]}{mlp}experts.{e}.{names[m[2]]}.weight"] = v[e]
                continue
            if k == "lm_head.weight" and c.tie_word_embeddings:
                continue
            for ours, theirs in self.HF_NAMES:
                k = k.replace(ours, theirs)
            state[k.replace(".mlp.", mlp)] = v
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        hf = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, hidden_size=c.n_embd,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                  head_dim=c.head_dim, num_experts_per_tok=c.n_experts_per_tok, hidden_act="silu",
                  rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                  rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),
                  tie_word_embeddings=c.tie_word_embeddings, router_aux_loss_coef=c.aux_loss_coef,
                  attention_dropout=0.0, initializer_range=0.02, sliding_window=None,
                  dtype=str(self.lm_head.weight.dtype).removeprefix("torch."))
        if qwen:
            hf.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=c.n_experts,
                      moe_intermediate_size=c.intermediate_size, intermediate_size=c.intermediate_size,
                      norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                      attention_bias=False, use_sliding_window=False)
        else:
            hf.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=c.n_experts,
                      intermediate_size=c.intermediate_size, router_jitter_noise=0.0)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


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
