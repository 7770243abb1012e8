"""
DeepSeek-V3 (DeepSeek-AI 2024) in one file: multi-head latent attention (MLA, DeepSeek-V2 2024, §2.1)
and the DeepSeekMoE feed-forward with auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2).

The nearest gaia model is moe.py (Llama's blocks with a sparse MoE feed-forward). What differs:
- attention: MLA instead of grouped-query attention. Keys and values of each token are compressed into one
  latent c_KV of kv_lora_rank numbers, plus one rope key k_R of qk_rope_head_dim numbers shared by every
  head (queries optionally go through a latent of q_lora_rank too). Training expands the latent into per-head
  keys and values; decoding never does: W_UK is folded into the query and W_UV into the output, so attention
  runs against the cached latents, (kv_lora_rank + qk_rope_head_dim) numbers per token and layer instead of
  MHA's 2 * n_head * head_dim. Names follow the DeepSeek-V2 paper: W_DQ, W_UQ, W_QR (queries), W_DKV, W_UK,
  W_UV, W_KR (keys and values), W_O.
- feed-forward: the first first_k_dense_replace layers are dense SwiGLUs; the others are DeepSeekMoE layers:
  n_shared_experts experts every token goes through, plus n_experts fine-grained routed experts chosen by
  sigmoid affinities, group-limited (n_group, topk_group). Balance comes from a per-expert bias
  (e_score_correction_bias) that only steers the choice, never the weights, moved after each optimizer step
  (after_optimizer_step) against the load it saw: no auxiliary loss.
- RoPE with DeepSeek-V3's YaRN context extension (rope_factor > 1).
Loads and saves the Hugging Face DeepseekV3ForCausalLM layout (interop at the end of the file).
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import kernels


@dataclass
class Config:
    vocab_size: int = 50304      # train.py sets this from the tokenizer
    block_size: int = 256        # maximum context (max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-6       # RMSNorm's epsilon (rms_norm_eps in DeepSeek-V3)
    tie_word_embeddings: bool = False
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
    n_experts: int = 8                  # N_r: routed experts (n_routed_experts in DeepSeek-V3)
    n_experts_per_tok: int = 2          # K_r: routed experts per token
    n_shared_experts: int = 1           # N_s: experts every token goes through
    n_group: int = 1                    # experts are split in n_group groups (nodes, in DeepSeek-V3) ...
    topk_group: int = 1                 # ... and a token may only pick from its topk_group best groups
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True         # renormalise the chosen affinities to sum to 1
    bias_update_speed: float = 0.001    # gamma: step of the aux-loss-free bias, per optimizer step

    def __post_init__(self):
        if self.q_lora_rank == 0:  # 0 and None both mean the full query projection; keep one spelling
            self.q_lora_rank = None
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "q_lora_rank", "kv_lora_rank",
                    "qk_nope_head_dim", "v_head_dim", "original_max_position_embeddings", "intermediate_size",
                    "moe_intermediate_size", "n_experts", "n_experts_per_tok", "n_group", "topk_group"):
            # None: q_lora_rank's full projection; vocab_size, which train.py sets once it knows the tokenizer
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1; e.g. --{key}={getattr(Config, key)}")
        for key in ("norm_eps", "rope_theta", "routed_scaling_factor", "beta_slow"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0; e.g. --{key}={getattr(Config, key)}")
        for key in ("n_shared_experts", "mscale", "mscale_all_dim", "bias_update_speed"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0; e.g. --{key}={getattr(Config, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); e.g. --dropout=0.1")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 2: RoPE turns pairs of "
                             f"numbers; e.g. --qk_rope_head_dim={max(2, self.qk_rope_head_dim // 2 * 2)}")
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1: 1 is plain RoPE, more extends the context "
                             f"with YaRN; e.g. --rope_factor=1")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast={self.beta_fast} must be larger than beta_slow={self.beta_slow}: YaRN keeps "
                             f"the dims that turn more than beta_fast times; e.g. --beta_fast=32 --beta_slow=1")
        if not 0 <= self.first_k_dense_replace <= self.n_layer:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be in 0..n_layer="
                             f"{self.n_layer}: it counts the dense layers before the MoE ones")
        if self.first_k_dense_replace == self.n_layer:
            return  # no MoE layer: the routing keys are unused
        E, G, k = self.n_experts, self.n_group, self.n_experts_per_tok
        if E % G:
            raise ValueError(f"n_group={G} does not divide n_experts={E}; the experts split into equal groups "
                             f"(e.g. --n_group=1)")
        if E // G < 2:
            raise ValueError(f"n_group={G} leaves {E // G} expert per group, and a group is scored by its best two; "
                             f"lower n_group or raise n_experts={E}")
        if self.topk_group > G:
            raise ValueError(f"topk_group={self.topk_group} is larger than n_group={G}: a token picks topk_group "
                             f"of the groups; e.g. --topk_group={G}")
        if k > E:
            raise ValueError(f"n_experts_per_tok={k} is larger than n_experts={E}; "
                             f"e.g. --n_experts_per_tok={min(2, E)}")
        if k > self.topk_group * E // G:
            raise ValueError(f"n_experts_per_tok={k} is more than the {self.topk_group * E // G} experts of a token's "
                             f"topk_group={self.topk_group} groups; raise topk_group or lower n_experts_per_tok")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, the weight applied in the input's dtype (as DeepSeek / HF do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # weight * x / sqrt(mean(x^2) + eps), fp32 statistics


def rope_frequencies(config, dim):
    """Inverse frequencies (dim/2,): theta^(-2i/dim), and with rope_factor > 1 YaRN's (Peng et al. 2023, §3.2):
    dims that turn many times over the original context keep their frequency, slow ones are interpolated
    (divided by rope_factor), with a linear ramp between the dims that turn beta_fast and beta_slow times."""
    c = config
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if c.rope_factor == 1.0:
        return inv_freq

    L, theta = c.original_max_position_embeddings, c.rope_theta

    def correction_dim(rotations):  # the dim whose frequency turns `rotations` times over the original context
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(c.beta_fast)), 0)
    high = min(math.ceil(correction_dim(c.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    return inv_freq / c.rope_factor * ramp + inv_freq * (1 - ramp)


def yarn_mscale(scale, mscale=1.0):
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (§3.4), DeepSeek's mscale weighting the log."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(config):
    """YaRN multiplies every attention logit by 1/t by scaling cos and sin by sqrt(1/t) (§3.4). DeepSeek-V3 moves
    part of it into the softmax scale (MultiHeadLatentAttention): cos and sin keep
    yarn_mscale(rope_factor, mscale) / yarn_mscale(rope_factor, mscale_all_dim)."""
    c = config
    if c.rope_factor == 1.0:
        return 1.0
    if c.mscale and c.mscale_all_dim:
        return yarn_mscale(c.rope_factor, c.mscale) / yarn_mscale(c.rope_factor, c.mscale_all_dim)
    return yarn_mscale(c.rope_factor)


# The rotation itself is kernels.rope(q, k, cos, sin): x cos + rotate_half(x) sin, pairs (i, i + dim/2) turning by
# angle pos * inv_freq[i]. DeepSeek's checkpoints pair (2i, 2i+1) instead: the interop fence permutes the rope rows
# of W_QR and W_KR.


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        H = c.n_head
        # queries: c_Q = RMSNorm(W_DQ h), q_C = W_UQ c_Q, q_R = RoPE(W_QR c_Q); without q_lora_rank, c_Q = h
        if c.q_lora_rank is not None:
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
            self.softmax_scale *= yarn_mscale(c.rope_factor, c.mscale_all_dim) ** 2
        self.dropout = c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        q_c, q_r, c_kv, k_r = self.project(x, cos, sin)
        if cache is None:  # training: every head's keys and values expanded from the latents
            return self.resid_dropout(self.expanded(q_c, q_r, c_kv, k_r))
        latent, mask = cache.update(layer, torch.cat((c_kv, k_r[:, :, 0]), dim=-1))  # (B, pos + T, d_c + d_h^R)
        if x.shape[1] == 1:  # decoding: memory-bound, attend to the cached latents themselves
            return self.resid_dropout(self.absorbed(q_c, q_r, latent))
        # prefill: compute-bound, and expanded heads cost fewer FLOPs per query-key pair, H * (d_h + d_h^R + d_v)
        # vs H * (2 d_c + d_h^R) absorbed; so expand the whole prefix
        r = self.kv_lora_rank
        return self.resid_dropout(self.expanded(q_c, q_r, latent[..., :r], latent[:, :, None, r:], mask))

    def project(self, x, cos, sin):
        """Per head the query [q_C | q_R]; per token the latent c_KV and the rope key k_R that all heads share."""
        B, T, _ = x.shape
        dn, dr = self.nope_dim, self.rope_dim
        c_q = self.q_norm(self.w_dq(x)) if self.w_dq is not None else x  # (B, T, q_lora_rank)
        q_c = self.w_uq(c_q).view(B, T, -1, dn)                           # (B, T, H, d_h)
        c_kv = self.kv_norm(self.w_dkv(x))                                # (B, T, d_c)
        q_r, k_r = kernels.rope(self.w_qr(c_q).view(B, T, -1, dr),        # (B, T, H, d_h^R)
                                self.w_kr(x).view(B, T, 1, dr), cos, sin)  # (B, T, 1, d_h^R)
        if isinstance(self.w_uk.weight, DTensor):  # tensor parallel (tp_plan): this rank holds some heads ...
            k_r = sum_grad_over_shards(k_r, self.w_uk.weight.device_mesh)  # ... and k_R serves them all
        return q_c, q_r, c_kv, k_r

    def expanded(self, q_c, q_r, c_kv, k_r, mask=None):
        """Attention of T queries to S >= T keys, every head's keys [W_UK c_KV | k_R] and values W_UV c_KV
        expanded from the latents: training (causal) and prefill (mask: the cached prefix and causal)."""
        B, T, _, dn = q_c.shape
        S = c_kv.shape[1]
        k_c = self.w_uk(c_kv).view(B, S, -1, dn)                          # (B, S, H, d_h)
        v = self.w_uv(c_kv).view(B, S, -1, self.v_dim).transpose(1, 2)    # (B, H, S, d_v)
        q = torch.cat((q_c, q_r), dim=-1).transpose(1, 2)                 # (B, H, T, d_h + d_h^R)
        k = torch.cat((k_c, k_r.expand(-1, -1, k_c.shape[2], -1)), dim=-1).transpose(1, 2)  # (B, H, S, d_h + d_h^R)
        if mask is None:  # training: causal (flash attention on GPUs where d_v is the q/k width; kernels.py)
            y = kernels.attention(q, k, v, causal=T > 1, dropout_p=self.dropout if self.training else 0.0,
                                  scale=self.softmax_scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        y = y.transpose(1, 2).reshape(B, T, -1)                           # (B, T, H * d_v)
        return self.w_o(y)

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


def sum_grad_over_shards(x, mesh):
    """Identity forward; backward sums x's gradient over the tensor-parallel ranks (each rank's heads add
    their part). For the replicated rope key, which no stock ParallelStyle covers."""
    from torch.distributed.tensor import Partial, Replicate
    return DTensor.from_local(x, mesh, [Replicate()]).to_local(grad_placements=[Partial()])


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, config, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class Router(nn.Module):
    """Sigmoid affinities s_i = sigmoid(e_i . h), group-limited top-k on s_i + b_i (DeepSeek-V3 eq. 13-16)."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.n_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_experts, c.n_embd))  # e_i: expert centroids
        # b_i: steers which experts are chosen, never how much they weigh; moved by after_optimizer_step
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_experts))
        # tokens each expert received since the last bias update (training forwards only)
        self.register_buffer("load_since_update", torch.zeros(c.n_experts), persistent=False)

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
    """n_experts SwiGLU experts stored as 3-D tensors (expert, out, in)."""

    def __init__(self, config):
        super().__init__()
        E, C, I = config.n_experts, config.n_embd, config.moe_intermediate_size
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
        self.load = None  # fraction of assignments per expert in the last training forward, (E,)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                           # (N, C)
        idx, weights = self.gate(flat)
        counts = torch.bincount(idx.flatten(), minlength=self.gate.weight.shape[0])  # (E,)
        if self.training and torch.is_grad_enabled():  # the load of training batches only: evals, generation
            self.load = counts.float() / idx.numel()     # and no_grad forwards neither log nor steer the bias
            self.gate.load_since_update += counts
        y = self.experts(flat, idx, weights, counts).view(B, T, C)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MultiHeadLatentAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config, config.intermediate_size) if layer < config.first_k_dense_replace else MoE(config)
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        return x + self.mlp_dropout(self.mlp(self.ln_2(x)))


