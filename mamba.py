"""
Mamba, a selective state-space language model, in one file: Mamba-1 (Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces") and Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", the SSD
algorithm), picked by Config.variant.

Each layer mixes the sequence with a linear recurrence whose parameters depend on the input ("selective"):

    h_t = Ā_t h_{t-1} + B̄_t x_t        Ā_t = exp(Δ_t A),  B̄_t = Δ_t B_t   (zero-order hold on A, Euler on B)
    y_t = C_t h_t + D x_t

Δ_t, B_t, C_t are projections of the input; A (negative, so Ā_t < 1 decays) and D are learned constants. Mamba-1
gives every channel its own N decays (A is (d_inner, N)); Mamba-2 gives every head one scalar decay (A = a * I) so
that the recurrence can be computed chunk by chunk with matrix multiplies. Both are written as the same step,
`ssm_sequential`, which is the definition and the decode step; training runs the same math in parallel over time:
`selective_scan` (Mamba-1, a parallel scan) and `ssd` (Mamba-2, chunked). Decoding carries a fixed-size state per
layer (the last d_conv - 1 conv inputs and h), so a generated token costs the same at any context length; there is
no maximum context and no position embedding.

Loads and saves the Hugging Face MambaForCausalLM / Mamba2ForCausalLM layout (config.json + model.safetensors).
The model contract every gaia model file follows is written in README.md ("The model contract").
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


@dataclass
class Config:
    variant: str = "mamba1"    # "mamba1" (selective scan) or "mamba2" (SSD)
    vocab_size: int = 50257    # train.py sets this from the tokenizer
    n_layer: int = 4
    n_embd: int = 128          # d_model
    d_state: int = 16          # N: state size per channel (Mamba-1) or per head (Mamba-2, where 64-128 is usual)
    d_conv: int = 4            # width of the causal depthwise convolution
    expand: int = 2            # d_inner = expand * n_embd
    dt_rank: int = 0           # Mamba-1: rank of the Δ projection; 0 means ceil(n_embd / 16)
    head_dim: int = 32         # Mamba-2: P, channels per head; n_head = d_inner / head_dim
    n_groups: int = 1          # Mamba-2: heads in a group share B and C (as grouped-query attention shares k, v)
    chunk_size: int = 64       # Mamba-2: SSD chunk length
    dt_min: float = 0.001      # Δ is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    bias: bool = False         # biases in in_proj and out_proj
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


# ---------------------------------------------------------------------------------------- the recurrence
# Shapes shared by the three functions below: x (b, T, H, P), dt = Δ (b, T, H), B and C (b, T, G, N), D (H,),
# A (H, N) for Mamba-1 (H = d_inner channels, P = 1, N decays each) or (H, 1) for Mamba-2 (one decay per head).
# Head i reads the B and C of group i // (H / G); the state h is (b, H, P, N), kept in fp32.

def ssm_sequential(x, dt, A, B, C, D, h=None):
    """The definition, one time step at a time; the model uses it to decode (T = 1). Returns y (b, T, H, P) and
    the last state h (b, H, P, N)."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    dtype = x.dtype
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h = x.new_zeros(b, H, P, N) if h is None else h.float()
    ys = []
    for t in range(T):
        A_bar = torch.exp(dt[:, t, :, None] * A)[:, :, None, :]                     # (b, H, 1, N)
        Bx_bar = (dt[:, t, :, None] * x[:, t]).view(b, G, -1, 1) * B[:, t, :, None, :]  # (b, G, H/G * P, N)
        h = A_bar * h + Bx_bar.view(b, H, P, N)
        y = (h.view(b, G, -1, N) @ C[:, t, :, :, None]).view(b, H, P)                # C_t h_t
        ys.append(y + D.float()[:, None] * x[:, t])
    return torch.stack(ys, dim=1).to(dtype), h


