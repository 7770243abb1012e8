"""
DeepSeek-V3 (DeepSeek-AI 2024) in one file: multi-head latent attention (MLA, DeepSeek-V2 2024, §2.1)
and the DeepSeekMoE feed-forward with auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2).

MLA compresses keys and values of each token into one latent c_KV of kv_lora_rank numbers (plus one
rope key of qk_rope_head_dim shared by every head). Training expands the latent into per-head keys and
values; decoding never does: W_UK is folded into the query and W_UV into the output, so attention runs
directly against the cached latents and the cache holds (kv_lora_rank + qk_rope_head_dim) numbers per
token and layer, instead of MHA's 2 * n_head * head_dim.

The feed-forward of every layer past the first `first_k_dense_replace` is a DeepSeekMoE layer: shared
experts every token goes through, plus fine-grained routed experts chosen by sigmoid affinities. The
choice adds a per-expert bias (e_score_correction_bias) that only steers selection, never the weights;
after each optimizer step the bias of overloaded experts goes down and of underloaded ones up
(after_optimizer_step), which balances load without an auxiliary loss.

Loads and saves the Hugging Face DeepseekV3ForCausalLM layout (config.json + model.safetensors).
Names follow the DeepSeek-V2 paper: W_DQ, W_UQ, W_QR (queries), W_DKV, W_UK, W_UV, W_KR (keys and
values), W_O. The model contract every gaia model file follows is written in README.md.
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
    vocab_size: int = 50304      # train.py sets this from the tokenizer
    block_size: int = 256        # maximum context (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # multi-head latent attention (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = 96  # d_c': queries go through a low-rank latent c_Q; None (or 0) = full projection
    kv_lora_rank: int = 64        # d_c: the compressed key-value latent c_KV, what the cache stores
    qk_nope_head_dim: int = 32    # d_h: per-head query/key part without position
    qk_rope_head_dim: int = 16    # d_h^R: per-head query part and the shared key part that carry RoPE
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # YaRN context extension (DeepSeek-V3's rope_scaling); rope_factor = 1 is plain RoPE.
    # mscale / mscale_all_dim = 0 mean "not given", as in Hugging Face's yarn code
    rope_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    # feed-forward: the first `first_k_dense_replace` layers are dense SwiGLU, the rest DeepSeekMoE
    intermediate_size: int = 384        # dense layers
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 64     # each fine-grained expert
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2        # K_r: routed experts per token
    n_group: int = 1                    # experts are split in n_group groups (nodes, in DeepSeek-V3) ...
    topk_group: int = 1                 # ... and a token may only pick from its topk_group best groups
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True         # renormalise the chosen affinities to sum to 1
    bias_update_speed: float = 0.001    # gamma: step of the aux-loss-free bias, per optimizer step
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs of numbers")
        if not 0 <= self.first_k_dense_replace <= self.n_layer:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be in 0..n_layer={self.n_layer}")
        if self.first_k_dense_replace < self.n_layer:  # there are MoE layers: check the routing
            E, G = self.n_routed_experts, self.n_group
            if G < 1 or E % G:
                raise ValueError(f"n_routed_experts={E} must be divisible by n_group={G}")
            if E // G < 2:
                raise ValueError(f"each group needs >= 2 experts (a group scores by its top-2); "
                                 f"lower n_group={G} or raise n_routed_experts={E}")
            if not 1 <= self.topk_group <= G:
                raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={G}")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * E // G:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..topk_group * "
                                 f"n_routed_experts / n_group = {self.topk_group * E // G}, the experts a token sees")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, the weight applied in the input's dtype (as DeepSeek / HF do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(c):
    """Inverse frequencies (qk_rope_head_dim / 2,) and the factor YaRN multiplies cos and sin by."""
    dim, base = c.qk_rope_head_dim, c.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if c.rope_factor == 1.0:
        return inv_freq, 1.0
    # YaRN (Peng et al. 2023): high frequencies (many rotations over the original context) are kept,
    # low ones are interpolated by rope_factor, with a linear ramp between dimensions low and high
    def correction_dim(rotations):
        return dim * math.log(c.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(c.beta_fast)), 0)
    high = min(math.ceil(correction_dim(c.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / c.rope_factor * ramp + inv_freq * (1 - ramp)
    if c.mscale and c.mscale_all_dim:
        attention_factor = yarn_get_mscale(c.rope_factor, c.mscale) / yarn_get_mscale(c.rope_factor, c.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(c.rope_factor)
    return inv_freq, attention_factor


def apply_rope(x, cos, sin):
    """x (B, T, heads, d) rotated by position: pairs are (i, i + d/2) ("rotate half" layout).
    cos, sin: (T, d). DeepSeek's checkpoints pair (2i, 2i+1) instead; from_pretrained permutes the rope
    rows of W_QR and W_KR, which gives the same attention scores (a dot product ignores a shared permutation)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def sum_grad_over_shards(x, mesh):
    """Identity forward; backward sums x's gradient over the tensor-parallel ranks (each rank's heads add
    their part). For the replicated rope key, which no stock ParallelStyle covers."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    return DTensor.from_local(x, mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def causal_mask(T, end, pos, device):
    """New query i (absolute position pos + i) may see keys 0 .. pos + i; None for a single query."""
    return torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=pos) if T > 1 else None


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        H = c.n_head
        # queries: c_Q = RMSNorm(W_DQ h), q_C = W_UQ c_Q, q_R = RoPE(W_QR c_Q); without q_lora_rank, c_Q = h
        if c.q_lora_rank:
            self.w_dq = nn.Linear(c.n_embd, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, 1e-6)  # HF's q_a_layernorm uses its default eps
            q_in = c.q_lora_rank
        else:
            self.w_dq, self.q_norm, q_in = None, None, c.n_embd
        self.w_uq = nn.Linear(q_in, H * c.qk_nope_head_dim, bias=False)
        self.w_qr = nn.Linear(q_in, H * c.qk_rope_head_dim, bias=False)
        # keys and values: c_KV = RMSNorm(W_DKV h), k_C = W_UK c_KV, v_C = W_UV c_KV; k_R = RoPE(W_KR h) is one
        # key for all heads (RoPE cannot be absorbed into W_UK, so the positional part is kept apart and small)
        self.w_dkv = nn.Linear(c.n_embd, c.kv_lora_rank, bias=False)
        self.kv_norm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.w_uk = nn.Linear(c.kv_lora_rank, H * c.qk_nope_head_dim, bias=False)
        self.w_uv = nn.Linear(c.kv_lora_rank, H * c.v_head_dim, bias=False)
        self.w_kr = nn.Linear(c.n_embd, c.qk_rope_head_dim, bias=False)
        self.w_o = nn.Linear(H * c.v_head_dim, c.n_embd, bias=False)
        # the paper's 1/sqrt(d_h + d_h^R), times YaRN's mscale^2 when the context is extended
        self.softmax_scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
        if c.rope_factor != 1.0 and c.mscale_all_dim:
            self.softmax_scale *= yarn_get_mscale(c.rope_factor, c.mscale_all_dim) ** 2
        self.dropout = c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        dn, dr = self.nope_dim, self.rope_dim
        c_q = self.q_norm(self.w_dq(x)) if self.w_dq is not None else x   # (B, T, q_lora_rank)
        q_c = self.w_uq(c_q).view(B, T, -1, dn)                           # (B, T, H, d_h)
        q_r = apply_rope(self.w_qr(c_q).view(B, T, -1, dr), cos, sin)     # (B, T, H, d_h^R)
        c_kv = self.kv_norm(self.w_dkv(x))                                # (B, T, d_c)
        k_r = apply_rope(self.w_kr(x).view(B, T, 1, dr), cos, sin)        # (B, T, 1, d_h^R): shared by the heads
        if hasattr(self.w_uk.weight, "device_mesh"):  # tensor parallel (tp_plan): this rank holds some heads ...
            k_r = sum_grad_over_shards(k_r, self.w_uk.weight.device_mesh)  # ... and k_R serves them all
        mask = None
        if isinstance(cache, LatentCache):
            latent, mask = cache.update(layer, torch.cat((c_kv, k_r.squeeze(2)), dim=-1))  # (B, S, d_c + d_h^R)
            if cache.absorb and T == 1:  # decoding: memory-bound, attend to the latents themselves
                return self.resid_dropout(self.absorbed(q_c, q_r, latent))
            # prefill (or the "expanded" baseline): compute-bound, and expanded heads cost fewer FLOPs per
            # query-key pair, H * (d_h + d_h^R + d_v) vs H * (2 d_c + d_h^R) absorbed; so expand the whole prefix
            c_kv, k_r = latent[..., :self.kv_lora_rank], latent[:, :, None, self.kv_lora_rank:]
        # training path: every head's keys and values expanded from the latent
        S = c_kv.shape[1]
        k_c = self.w_uk(c_kv).view(B, S, -1, dn)                          # (B, S, H, d_h)
        v = self.w_uv(c_kv).view(B, S, -1, self.v_dim).transpose(1, 2)    # (B, H, S, d_v)
        q = torch.cat((q_c, q_r), dim=-1).transpose(1, 2)                 # (B, H, T, d_h + d_h^R)
        k = torch.cat((k_c, k_r.expand(-1, -1, k_c.shape[2], -1)), dim=-1).transpose(1, 2)  # (B, H, S, d_h + d_h^R)
        if isinstance(cache, KVCache):
            k, v, mask = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None, scale=self.softmax_scale,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, d_v)
        y = y.transpose(1, 2).reshape(B, T, -1)                           # (B, T, H * d_v)
        return self.resid_dropout(self.w_o(y))

    def absorbed(self, q_c, q_r, latent):
        """One decoding step's attention straight against the cached latents (DeepSeek-V2 §2.1.2):
        q_C . k_C = q_C . (W_UK c_KV) = (W_UK^T q_C) . c_KV, so W_UK moves to the query side, and
        sum_s p_s W_UV c_KV,s = W_UV (sum_s p_s c_KV,s), so W_UV moves to the output side.
        Per-head keys and values are never formed: every head attends to the same latent (MQA-like)."""
        B, T, H, _ = q_c.shape                                            # T == 1
        r = self.kv_lora_rank
        W_UK = self.w_uk.weight.view(H, self.nope_dim, r)                 # (H, d_h, d_c)
        W_UV = self.w_uv.weight.view(H, self.v_dim, r)                    # (H, d_v, d_c)
        q_latent = torch.einsum("bhd,hdr->bhr", q_c[:, 0], W_UK)          # (B, H, d_c)
        q = torch.cat((q_latent, q_r[:, 0]), dim=-1)                      # (B, H, d_c + d_h^R)
        # q_C.k_C + q_R.k_R in one product, since [W_UK^T q_C, q_R] . [c_KV, k_R] is that sum; the heads
        # are the rows of one matmul against the shared latents (B, S, d_c + d_h^R), nothing is repeated
        att = (q @ latent.transpose(1, 2)) * self.softmax_scale           # (B, H, S): the new token sees all
        att = att.float().softmax(dim=-1).to(q.dtype)
        y_latent = att @ latent[..., :r]                                  # (B, H, d_c): weighted sum of c_KV
        y = torch.einsum("bhr,hvr->bhv", y_latent, W_UV)                  # (B, H, d_v)
        return self.w_o(y.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, config, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid affinities s_i = sigmoid(e_i . h), group-limited top-k on s_i + b_i (DeepSeek-V3 eq. 13-16)."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.n_embd))  # e_i: expert centroids
        # b_i: steers which experts are chosen, never how much they weigh; moved by after_optimizer_step
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        # tokens each expert received since the last bias update (training forwards only)
        self.register_buffer("load_since_update", torch.zeros(c.n_routed_experts), persistent=False)

    def forward(self, x):
        N, E = x.shape[0], self.weight.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()      # (N, E), in float32 as DeepSeek
        biased = scores + self.e_score_correction_bias                   # (N, E), for selection only
        # group-limited routing: rank groups by the sum of their two best experts, keep topk_group groups
        group_scores = biased.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(-1)  # (N, n_group)
        top_groups = group_scores.topk(self.topk_group, dim=-1).indices                 # (N, topk_group)
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        biased = biased.masked_fill(~allowed.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        idx = biased.topk(self.top_k, dim=-1).indices                    # (N, k) chosen experts
        weights = scores.gather(1, idx)                                  # (N, k) gates from the unbiased s_i
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * self.routed_scaling_factor


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored as 3-D tensors (expert, out, in)."""

    def __init__(self, config):
        super().__init__()
        E, C, I = config.n_routed_experts, config.n_embd, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, C))
        self.up_proj = nn.Parameter(torch.empty(E, I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))

    def forward(self, x, idx, weights, counts):
        """Dropless dispatch: x (N, C), idx/weights (N, k), counts (E,) assignments per expert.
        Assignments are sorted by expert, each expert runs once on its contiguous slice, and the
        weighted outputs are added back to their tokens; the only loop is over experts."""
        k = idx.shape[1]
        order = idx.flatten().argsort(stable=True)                       # (N*k,) assignments grouped by expert
        token = order // k                                               # (N*k,) the token of each assignment
        xs = x[token]                                                    # (N*k, C)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = xs[start:start + n]                                      # (n, C): every token routed to expert e
            h = F.silu(h @ self.gate_proj[e].t()) * (h @ self.up_proj[e].t())
            outs.append(h @ self.down_proj[e].t())
            start += n
        ys = torch.cat(outs) * weights.flatten()[order, None].to(x.dtype)  # (N*k, C)
        return torch.zeros_like(x).index_add_(0, token, ys)              # sum each token's k expert outputs