class LatentCache:
    """MLA's cache: per layer and token only the latent [c_KV | k_R], kv_lora_rank + qk_rope_head_dim numbers
    (MHA would keep 2 * n_head * head_dim), preallocated for the whole generation. Decoding attends to it
    directly (MultiHeadLatentAttention.absorbed); a prefill expands it."""

    def __init__(self, n_layer, batch, max_len, dim, device, dtype):
        self.latent = torch.empty(n_layer, batch, max_len, dim, device=device, dtype=dtype)
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self):
        return self.latent.nbytes

    @property
    def bytes_per_token(self):
        """Bytes the cache holds per token of one sequence, all layers: n_layer * (d_c + d_h^R) * dtype size."""
        n_layer, _, _, dim = self.latent.shape
        return n_layer * dim * self.latent.element_size()

    def update(self, layer, latent):
        T = latent.shape[1]
        end = self.pos + T
        self.latent[layer, :, self.pos:end] = latent
        # new query i (absolute position pos + i) may see keys 0 .. pos + i
        mask = None
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=latent.device).tril(diagonal=self.pos)
        return self.latent[layer, :, :end], mask


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # RoPE's cos and sin of every position (block_size, d_h^R), rotate-half layout: dims i and i + d/2 share
        # a frequency. Not in the state_dict: they follow from the config
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float),
                             rope_frequencies(config, config.qk_rope_head_dim))
        angles = torch.cat((angles, angles), dim=-1)
        factor = rope_attention_factor(config)
        self.register_buffer("cos", angles.cos() * factor, persistent=False)
        self.register_buffer("sin", angles.sin() * factor, persistent=False)
        self.apply(self._init_weights)
        # as GPT-2: projections that write into the residual stream start smaller, so depth does not grow it
        for name, p in self.named_parameters():
            if name.endswith(("w_o.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        """GPT-2's init (std 0.02, DeepSeek-V3's initializer_range too):
        | tensor                                                  | init                                            |
        | wte, lm_head                                            | normal(0, 0.02)                                 |
        | w_dq, w_uq, w_qr, w_dkv, w_uk, w_uv, w_kr               | normal(0, 0.02)                                 |
        | gate_proj, up_proj (dense, shared and routed experts)   | normal(0, 0.02)                                 |
        | router weight e_i                                       | normal(0, 0.02)                                 |
        | w_o, down_proj (dense, shared and routed experts)       | normal(0, 0.02 / sqrt(2 * n_layer)), after this |
        | RMSNorm weights (ln_1, ln_2, ln_f, q_norm, kv_norm)     | 1                                               |
        | e_score_correction_bias (a buffer)                      | 0                                               |"""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (Router, Experts)):
            for p in module.parameters():
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        x = self.transformer.drop(self.transformer.wte(idx))             # (B, T, C)
        cos = self.cos[start:start + T, None, :].to(x.dtype)            # (T, 1, d_h^R): the same for every head
        sin = self.sin[start:start + T, None, :].to(x.dtype)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is not None and not need_logits:  # the loss alone (training): the head and the loss fused
            loss = kernels.linear_cross_entropy(x, self.lm_head, targets)  # chunk by chunk, no (B, T, vocab) logits
            logits = None
        else:
            logits = self.lm_head(x)                                         # (B, T, vocab_size)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def make_cache(self, batch, max_len):
        """An empty latent cache for batch sequences of up to max_len tokens, in the parameters' dtype and device."""
        c = self.config
        param = self.lm_head.weight
        return LatentCache(c.n_layer, batch, max_len, c.kv_lora_rank + c.qk_rope_head_dim, param.device, param.dtype)

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

    # ---------------------------------------------------------------- load balancing (train.py hooks)

    def moe_layers(self):
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    @torch.no_grad()
    def after_optimizer_step(self, step, total_steps):
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_i -= gamma if expert i got more than the mean
        load since the last step, += gamma if less. train.py calls this right after optimizer.step(), with the
        steps done and the run's total (a constant gamma needs neither)."""
        for moe in self.moe_layers():
            load = moe.gate.load_since_update
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)  # one bias for all ranks: balance the global load
            if load.sum() > 0:
                moe.gate.e_score_correction_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
            load.zero_()

    def metrics(self):
        """Expert load of the last training forward: `expert_load` (MoE layers, experts), each row the fraction
        of routed assignments per expert (sums to 1), and `expert_imbalance`, max/mean load of the worst layer."""
        loads = [moe.load for moe in self.moe_layers() if moe.load is not None]
        if not loads:
            return {}
        load = torch.stack(loads).detach()
        return {"expert_load": load, "expert_imbalance": (load.max(dim=1).values / load.mean(dim=1)).max()}

    # ---------------------------------------------------------------- accounting

    def num_params(self, non_embedding=True, active=False):
        """Parameters, without the token embedding by default (a lookup, not a matmul; counted when tied,
        as the head). active=True counts only the routed experts a token uses (n_experts_per_tok)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not c.tie_word_embeddings:
            n -= self.transformer.wte.weight.numel()
        if active:
            per_expert = 3 * c.n_embd * c.moe_intermediate_size
            n -= len(self.moe_layers()) * (c.n_experts - c.n_experts_per_tok) * per_expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per active parameter, plus attention's QK^T
        (2 * n_head * (d_h + d_h^R) * seq_len) and AV (2 * n_head * d_v * seq_len) per layer, times 3 (PaLM, app. B)."""
        c = self.config
        attn = 2 * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
        return 6 * self.num_params(active=True) + 3 * c.n_layer * attn

    def tp_plan(self):
        """Megatron tensor parallel: attention split by heads (W_UQ, W_QR, W_UK, W_UV column-wise, W_O row-wise),
        the dense and shared SwiGLUs by hidden units. The down-projections W_DQ, W_DKV, W_KR and the latents stay
        replicated (they are small: that is MLA's point), and so do the router and the routed experts (3-D
        tensors; expert parallelism is a different plan). Training only: decoding reads whole weights."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        plan = {"transformer.h.*.attn.w_uq": ColwiseParallel(),
                "transformer.h.*.attn.w_qr": ColwiseParallel(),
                "transformer.h.*.attn.w_uk": ColwiseParallel(),
                "transformer.h.*.attn.w_uv": ColwiseParallel(),
                "transformer.h.*.attn.w_o": RowwiseParallel(),
                "transformer.h.*.mlp.gate_proj": ColwiseParallel(),  # dense layers
                "transformer.h.*.mlp.up_proj": ColwiseParallel(),
                "transformer.h.*.mlp.down_proj": RowwiseParallel(),
                "transformer.h.*.mlp.shared_experts.gate_proj": ColwiseParallel(),  # MoE layers
                "transformer.h.*.mlp.shared_experts.up_proj": ColwiseParallel(),
                "transformer.h.*.mlp.shared_experts.down_proj": RowwiseParallel()}
        # dense and MoE layers hold different modules, and parallelize_module warns about every layer that a
        # pattern misses: the plan names each module this model has
        names = [name for name, _ in self.named_modules()]
        return {name: style for pattern, style in plan.items()
                for name in names if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), name)}

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


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_embd": "hidden_size", "norm_eps": "rms_norm_eps",
             "tie_word_embeddings": "tie_word_embeddings", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
             "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
             "intermediate_size": "intermediate_size", "first_k_dense_replace": "first_k_dense_replace",
             "moe_intermediate_size": "moe_intermediate_size", "n_experts": "n_routed_experts",
             "n_experts_per_tok": "num_experts_per_tok", "n_shared_experts": "n_shared_experts", "n_group": "n_group",
             "topk_group": "topk_group", "routed_scaling_factor": "routed_scaling_factor",
             "norm_topk_prob": "norm_topk_prob"}
# and: rope_theta and YaRN's keys sit in rope_parameters (transformers 5; rope_scaling and rope_theta before),
# with YaRN's factor as rope_factor; dropout is not a key of DeepSeek-V3's config (loaded as 0: set it to fine-tune)
HF_YARN = {"rope_factor": "factor", "original_max_position_embeddings": "original_max_position_embeddings",
           "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim"}

HF_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.h.{i}.attn.w_dq.weight": "model.layers.{i}.self_attn.q_a_proj.weight",
    "transformer.h.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_a_layernorm.weight",
    # per head [W_UQ rows | W_QR rows] (split below); without q_lora_rank the tensor is q_proj
    "transformer.h.{i}.attn.w_uq.weight": "model.layers.{i}.self_attn.q_b_proj.weight",
    "transformer.h.{i}.attn.w_qr.weight": "model.layers.{i}.self_attn.q_b_proj.weight",
    # [W_DKV rows | W_KR rows]
    "transformer.h.{i}.attn.w_dkv.weight": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "transformer.h.{i}.attn.w_kr.weight": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "transformer.h.{i}.attn.kv_norm.weight": "model.layers.{i}.self_attn.kv_a_layernorm.weight",
    # per head [W_UK rows | W_UV rows]
    "transformer.h.{i}.attn.w_uk.weight": "model.layers.{i}.self_attn.kv_b_proj.weight",
    "transformer.h.{i}.attn.w_uv.weight": "model.layers.{i}.self_attn.kv_b_proj.weight",
    "transformer.h.{i}.attn.w_o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.h.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    # dense layers
    "transformer.h.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "transformer.h.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "transformer.h.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    # MoE layers; the routed experts, stacked (n_experts, out, in) here, are one tensor per expert {j} in HF
    "transformer.h.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate.weight",
    "transformer.h.{i}.mlp.gate.e_score_correction_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "transformer.h.{i}.mlp.shared_experts.gate_proj.weight": "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "transformer.h.{i}.mlp.shared_experts.up_proj.weight": "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "transformer.h.{i}.mlp.shared_experts.down_proj.weight": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
    "transformer.h.{i}.mlp.experts.gate_proj": "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
    "transformer.h.{i}.mlp.experts.up_proj": "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
    "transformer.h.{i}.mlp.experts.down_proj": "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# the gaia models these Hugging Face model types load into, for the wrong-model message
GAIA_FILES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "moe", "qwen3_moe": "moe", "mamba": "mamba",
              "mamba2": "mamba"}


def layer_names(model):
    """HF_NAMES with {i} filled in, for the tensors this model has: gaia parameter -> HF tensor name ({j}: expert)."""
    own = model.state_dict()
    names = {}
    for ours, theirs in HF_NAMES.items():
        for i in range(model.config.n_layer):
            if ours.format(i=i) in own:
                names[ours.format(i=i)] = theirs.format(i=i, j="{j}")
    if model.config.q_lora_rank is None:
        names = {k: v.replace("q_b_proj", "q_proj") for k, v in names.items()}
    if model.config.tie_word_embeddings:
        del names["lm_head.weight"]  # it is wte's tensor
    return names


def rope_halves_from_pairs(dim):
    """DeepSeek pairs rope dims (0, 1), (2, 3), ...; gaia pairs (i, i + dim/2): rows [0, 2, ..., 1, 3, ...]."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


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