def scan_(a, b):
    """Every h_t = a_t h_{t-1} + b_t (along dim 1, h_{-1} = 0) in log2(T) vectorised rounds, in place: b becomes h.
    Odd-even reduction: pairing steps 2i and 2i+1 gives the same recurrence, half as long, over the odd steps,
        h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}),
    and once it is solved each even step is one ordinary step from the odd step before it. O(T) work in all, and
    it only ever multiplies decays in (0, 1]: no division and no logarithm, so it is exact and stable however
    strongly Δ resets the state. a may have size-1 dims where b has more (broadcast)."""
    T = b.shape[1]
    if T == 1:
        return
    pairs = T // 2
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    b_odd.addcmul_(a_odd, b_even[:, :pairs])                         # each pair as one step
    scan_(a_odd * a_even[:, :pairs], b_odd)                          # b_odd = h at the odd steps
    b_even[:, 1:].addcmul_(a_even[:, 1:], b_odd[:, :(T - 1) // 2])  # h_2i = a_2i h_2i-1 + b_2i


class LinearRecurrence(torch.autograd.Function):
    """h = scan of (a, b), with the backward written out: the gradient of a linear recurrence is the same recurrence
    run backwards in time. The gradient reaching h_t, g_t = dL/dh_t + a_{t+1} g_{t+1}, gives dL/db_t = g_t and
    dL/da_t = g_t h_{t-1}. Saves only a and h."""

    @staticmethod
    def forward(ctx, a, b):
        h = b.clone()
        scan_(a, h)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        g = grad_h.flip(1)  # time reversed: g_t = a_{t+1} g_{t+1} + grad_t becomes an ordinary forward scan
        scan_(torch.cat((torch.ones_like(a[:, :1]), a[:, 1:].flip(1)), dim=1), g)
        g = g.flip(1)
        grad_a = torch.cat((torch.zeros_like(h[:, :1]), g[:, 1:] * h[:, :-1]), dim=1)
        return grad_a.sum_to_size(a.shape), g


def selective_scan(x, dt, A, B, C, D, h=None):
    """Mamba-1's training path: all T states at once with the parallel scan. Materialises Ā and B̄x,
    (b, T, H, P, N): the price of an input-dependent decay per (channel, state) without a fused kernel."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    dtype = x.dtype
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    A_bar = torch.exp(dt[..., None] * A)[:, :, :, None, :]                                   # (b, T, H, 1, N)
    Bx_bar = ((dt[..., None] * x).view(b, T, G, -1, 1) * B[:, :, :, None, :]).view(b, T, H, P, N)
    if h is not None:  # starting from a state h: h_0 = Ā_0 h + B̄_0 x_0, so fold Ā_0 h into the first input
        Bx_bar = torch.cat((Bx_bar[:, :1] + A_bar[:, :1] * h.float()[:, None], Bx_bar[:, 1:]), dim=1)
    hs = LinearRecurrence.apply(A_bar, Bx_bar)                                                # (b, T, H, P, N)
    y = (hs.view(b, T, G, -1, N) @ C[..., None]).view(b, T, H, P)                             # C_t h_t
    return (y + D.float()[:, None] * x).to(dtype), hs[:, -1]


def segment_sum(x):
    """out[..., t, s] = x_{s+1} + ... + x_t for s <= t (0 on the diagonal), -inf above it, for x (..., Q). Summed
    directly rather than as cumsum_t - cumsum_s, which cancels catastrophically once the cumsum is large."""
    Q = x.shape[-1]
    x = x[..., :, None].expand(*x.shape, Q)  # x[..., t, s] = x_t
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    out = x.masked_fill(~causal.tril(-1), 0).cumsum(dim=-2)  # add up x_t over s < t' <= t
    return out.masked_fill(~causal, float("-inf"))


def ssd(x, dt, A, B, C, D, chunk_size, h=None):
    """Mamba-2's training path, the chunked SSD algorithm (Dao & Gu 2024, sec. 6) for A = a * I per head. Within a
    chunk of Q steps the recurrence unrolls into a causal matrix, like masked attention:
        y_t = sum_{s<=t} C_t . B_s  exp(ΔA_{s+1} + ... + ΔA_t)  Δ_s x_s      (the "quadratic form", by matmul)
    and between chunks only states pass, by the same linear recurrence with one step per chunk. T need not be a
    multiple of chunk_size."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    K, Q = H // G, chunk_size
    dtype = x.dtype
    pad = -T % Q  # padded steps get Δ = 0, so Ā = 1 and B̄x = 0: they leave the state as it is
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (T + pad) // Q
    xdt = (x * dt[..., None]).view(b, c, Q, G, K, P)       # B̄_t x_t = B_t (Δ_t x_t)
    log_decay = (dt * A.float()[:, 0]).view(b, c, Q, G, K)  # log Ā_t = Δ_t a <= 0
    B, C = B.view(b, c, Q, G, N), C.view(b, c, Q, G, N)
    cum = log_decay.cumsum(dim=2)                          # log decay from the chunk's start through step t

    # 1. within each chunk: L[t, s] = exp(log Ā_{s+1} + ... + log Ā_t) for s <= t, the decay from step s to step t
    seg = segment_sum(log_decay.permute(0, 1, 3, 4, 2))   # (b, c, G, K, Q, Q)
    L = torch.exp(seg)
    CB = torch.einsum("bctgn,bcsgn->bcgts", C, B)          # (b, c, G, Q, Q): C_t . B_s, shared by a group's heads
    y = (L * CB[:, :, :, None]) @ xdt.permute(0, 1, 3, 4, 2, 5)  # (b, c, G, K, Q, P)

    # 2. the state each chunk leaves behind from its own inputs, decayed to the chunk's end (L's last row)
    states = torch.einsum("bcsgn,bcsgkp->bcgkpn", B, xdt * L[..., -1, :].permute(0, 1, 4, 2, 3)[..., None])
    # 3. between chunks: h_c = exp(sum of log Ā over chunk c) h_{c-1} + states_c
    chunk_decay = torch.exp(cum[:, :, -1])[..., None, None]  # (b, c, G, K, 1, 1)
    h0 = x.new_zeros(b, 1, G, K, P, N) if h is None else h.float().view(b, 1, G, K, P, N)
    states = torch.cat((states[:, :1] + chunk_decay[:, :1] * h0, states[:, 1:]), dim=1)
    h_end = LinearRecurrence.apply(chunk_decay, states)     # (b, c, G, K, P, N): the state at each chunk's end
    h_start = torch.cat((h0, h_end[:, :-1]), dim=1)
    # 4. what the state entering a chunk adds at step t: C_t exp(cum_t) h_start
    y_prev = torch.einsum("bctgn,bcgkpn->bctgkp", C, h_start) * torch.exp(cum)[..., None]

    y = (y.permute(0, 1, 4, 2, 3, 5) + y_prev).reshape(b, c * Q, H, P)[:, :T]
    y = y + D.float()[:, None] * x[:, :T]
    return y.to(dtype), h_end[:, -1].reshape(b, H, P, N)


# ---------------------------------------------------------------------------------------- the layers

def causal_conv1d(x, conv, state=None):
    """Depthwise causal convolution over time: output t sees inputs t - d_conv + 1 .. t. x (b, T, channels);
    state holds the d_conv - 1 inputs before x (zeros at the start). Returns the output and the new state."""
    x = x.transpose(1, 2)  # (b, channels, T)
    keep = conv.kernel_size[0] - 1
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], keep)
    x = torch.cat((state.to(x.dtype), x), dim=2)
    y = F.conv1d(x, conv.weight, conv.bias, groups=x.shape[1])
    return y.transpose(1, 2), x[:, :, x.shape[2] - keep:]