class MoE(nn.Module):
    """DeepSeekMoE: h + sum_shared FFN(h) + sum_routed g_i FFN_i(h) (the residual is added by Block)."""

    def __init__(self, config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        n_shared = config.n_shared_experts
        self.shared_experts = MLP(config, config.moe_intermediate_size * n_shared) if n_shared else None
        self.load = None  # fraction of assignments per expert in the last forward, (E,)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                           # (N, C)
        idx, weights = self.gate(flat)
        counts = torch.bincount(idx.flatten(), minlength=self.gate.weight.shape[0])  # (E,)
        self.load = counts.float() / idx.numel()
        if self.training:
            self.gate.load_since_update += counts
        y = self.experts(flat, idx, weights, counts).view(B, T, C)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.ffn = MLP(config, config.intermediate_size) if layer < config.first_k_dense_replace else MoE(config)
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.ffn_dropout(self.ffn(self.ffn_norm(x)))


class LatentCache:
    """MLA's cache: per layer and token, only [c_KV | k_R], (kv_lora_rank + qk_rope_head_dim) numbers.
    absorb=True attends to it directly (the decoding path); absorb=False re-expands every head's keys and
    values from the whole cached prefix at each step (what transformers does; kept for bench_mla)."""

    def __init__(self, n_layer, batch, max_len, dim, device, dtype, absorb=True):
        self.latent = torch.empty(n_layer, batch, max_len, dim, device=device, dtype=dtype)
        self.absorb = absorb
        self.pos = 0  # tokens stored so far

    def update(self, layer, latent):
        T = latent.shape[1]
        end = self.pos + T
        self.latent[layer, :, self.pos:end] = latent
        return self.latent[layer, :, :end], causal_mask(T, end, self.pos, latent.device)

    def bytes_per_token(self):
        return cache_bytes_per_token(self, self.latent.shape[1] * self.latent.shape[2])


class KVCache:
    """The MHA-sized cache of per-head keys and values (as gpt2.py), for comparison: bench_mla."""

    def __init__(self, n_layer, batch, n_head, max_len, k_dim, v_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_head, max_len, k_dim, device=device, dtype=dtype)
        self.v = torch.empty(n_layer, batch, n_head, max_len, v_dim, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], causal_mask(T, end, self.pos, k.device)

    def bytes_per_token(self):
        return cache_bytes_per_token(self, self.k.shape[1] * self.k.shape[3])


def cache_bytes_per_token(cache, tokens):
    """Bytes of every tensor the cache allocated, per cached token (of one sequence)."""
    return sum(t.numel() * t.element_size() for t in vars(cache).values() if torch.is_tensor(t)) / tokens


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        inv_freq, self.rope_attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        # as GPT-2: projections that write into the residual stream start smaller, so depth does not grow it
        for name, p in self.named_parameters():
            if name.endswith(("w_o.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (Router, Experts)):
            for p in module.parameters():
                nn.init.normal_(p, mean=0.0, std=0.02)

    def moe_layers(self):
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        x = self.drop(self.embed(idx))                                   # (B, T, C)
        freqs = torch.arange(start, start + T, device=idx.device, dtype=torch.float)[:, None] * self.inv_freq
        freqs = torch.cat((freqs, freqs), dim=-1)                        # (T, d_h^R), "rotate half" layout
        cos = (freqs.cos() * self.rope_attention_factor).to(x.dtype)
        sin = (freqs.sin() * self.rope_attention_factor).to(x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        x = self.norm(x)
        if cache is not None:
            cache.pos += T
        logits = self.head(x)                                            # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ---------------------------------------------------------------- load balancing (train.py hooks)

    @torch.no_grad()
    def after_optimizer_step(self):
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_i -= gamma if expert i got more than the mean
        load since the last step, += gamma if less. train.py calls this right after optimizer.step()."""
        for moe in self.moe_layers():
            load = moe.gate.load_since_update
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)  # one bias for all ranks: balance the global load
            if load.sum() > 0:
                moe.gate.e_score_correction_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
            load.zero_()

    def metrics(self):
        """Expert load of the last forward: `expert_load` (MoE layers, experts), each row the fraction of
        routed assignments per expert (sums to 1), and `expert_imbalance`, max/mean load of the worst layer."""
        loads = [moe.load for moe in self.moe_layers() if moe.load is not None]
        if not loads:
            return {}
        load = torch.stack(loads).detach()
        return {"expert_load": load, "expert_imbalance": (load.max(dim=1).values / load.mean(dim=1)).max()}

    # ---------------------------------------------------------------- accounting

    def num_params(self, non_embedding=True, active=False):
        """Parameters, without the token embedding by default (a lookup, not a matmul; counted when tied,
        as the head). active=True counts only the routed experts a token uses (num_experts_per_tok)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not c.tie_word_embeddings:
            n -= self.embed.weight.numel()
        if active:
            per_expert = 3 * c.n_embd * c.moe_intermediate_size
            n -= len(self.moe_layers()) * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per active parameter, plus attention's QK^T
        (2 * n_head * (d_h + d_h^R) * seq_len) and AV (2 * n_head * d_v * seq_len) per layer, times 3 (PaLM, app. B)."""
        c = self.config
        attn = 2 * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
        return 6 * self.num_params(active=True) + 3 * c.n_layer * attn

    # ---------------------------------------------------------------- tensor parallel

    def tp_plan(self):
        """Shard attention by heads (W_UQ, W_QR, W_UK, W_UV column-wise, W_O row-wise) and the dense and
        shared SwiGLUs by hidden units. The down-projections W_DQ, W_DKV, W_KR and the latents stay
        replicated (they are small: that is MLA's point), and so do the router and the routed experts
        (3-D tensors; expert parallelism is a different plan). Training only: decoding reads whole weights."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        plan = {}
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            for name in ("w_uq", "w_qr", "w_uk", "w_uv"):
                plan[p + "attn." + name] = ColwiseParallel()
            plan[p + "attn.w_o"] = RowwiseParallel()
            mlp = p + "ffn." if isinstance(block.ffn, MLP) else p + "ffn.shared_experts."
            if isinstance(block.ffn, MLP) or block.ffn.shared_experts is not None:
                plan[mlp + "gate_proj"] = ColwiseParallel()
                plan[mlp + "up_proj"] = ColwiseParallel()
                plan[mlp + "down_proj"] = RowwiseParallel()
        return plan

    # ---------------------------------------------------------------- generation with a latent cache

    def make_cache(self, batch, max_len, kind="absorbed", dtype=None):
        """kind: "absorbed" (MLA decoding), "expanded" (latent cached, K/V re-expanded each step) or
        "kv" (per-head K/V cached, as MHA would)."""
        c = self.config
        device, dtype = self.head.weight.device, dtype or self.head.weight.dtype
        if kind in ("absorbed", "expanded"):
            return LatentCache(c.n_layer, batch, max_len, c.kv_lora_rank + c.qk_rope_head_dim, device, dtype,
                               absorb=kind == "absorbed")
        if kind == "kv":
            return KVCache(c.n_layer, batch, c.n_head, max_len, c.qk_nope_head_dim + c.qk_rope_head_dim,
                           c.v_head_dim, device, dtype)
        raise ValueError(f"cache kind={kind!r} is unknown; use 'absorbed', 'expanded' or 'kv'")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False,
                 cache_kind="absorbed"):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        c = self.config
        max_len = min(idx.shape[1] + max_new_tokens, c.block_size)
        cache = self.make_cache(idx.shape[0], max_len, cache_kind)
        logits, _ = self(idx[:, -c.block_size:], cache=cache)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if cache.pos == max_len:
                # the context is full: the window slides, and the cropped prefix is encoded again
                cache.pos = 0
                logits, _ = self(idx[:, -c.block_size:], cache=cache)  # nanoGPT's crop: the last block_size tokens
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    @staticmethod
    def _rope_permutation(dim):
        """DeepSeek pairs rope dims (0,1), (2,3), ...; this file pairs (i, i + dim/2): rows [0, 2, ..., 1, 3, ...]."""
        return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face DeepseekV3ForCausalLM directory (config.json + model.safetensors)."""
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type") != "deepseek_v3":
            raise ValueError(f"{path} holds a {hf.get('model_type')!r} model, not deepseek_v3; use the matching "
                             f"--model or a DeepseekV3ForCausalLM checkpoint")
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("scoring_func", "sigmoid"),
                          ("topk_method", "noaux_tc")):
            if key in hf and hf[key] != want:
                raise ValueError(f"{key}={hf[key]!r} is not supported by gaia's mla.py (it implements {want!r})")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        yarn = {}
        if rope_type == "yarn":
            if "attention_factor" in rope or not rope.get("truncate", True):
                raise ValueError("yarn with an explicit attention_factor or truncate=False is not supported by mla.py")
            orig = rope.get("original_max_position_embeddings", hf["max_position_embeddings"])
            yarn = dict(rope_factor=rope.get("factor") or hf["max_position_embeddings"] / orig,
                        original_max_position_embeddings=orig, beta_fast=rope.get("beta_fast") or 32.0,
                        beta_slow=rope.get("beta_slow") or 1.0, mscale=rope.get("mscale") or 0.0,
                        mscale_all_dim=rope.get("mscale_all_dim") or 0.0)
        elif rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r} is not supported by mla.py; it implements 'default' and 'yarn'")
        n_layer = hf["num_hidden_layers"]
        config = Config(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=n_layer,
            n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], dropout=0.0,
            q_lora_rank=hf.get("q_lora_rank") or None, kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), **yarn,
            intermediate_size=hf["intermediate_size"],
            first_k_dense_replace=min(hf.get("first_k_dense_replace", 3), n_layer),
            moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0,
            n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0), norm_topk_prob=hf.get("norm_topk_prob", True),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False))
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)

        state = load_file(os.path.join(path, "model.safetensors"))
        H, dn, dr, r = config.n_head, config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
        perm = cls._rope_permutation(dr) if hf.get("rope_interleave", True) else torch.arange(dr)
        own = {"embed.weight": state.pop("model.embed_tokens.weight"), "norm.weight": state.pop("model.norm.weight")}
        if "lm_head.weight" in state:
            own["head.weight"] = state.pop("lm_head.weight")
        for i in range(n_layer):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            take = lambda name: state.pop(p + name)
            own[q + "attn_norm.weight"] = take("input_layernorm.weight")
            own[q + "ffn_norm.weight"] = take("post_attention_layernorm.weight")
            a = q + "attn."
            if config.q_lora_rank:
                own[a + "w_dq.weight"] = take("self_attn.q_a_proj.weight")
                own[a + "q_norm.weight"] = take("self_attn.q_a_layernorm.weight")
                w_q = take("self_attn.q_b_proj.weight")
            else:
                w_q = take("self_attn.q_proj.weight")
            w_q = w_q.view(H, dn + dr, -1)  # HF: per head, [nope rows | rope rows]
            own[a + "w_uq.weight"] = w_q[:, :dn].reshape(H * dn, -1)
            own[a + "w_qr.weight"] = w_q[:, dn:][:, perm].reshape(H * dr, -1)
            w_kv_a = take("self_attn.kv_a_proj_with_mqa.weight")  # [c_KV rows | k_R rows]
            own[a + "w_dkv.weight"] = w_kv_a[:r]
            own[a + "w_kr.weight"] = w_kv_a[r:][perm]
            own[a + "kv_norm.weight"] = take("self_attn.kv_a_layernorm.weight")
            w_kv_b = take("self_attn.kv_b_proj.weight").view(H, dn + config.v_head_dim, r)  # per head, [k | v]
            own[a + "w_uk.weight"] = w_kv_b[:, :dn].reshape(-1, r)
            own[a + "w_uv.weight"] = w_kv_b[:, dn:].reshape(-1, r)
            own[a + "w_o.weight"] = take("self_attn.o_proj.weight")
            f = q + "ffn."
            if i < config.first_k_dense_replace:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    own[f + name + ".weight"] = take(f"mlp.{name}.weight")
                continue
            own[f + "gate.weight"] = take("mlp.gate.weight")
            own[f + "gate.e_score_correction_bias"] = take("mlp.gate.e_score_correction_bias")
            for name in ("gate_proj", "up_proj", "down_proj"):  # with n_shared_experts=0 transformers stores empty ones
                w = take(f"mlp.shared_experts.{name}.weight")
                if config.n_shared_experts:
                    own[f"{f}shared_experts.{name}.weight"] = w
            if p + "mlp.experts.gate_up_proj" in state:  # transformers 5 fused layout: (E, 2I, C) and (E, C, I)
                gate, up = take("mlp.experts.gate_up_proj").chunk(2, dim=1)
                own[f + "experts.gate_proj"], own[f + "experts.up_proj"] = gate, up
                own[f + "experts.down_proj"] = take("mlp.experts.down_proj")
            else:  # DeepSeek's per-expert layout, what transformers' save_pretrained writes
                for name in ("gate_proj", "up_proj", "down_proj"):
                    own[f"{f}experts.{name}"] = torch.stack(
                        [take(f"mlp.experts.{e}.{name}.weight") for e in range(config.n_routed_experts)])
        # what remains: multi-token-prediction layers (model.layers.{n_layer}...), which mla.py does not use
        unused = [k for k in state if not k.startswith(f"model.layers.{n_layer}.")]
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [m for m in missing if not (m == "head.weight" and config.tie_word_embeddings)]
        if missing or unexpected or unused:
            raise ValueError(f"{path} does not match DeepSeek-V3's layout: missing {missing[:5]}, "
                             f"unexpected {(unexpected + unused)[:5]}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face DeepseekV3ForCausalLM directory: transformers' from_pretrained loads it."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        c = self.config
        H, dn, dr, r = c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        inv = torch.argsort(self._rope_permutation(dr))  # back to DeepSeek's interleaved pairs
        sd = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        state = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
        if not c.tie_word_embeddings:
            state["lm_head.weight"] = sd["head.weight"]
        for i, block in enumerate(self.layers):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            a = q + "attn."
            state[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
            state[p + "post_attention_layernorm.weight"] = sd[q + "ffn_norm.weight"]
            w_q = torch.cat((sd[a + "w_uq.weight"].view(H, dn, -1), sd[a + "w_qr.weight"].view(H, dr, -1)[:, inv]), 1)
            if c.q_lora_rank:
                state[p + "self_attn.q_a_proj.weight"] = sd[a + "w_dq.weight"]
                state[p + "self_attn.q_a_layernorm.weight"] = sd[a + "q_norm.weight"]
                state[p + "self_attn.q_b_proj.weight"] = w_q.reshape(H * (dn + dr), -1)
            else:
                state[p + "self_attn.q_proj.weight"] = w_q.reshape(H * (dn + dr), -1)
            w_kv_a = torch.cat((sd[a + "w_dkv.weight"], sd[a + "w_kr.weight"][inv]))
            state[p + "self_attn.kv_a_proj_with_mqa.weight"] = w_kv_a
            state[p + "self_attn.kv_a_layernorm.weight"] = sd[a + "kv_norm.weight"]
            w_kv_b = torch.cat((sd[a + "w_uk.weight"].view(H, dn, r), sd[a + "w_uv.weight"].view(H, -1, r)), 1)
            state[p + "self_attn.kv_b_proj.weight"] = w_kv_b.reshape(-1, r)
            state[p + "self_attn.o_proj.weight"] = sd[a + "w_o.weight"]
            f = q + "ffn."
            if isinstance(block.ffn, MLP):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    state[f"{p}mlp.{name}.weight"] = sd[f"{f}{name}.weight"]
                continue
            state[p + "mlp.gate.weight"] = sd[f + "gate.weight"]
            state[p + "mlp.gate.e_score_correction_bias"] = sd[f + "gate.e_score_correction_bias"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                w = sd.get(f"{f}shared_experts.{name}.weight")  # none: transformers still wants (empty) tensors
                state[f"{p}mlp.shared_experts.{name}.weight"] = w if w is not None else torch.zeros(
                    (0, c.n_embd) if name != "down_proj" else (c.n_embd, 0))
            for name in ("gate_proj", "up_proj", "down_proj"):  # per expert, as transformers' save_pretrained writes
                for e, w in enumerate(sd[f"{f}experts.{name}"]):
                    state[f"{p}mlp.experts.{e}.{name}.weight"] = w
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_factor != 1.0:
            rope.update(rope_type="yarn", factor=c.rope_factor, beta_fast=c.beta_fast, beta_slow=c.beta_slow,
                        original_max_position_embeddings=c.original_max_position_embeddings)
            rope.update({k: getattr(c, k) for k in ("mscale", "mscale_all_dim") if getattr(c, k)})
        hf = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=c.vocab_size,
                  hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                  moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_head, n_shared_experts=c.n_shared_experts,
                  n_routed_experts=c.n_routed_experts, routed_scaling_factor=c.routed_scaling_factor,
                  kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None,
                  qk_rope_head_dim=dr, qk_nope_head_dim=dn, v_head_dim=c.v_head_dim, n_group=c.n_group,
                  topk_group=c.topk_group, num_experts_per_tok=c.num_experts_per_tok,
                  first_k_dense_replace=c.first_k_dense_replace, norm_topk_prob=c.norm_topk_prob,
                  hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.rms_norm_eps,
                  rope_parameters=rope, rope_interleave=True, attention_bias=False, attention_dropout=0.0,
                  tie_word_embeddings=c.tie_word_embeddings, initializer_range=0.02, num_nextn_predict_layers=0)
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