def config_from_hf(hf, path):
    """gaia's Config from a DeepseekV3 config.json (hf, read from path); a clear error for what mla.py lacks."""
    t = hf.get("model_type")
    if t != "deepseek_v3":
        raise ValueError(f"{path} holds a {t!r} model, not deepseek_v3; use "
                         + (f"--model={GAIA_FILES[t]}" if t in GAIA_FILES else "a DeepseekV3ForCausalLM checkpoint"))
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("scoring_func", "sigmoid"),
                      ("topk_method", "noaux_tc")):
        if key in hf and hf[key] != want:
            raise ValueError(f"{key}={hf[key]!r} is not supported by gaia's mla.py (it implements {want!r})")
    values = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items() if theirs in hf}
    # transformers allows more dense layers than layers (all dense); its default is 3
    values["first_k_dense_replace"] = min(hf.get("first_k_dense_replace", 3), hf["num_hidden_layers"])
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        if "attention_factor" in rope or not rope.get("truncate", True):
            raise ValueError("yarn with an explicit attention_factor or truncate=False is not supported by mla.py")
        values.update({ours: rope[theirs] for ours, theirs in HF_YARN.items() if rope.get(theirs)})
        orig = values["original_max_position_embeddings"] = (rope.get("original_max_position_embeddings")
                                                             or hf["max_position_embeddings"])
        if not rope.get("factor"):  # transformers' rule: the extension the two lengths imply
            values["rope_factor"] = hf["max_position_embeddings"] / orig
    elif rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported by mla.py; it implements 'default' and 'yarn'")
    return Config(**values)