def init_dt_bias(bias, config):
    """Δ = softplus(... + bias) starts log-uniform in [dt_min, dt_max]: bias = softplus^-1(Δ)."""
    dt = torch.exp(torch.rand(bias.shape) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min))
    dt = dt.clamp(min=1e-4)
    with torch.no_grad():
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RMSNormGated(nn.Module):
    """Mamba-2's output norm: gate first, y * SiLU(z), then RMS-normalise each group of channels separately (a
    group's heads share B and C; normalising per group keeps the groups independent, e.g. for tensor parallel)."""

    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        y = (y * F.silu(z)).float()
        y = F.rms_norm(y.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps).flatten(-2)
        return self.weight * y.to(z.dtype)


class Mamba1Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.d_inner = c.expand * c.n_embd
        self.dt_rank = c.dt_rank or math.ceil(c.n_embd / 16)
        self.in_proj = nn.Linear(c.n_embd, 2 * self.d_inner, bias=c.bias)  # -> (x, z)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, c.d_conv, groups=self.d_inner, bias=c.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * c.d_state, bias=False)  # -> (Δ, B, C)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)  # Δ: low rank, then one per channel
        # S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log(-A) so that A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, c.d_state + 1).float()).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, c.n_embd, bias=c.bias)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        init_dt_bias(self.dt_proj.bias, c)

    def forward(self, u, cache=None, layer=0):
        b, T, _ = u.shape
        conv_state, h = (cache.conv_state[layer], cache.ssm_state[layer]) if cache is not None else (None, None)
        x, z = self.in_proj(u).chunk(2, dim=-1)                 # (b, T, d_inner) each
        x, conv_state = causal_conv1d(x, self.conv1d, conv_state)
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.A_log.shape[1], self.A_log.shape[1]], dim=-1)
        dt = F.softplus(self.dt_proj(dt))   # Δ (b, T, d_inner): large Δ resets a channel to its input, small Δ keeps h
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        # every channel is a "head" of size P = 1 with its own N decays; all channels share B and C (one group)
        ssm = ssm_sequential if T == 1 else selective_scan
        y, h = ssm(x[..., None], dt, A, B[:, :, None], C[:, :, None], self.D, h)
        if cache is not None:
            cache.conv_state[layer], cache.ssm_state[layer] = conv_state, h
        return self.out_proj(y.squeeze(-1) * F.silu(z))