def from_hf(path):
    """A gaia Model holding the weights of a local Hugging Face DeepseekV3ForCausalLM directory."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    model = Model(config_from_hf(hf, path))
    c = model.config
    H, dn, dr, dv, r = c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    hf_state = read_safetensors(path)
    perm = rope_halves_from_pairs(dr) if hf.get("rope_interleave", True) else torch.arange(dr)
    used = set()

    def take(name):
        if name not in hf_state:
            raise ValueError(f"{path} does not match DeepSeek-V3's layout: {name} is missing")
        used.add(name)
        return hf_state[name]

    state = {}
    for ours, theirs in layer_names(model).items():
        module = ours.split(".")[-2]
        # routed experts: one tensor per expert, or transformers 5 fused: (E, 2I, C) gate_up_proj, (E, C, I) down_proj
        if "{j}" in theirs:
            if theirs.format(j=0) in hf_state:
                state[ours] = torch.stack([take(theirs.format(j=j)) for j in range(c.n_experts)])
            elif ours.endswith("down_proj"):
                state[ours] = take(theirs.split("{j}")[0] + "down_proj")
            else:
                gate, up = take(theirs.split("{j}")[0] + "gate_up_proj").chunk(2, dim=1)
                state[ours] = gate if ours.endswith("gate_proj") else up
            continue
        w = take(theirs)
        if module in ("w_uq", "w_qr"):
            w = w.view(H, dn + dr, -1)
            w = w[:, :dn] if module == "w_uq" else w[:, dn:][:, perm]
            w = w.reshape(-1, w.shape[-1])
        elif module in ("w_dkv", "w_kr"):
            w = w[:r] if module == "w_dkv" else w[r:][perm]
        elif module in ("w_uk", "w_uv"):
            w = w.view(H, dn + dv, r)
            w = (w[:, :dn] if module == "w_uk" else w[:, dn:]).reshape(-1, r)
        state[ours] = w
    if c.tie_word_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    # left alone: multi-token-prediction layers (model.layers.{n_layer}...), which mla.py does not use, and the
    # empty shared experts transformers stores when n_shared_experts=0
    unused = [k for k in hf_state if k not in used and not k.startswith(f"model.layers.{c.n_layer}.")
              and hf_state[k].numel() > 0 and not (k == "lm_head.weight" and c.tie_word_embeddings)]
    if unused:
        raise ValueError(f"{path} does not match DeepSeek-V3's layout: unexpected {unused[:5]}")
    model.load_state_dict(state)
    return model


def to_hf(model, path):
    """Write a Hugging Face DeepseekV3ForCausalLM directory: transformers' from_pretrained loads it."""
    from safetensors.torch import save_file
    c = model.config
    H, dn, dr, dv, r = c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    inv = torch.argsort(rope_halves_from_pairs(dr))  # back to DeepSeek's interleaved pairs
    own = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf_state = {}
    for ours, theirs in layer_names(model).items():
        module, w = ours.split(".")[-2], own[ours]
        if "{j}" in theirs:  # per expert, as transformers' save_pretrained writes
            hf_state.update({theirs.format(j=j): w[j] for j in range(c.n_experts)})
        elif module == "w_uq":
            w_qr = own[ours.replace("w_uq", "w_qr")].view(H, dr, -1)[:, inv]
            hf_state[theirs] = torch.cat((w.view(H, dn, -1), w_qr), dim=1).reshape(H * (dn + dr), -1)
        elif module == "w_dkv":
            hf_state[theirs] = torch.cat((w, own[ours.replace("w_dkv", "w_kr")][inv]))
        elif module == "w_uk":
            w_uv = own[ours.replace("w_uk", "w_uv")].view(H, dv, r)
            hf_state[theirs] = torch.cat((w.view(H, dn, r), w_uv), dim=1).reshape(-1, r)
        elif module not in ("w_qr", "w_kr", "w_uv"):  # those three went in with their partners above
            hf_state[theirs] = w
    if not c.n_shared_experts:  # transformers still wants the shared experts' (empty) tensors
        for i in range(c.first_k_dense_replace, c.n_layer):
            for name, shape in (("gate_proj", (0, c.n_embd)), ("up_proj", (0, c.n_embd)), ("down_proj", (c.n_embd, 0))):
                hf_state[f"model.layers.{i}.mlp.shared_experts.{name}.weight"] = torch.zeros(shape)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_factor != 1.0:
        rope.update(rope_type="yarn", **{theirs: getattr(c, ours) for ours, theirs in HF_YARN.items()
                                         if getattr(c, ours)})  # mscale 0: not given
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items()}
    hf.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=c.n_head,
              hidden_act="silu", rope_parameters=rope, rope_interleave=True, attention_bias=False,
              attention_dropout=0.0, initializer_range=0.02, num_nextn_predict_layers=0)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