class Mamba2Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.d_inner = c.expand * c.n_embd
        self.n_head, self.head_dim, self.n_groups, self.d_state = self.d_inner // c.head_dim, c.head_dim, c.n_groups, c.d_state
        self.chunk_size = c.chunk_size
        conv_dim = self.d_inner + 2 * c.n_groups * c.d_state  # x, B, C all go through the conv
        self.in_proj = nn.Linear(c.n_embd, self.d_inner + conv_dim + self.n_head, bias=c.bias)  # -> (z, xBC, Δ)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.d_conv, groups=conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_head))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_head).uniform_(1, 16)))  # one decay rate per head
        self.D = nn.Parameter(torch.ones(self.n_head))
        self.norm = RMSNormGated(self.d_inner, self.d_inner // c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.n_embd, bias=c.bias)
        init_dt_bias(self.dt_bias, c)

    def forward(self, u, cache=None, layer=0):
        b, T, _ = u.shape
        H, P, G, N = self.n_head, self.head_dim, self.n_groups, self.d_state
        conv_state, h = (cache.conv_state[layer], cache.ssm_state[layer]) if cache is not None else (None, None)
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xBC, conv_state = causal_conv1d(xBC, self.conv1d, conv_state)
        x, B, C = F.silu(xBC).split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)        # Δ (b, T, H): one step size per head
        A = -torch.exp(self.A_log.float())[:, None]  # (H, 1): A = a * I, a scalar per head
        x, B, C = x.view(b, T, H, P), B.view(b, T, G, N), C.view(b, T, G, N)
        if T == 1:
            y, h = ssm_sequential(x, dt, A, B, C, self.D, h)
        else:
            y, h = ssd(x, dt, A, B, C, self.D, self.chunk_size, h)
        if cache is not None:
            cache.conv_state[layer], cache.ssm_state[layer] = conv_state, h
        return self.out_proj(self.norm(y.reshape(b, T, -1), z))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mixer = (Mamba1Mixer if config.variant == "mamba1" else Mamba2Mixer)(config)

    def forward(self, x, cache=None, layer=0):
        return x + self.mixer(self.norm(x), cache, layer)


class MambaCache:
    """What decoding carries per layer: the last d_conv - 1 conv inputs and the SSM state h (b, H, P, N).
    Its size is fixed: it does not grow with the context."""

    def __init__(self, n_layer):
        self.conv_state = [None] * n_layer
        self.ssm_state = [None] * n_layer


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        if c.variant not in ("mamba1", "mamba2"):
            raise ValueError(f"variant={c.variant!r}; choose 'mamba1' (selective scan) or 'mamba2' (SSD)")
        for name in ("vocab_size", "n_layer", "n_embd", "d_state", "d_conv", "expand"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name}={getattr(c, name)} must be at least 1")
        if c.variant == "mamba2":
            d_inner = c.expand * c.n_embd
            if c.head_dim < 1 or d_inner % c.head_dim:
                raise ValueError(f"d_inner = expand * n_embd = {d_inner} is not a multiple of head_dim={c.head_dim}; "
                                 f"change head_dim, expand or n_embd")
            if c.n_groups < 1 or (d_inner // c.head_dim) % c.n_groups:
                raise ValueError(f"n_head = {d_inner // c.head_dim} is not a multiple of n_groups={c.n_groups}; "
                                 f"pick n_groups dividing the number of heads")
            if c.chunk_size < 1:
                raise ValueError(f"chunk_size={c.chunk_size} must be at least 1")
        if not 0 < c.dt_min <= c.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={c.dt_min}, dt_max={c.dt_max}")
        self.config = c
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(c.vocab_size, c.n_embd),
            layers=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            norm_f=RMSNorm(c.n_embd, c.norm_eps),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("in_proj.bias", "out_proj.bias")):
                nn.init.zeros_(p)
            if name.endswith("out_proj.weight"):  # each layer adds one out_proj to the residual stream (mamba_ssm's init)
                with torch.no_grad():
                    p /= math.sqrt(c.n_layer)

    def forward(self, idx, targets=None, cache=None):
        if idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] == 0:
            raise ValueError(f"idx must be a non-empty (B, T) int64 tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
        x = self.backbone.embeddings(idx)  # (B, T, C): no position embedding, the recurrence knows the order
        for i, block in enumerate(self.backbone.layers):
            x = block(x, cache, i)
        logits = self.lm_head(self.backbone.norm_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding=False):
        """Parameters; non_embedding=True leaves out the embedding table when it is not also the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_word_embeddings:
            n -= self.backbone.embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3x forward): 6 per weight for the matmuls and the conv,
        plus the scan. Mamba-1, per layer and token, forward: ΔA, exp, Δx, B̄x, Ā h + B̄x (2), C h (2), D x: about
        9 * d_inner * N. Mamba-2 (SSD with chunk Q): C Bᵀ 2QGN, the decay mask Q*H, (L∘CBᵀ) Δx 2Q*d_inner,
        chunk states and their read-out 4 * d_inner * N. seq_len does not matter beyond the chunk."""
        c = self.config
        d_inner = c.expand * c.n_embd
        if c.variant == "mamba1":
            scan = 9 * d_inner * c.d_state
        else:
            Q, H = c.chunk_size, d_inner // c.head_dim
            scan = 2 * Q * c.n_groups * c.d_state + Q * H + 2 * Q * d_inner + 4 * d_inner * c.d_state
        return 6 * self.num_params(non_embedding=True) + 3 * c.n_layer * scan

    # ---------------------------------------------------------------- generation with the recurrent state

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding. The prompt runs through
        the parallel path once, leaving each layer's state; every new token is then one step of the recurrence.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        cache = MambaCache(self.config.n_layer)
        logits, _ = self(idx, cache=cache)
        steps = []
        for i in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if i < max_new_tokens - 1:
                logits, _ = self(next_token, cache=cache)
        if return_logits:
            return idx, (torch.stack(steps, dim=1) if steps else logits[:, :0])
        return idx

    # ---------------------------------------------------------------- Hugging Face interop

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face MambaForCausalLM or Mamba2ForCausalLM directory (config.json + model.safetensors)."""
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        kind = hf.get("model_type")
        if kind not in ("mamba", "mamba2"):
            raise ValueError(f"{path} holds a {kind!r} model, not mamba or mamba2; use the matching gaia model")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r}: gaia's mamba.py uses SiLU only")
        if not float(hf["expand"]).is_integer():
            raise ValueError(f"expand={hf['expand']} is not an integer; gaia's mamba.py needs an integer expand")
        config = Config(variant="mamba1" if kind == "mamba" else "mamba2", vocab_size=hf["vocab_size"],
                        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], d_state=hf["state_size"],
                        d_conv=hf["conv_kernel"], expand=int(hf["expand"]), bias=hf.get("use_bias", False),
                        conv_bias=hf.get("use_conv_bias", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                        tie_word_embeddings=hf.get("tie_word_embeddings", kind == "mamba"))
        if kind == "mamba":
            rank = hf.get("time_step_rank", "auto")
            config.dt_rank = math.ceil(config.n_embd / 16) if rank == "auto" else int(rank)
        else:
            if hf["num_heads"] * hf["head_dim"] != config.expand * config.n_embd:
                raise ValueError(f"num_heads * head_dim = {hf['num_heads'] * hf['head_dim']} differs from "
                                 f"expand * hidden_size = {config.expand * config.n_embd}")
            # transformers 5 writes inf as {"__float__": "Infinity"}, older versions as a bare Infinity
            limit = [float(v["__float__"] if isinstance(v, dict) else v) for v in hf.get("time_step_limit", (0, "inf"))]
            if limit != [0.0, float("inf")]:
                raise ValueError(f"time_step_limit={limit}: gaia's mamba.py does not clamp Δ; only (0, inf) is supported")
            config.head_dim, config.n_groups, config.chunk_size = hf["head_dim"], hf["n_groups"], hf["chunk_size"]
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)
        state = load_file(os.path.join(path, "model.safetensors"))
        state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}  # old name
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if config.tie_word_embeddings:
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path} does not match {kind}'s layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face MambaForCausalLM / Mamba2ForCausalLM directory that transformers loads."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        c = self.config
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        if c.tie_word_embeddings:
            del state["lm_head.weight"]
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        hf = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, state_size=c.d_state, num_hidden_layers=c.n_layer,
                  layer_norm_epsilon=c.norm_eps, expand=c.expand, conv_kernel=c.d_conv, use_bias=c.bias,
                  use_conv_bias=c.conv_bias, hidden_act="silu", residual_in_fp32=True,
                  time_step_min=c.dt_min, time_step_max=c.dt_max, tie_word_embeddings=c.tie_word_embeddings)
        if c.variant == "mamba1":
            hf.update(model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=self.backbone.layers[0].mixer.dt_rank,
                      intermediate_size=c.expand * c.n_embd)
        else:
            hf.update(model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=c.expand * c.n_embd // c.head_dim,
                      head_dim=c.head_dim, n_groups=c.n_groups, chunk_size=c.chunk_size)  # time_step_limit: default (0, inf)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # HF's defaults (0 or 1, 0, 2) may not fit the vocab
            hf[k] = None
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
