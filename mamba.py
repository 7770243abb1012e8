"""
Mamba, a selective state-space language model, in one file: Mamba-1 (Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces") and Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", the SSD
algorithm), picked by Config.variant.

Against llama.py, the nearest gaia model (pre-norm residual blocks, RMSNorm): a block is one norm and one mixer,
with no attention and no MLP (the mixer's gated in/out projections do the MLP's widening); the mixer mixes the
sequence with a linear recurrence instead of attention; there is no position encoding (the recurrence knows the
order); and decoding carries a fixed-size state instead of a KV cache that grows with every token.

The recurrence, with parameters that depend on the input ("selective"):

    h_t = Ā_t h_{t-1} + B̄_t x_t        Ā_t = exp(Δ_t A),  B̄_t = Δ_t B_t   (zero-order hold on A, Euler on B)
    y_t = C_t h_t + D x_t

Δ_t, B_t, C_t are projections of the input; A (negative, so Ā_t < 1 decays) and D are learned constants. Mamba-1
gives every channel its own N decays (A is (d_inner, N)); Mamba-2 gives every head one scalar decay (A = a * I) so
that the recurrence can be computed chunk by chunk with matrix multiplies. Both are written as the same step,
`ssm_sequential`, which is the definition and the decode step; training runs the same math in parallel over time,
below the speed fence: `selective_scan` (Mamba-1, a parallel scan) and `ssd` (Mamba-2, chunked). Decoding carries a
fixed-size state per layer (the last d_conv - 1 conv inputs and h), so a generated token costs the same at any
context length; there is no maximum context.

Loads and saves the Hugging Face MambaForCausalLM / Mamba2ForCausalLM layout (config.json + safetensors).
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
    variant: str = "mamba1"     # "mamba1" (selective scan) or "mamba2" (SSD)
    vocab_size: int = 50257     # train.py sets this from the tokenizer
    n_layer: int = 4
    n_embd: int = 128           # d_model
    d_state: int = 16           # N: state size per channel (Mamba-1) or per head (Mamba-2, where 64-128 is usual)
    d_conv: int = 4             # width of the causal depthwise convolution
    expand: int = 2             # d_inner = expand * n_embd
    dt_rank: int | None = None  # Mamba-1: rank of the Δ projection; None: ceil(n_embd / 16)
    head_dim: int = 32          # Mamba-2: P, channels per head; n_head = d_inner / head_dim
    n_groups: int = 1           # Mamba-2: heads in a group share B and C (as grouped-query attention shares k, v)
    chunk_size: int = 64        # Mamba-2: SSD chunk length
    dt_min: float = 0.001       # Δ is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    bias: bool = False          # biases in in_proj and out_proj
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.variant not in ("mamba1", "mamba2"):
            raise ValueError(f"variant={self.variant!r} is not a Mamba variant; choose --variant=mamba1 (selective scan) "
                             f"or --variant=mamba2 (SSD)")
        for key in ("vocab_size", "n_layer", "n_embd", "d_state", "d_conv", "expand",
                    "head_dim", "n_groups", "chunk_size"):
            value = getattr(self, key)
            if value is None and key == "vocab_size":  # train.py builds the Config with None, then sets it
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be an integer >= 1")
        if self.dt_rank is None and self.variant == "mamba1":
            self.dt_rank = math.ceil(self.n_embd / 16)
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"dt_rank={self.dt_rank!r} must be an integer >= 1; or leave it unset (None) for "
                             f"ceil(n_embd / 16) = {math.ceil(self.n_embd / 16)}")
        if not self.dt_min > 0:
            raise ValueError(f"dt_min={self.dt_min} must be > 0 (Δ is initialised log-uniform); e.g. --dt_min=0.001")
        if not self.dt_max >= self.dt_min:
            raise ValueError(f"dt_max={self.dt_max} is smaller than dt_min={self.dt_min}; choose dt_max >= dt_min "
                             f"(e.g. --dt_min=0.001 --dt_max=0.1)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0; e.g. --norm_eps=1e-5")
        for key in ("bias", "conv_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be True or False")
        if self.variant == "mamba2":
            largest_divisor = lambda n, at_most: max(d for d in range(1, at_most + 1) if n % d == 0)
            if self.d_inner % self.head_dim:
                raise ValueError(f"head_dim={self.head_dim} does not divide d_inner = expand * n_embd = {self.d_inner}; "
                                 f"choose head_dim dividing {self.d_inner} "
                                 f"(e.g. --head_dim={largest_divisor(self.d_inner, self.head_dim)})")
            if self.n_head % self.n_groups:
                raise ValueError(f"n_groups={self.n_groups} does not divide n_head = d_inner / head_dim = {self.n_head}; "
                                 f"n_groups must divide the number of heads "
                                 f"(e.g. --n_groups={largest_divisor(self.n_head, self.n_groups)})")

    @property
    def d_inner(self):
        """Width of the mixer's inner stream."""
        return self.expand * self.n_embd

    @property
    def n_head(self):
        """Mamba-2's heads: each has one scalar decay and reads its group's B and C."""
        return self.d_inner // self.head_dim


# ---------------------------------------------------------------------------------------- the building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in fp32 (Zhang & Sennrich 2019), as llama.py."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # weight * x / sqrt(mean(x^2) + eps)


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


# Shapes of the recurrence: x (b, T, H, P), dt = Δ (b, T, H), B and C (b, T, G, N), D (H,), A (H, N) for Mamba-1
# (H = d_inner channels, P = 1, N decays each) or (H, 1) for Mamba-2 (one decay per head). Head i reads the B and C
# of group i // (H / G); the state h is (b, H, P, N), kept in fp32. The parallel forms below the speed fence,
# selective_scan and ssd, take the same arguments (ssd also the chunk size) and return the same (y, last h).

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


class Mamba1Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.dt_rank, self.d_state = c.dt_rank, c.d_state
        self.in_proj = nn.Linear(c.n_embd, 2 * c.d_inner, bias=c.bias)  # -> (x, z)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.d_conv, groups=c.d_inner, bias=c.conv_bias)
        self.x_proj = nn.Linear(c.d_inner, c.dt_rank + 2 * c.d_state, bias=False)  # -> (Δ, B, C)
        self.dt_proj = nn.Linear(c.dt_rank, c.d_inner, bias=True)  # Δ: low rank, then one per channel
        self.A_log = nn.Parameter(torch.empty(c.d_inner, c.d_state))  # A = -exp(A_log): negative whatever training does
        self.D = nn.Parameter(torch.empty(c.d_inner))
        self.out_proj = nn.Linear(c.d_inner, c.n_embd, bias=c.bias)

    def forward(self, u, cache=None, layer=0):
        b, T, _ = u.shape
        conv_state, h = (cache.conv_state[layer], cache.ssm_state[layer]) if cache is not None else (None, None)
        x, z = self.in_proj(u).chunk(2, dim=-1)                 # (b, T, d_inner) each
        x, conv_state = causal_conv1d(x, self.conv1d, conv_state)
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))   # Δ (b, T, d_inner): large Δ resets a channel to its input, small Δ keeps h
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        # every channel is a "head" of size P = 1 with its own N decays; all channels share B and C (one group)
        ssm = ssm_sequential if T == 1 else selective_scan  # selective_scan: a parallel scan, below the speed fence
        y, h = ssm(x[..., None], dt, A, B[:, :, None], C[:, :, None], self.D, h)
        if cache is not None:
            cache.update(layer, conv_state, h)
        return self.out_proj(y.squeeze(-1) * F.silu(z))


class Mamba2Mixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.d_inner, self.n_head, self.head_dim = c.d_inner, c.n_head, c.head_dim
        self.n_groups, self.d_state, self.chunk_size = c.n_groups, c.d_state, c.chunk_size
        conv_dim = c.d_inner + 2 * c.n_groups * c.d_state  # x, B, C all go through the conv
        self.in_proj = nn.Linear(c.n_embd, c.d_inner + conv_dim + c.n_head, bias=c.bias)  # -> (z, xBC, Δ)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.d_conv, groups=conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.n_head))
        self.A_log = nn.Parameter(torch.empty(c.n_head))  # one decay rate per head
        self.D = nn.Parameter(torch.empty(c.n_head))
        self.norm = RMSNormGated(c.d_inner, c.d_inner // c.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.n_embd, bias=c.bias)

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
            y, h = ssd(x, dt, A, B, C, self.D, self.chunk_size, h)  # the same by chunked matmuls, below the speed fence
        if cache is not None:
            cache.update(layer, conv_state, h)
        return self.out_proj(self.norm(y.reshape(b, T, -1), z))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.mixer = (Mamba1Mixer if config.variant == "mamba1" else Mamba2Mixer)(config)

    def forward(self, x, cache=None, layer=0):
        return x + self.mixer(self.ln_1(x), cache, layer)  # no MLP: the mixer's gated projections take its place


class MambaCache:
    """What decoding carries per layer instead of keys and values: the last d_conv - 1 inputs of the convolution
    (in the model's dtype) and the SSM state h (B, H, P, N) in fp32. Its size is fixed: it does not grow with the
    tokens, so bytes_per_token is 0 and nbytes is all the cache ever holds, at any context length."""

    def __init__(self, config, batch, device, dtype):
        c = config
        if c.variant == "mamba1":  # every channel a head of size 1, one group; the conv sees x only
            conv_dim, H, P = c.d_inner, c.d_inner, 1
        else:  # the conv sees x, B and C
            conv_dim, H, P = c.d_inner + 2 * c.n_groups * c.d_state, c.n_head, c.head_dim
        self.conv_state = torch.zeros(c.n_layer, batch, conv_dim, c.d_conv - 1, device=device, dtype=dtype)
        self.ssm_state = torch.zeros(c.n_layer, batch, H, P, c.d_state, device=device, dtype=torch.float32)
        self.pos = 0  # tokens seen so far (the state summarises them all)

    @property
    def nbytes(self):
        return self.conv_state.nbytes + self.ssm_state.nbytes

    @property
    def bytes_per_token(self):
        """Bytes the cache grows by per token: 0, a new token overwrites the state, nothing is appended."""
        return 0

    def update(self, layer, conv_state, ssm_state):
        """Replace layer's state by the one its mixer leaves after this call's tokens (for decoding: no autograd)."""
        self.conv_state[layer].copy_(conv_state)
        self.ssm_state[layer].copy_(ssm_state)


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
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module):
        """mamba_ssm's init (the papers' code). apply() visits a module's children before it, so a mixer's own
        rules (the last four rows) come after its Linears' defaults:
        | tensor                                    | init                                                        |
        | wte (= lm_head when tied), lm_head        | normal(0, 0.02)                                             |
        | in_proj, x_proj, out_proj, conv1d         | PyTorch's default, U(±1/sqrt(fan_in)) (the conv's bias too) |
        | in_proj, out_proj biases                  | 0                                                           |
        | ln_1, ln_f, mixer.norm weights; D         | 1                                                           |
        | dt_proj.weight (Mamba-1)                  | U(±1/sqrt(dt_rank))                                         |
        | dt_proj.bias (Mamba-1), dt_bias (Mamba-2) | softplus⁻¹(Δ), Δ log-uniform in [dt_min, dt_max], >= 1e-4   |
        | A_log                                     | log(1, 2, ..., N) in every channel (Mamba-1, S4D-real);     |
        |                                           | log U(1, 16), one per head (Mamba-2)                        |
        | out_proj.weight, then                     | / sqrt(n_layer): each layer adds one to the residual stream |"""
        c = self.config
        if isinstance(module, nn.Embedding) or module is self.lm_head:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            module.reset_parameters()
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)  # dt_proj's bias is set by its mixer, below
        elif isinstance(module, (RMSNorm, RMSNormGated)):
            nn.init.ones_(module.weight)
        elif isinstance(module, (Mamba1Mixer, Mamba2Mixer)):
            if isinstance(module, Mamba1Mixer):
                module.A_log.copy_(torch.log(torch.arange(1, c.d_state + 1).float()).repeat(c.d_inner, 1))
                nn.init.uniform_(module.dt_proj.weight, -c.dt_rank ** -0.5, c.dt_rank ** -0.5)
                dt_bias = module.dt_proj.bias
            else:
                module.A_log.copy_(torch.log(torch.empty(c.n_head).uniform_(1, 16)))
                dt_bias = module.dt_bias
            log_min, log_max = math.log(c.dt_min), math.log(c.dt_max)
            dt = torch.exp(torch.rand(dt_bias.shape) * (log_max - log_min) + log_min).clamp(min=1e-4)
            dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ) = Δ + log(1 - exp(-Δ))
            nn.init.ones_(module.D)
            module.out_proj.weight /= math.sqrt(c.n_layer)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        if idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] == 0:
            raise ValueError(f"idx must be a non-empty (B, T) int64 tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, n_embd): no position embedding, the recurrence knows the order
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
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

    def make_cache(self, batch, max_len):
        """The decoding state for batch sequences. max_len does not change it: the state has the same size after
        any number of tokens (it is taken for the signature every gaia model shares)."""
        p = self.lm_head.weight
        return MambaCache(self.config, batch, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False):
        """Continue idx (B, T) by max_new_tokens tokens; temperature=0 is greedy decoding.
        return_logits=True also returns the logits each new token was drawn from, (B, max_new_tokens, vocab)."""
        max_len = idx.shape[1] + max_new_tokens
        cache = self.make_cache(idx.shape[0], max_len)
        logits, _ = self(idx, cache=cache)  # the prompt by the parallel path, leaving each layer's state
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            # no crop, unlike the transformers: no positions and a fixed-size state, so the context never fills up
            logits, _ = self(next_token, cache=cache)  # one step of the recurrence
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    def num_params(self, non_embedding=False):
        """Parameters; non_embedding=True leaves out the embedding table when it is not also the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_word_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3x forward): 6 per weight for the matmuls and the conv,
        plus the scan. Mamba-1, per layer and token, forward: ΔA, exp, Δx, B̄x, Ā h + B̄x (2), C h (2), D x: about
        9 * d_inner * N. Mamba-2 (SSD with chunk Q): C Bᵀ 2QGN, the decay mask Q*H, (L∘CBᵀ) Δx 2Q*d_inner,
        chunk states and their read-out 4 * d_inner * N. seq_len does not matter beyond the chunk."""
        c = self.config
        if c.variant == "mamba1":
            scan = 9 * c.d_inner * c.d_state
        else:
            Q = c.chunk_size
            scan = 2 * Q * c.n_groups * c.d_state + Q * c.n_head + 2 * Q * c.d_inner + 4 * c.d_inner * c.d_state
        return 6 * self.num_params(non_embedding=True) + 3 * c.n_layer * scan

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
# ssm_sequential is a Python loop over time. Training runs the same recurrence in parallel over time: Mamba-1 by
# kernels.linear_scan (h_t = a_t h_{t-1} + b_t: a parallel scan on the CPU, a fused Triton loop on GPUs), Mamba-2 by
# the chunked SSD algorithm. Both take ssm_sequential's arguments (ssd also the chunk size) and return its
# (y, last h); test_all.py checks values and gradients against it.

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
    hs = kernels.linear_scan(A_bar, Bx_bar)                                                # (b, T, H, P, N)
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
    h_end = kernels.linear_scan(chunk_decay, states)     # (b, c, G, K, P, N): the state at each chunk's end
    h_start = torch.cat((h0, h_end[:, :-1]), dim=1)
    # 4. what the state entering a chunk adds at step t: C_t exp(cum_t) h_start
    y_prev = torch.einsum("bctgn,bcgkpn->bctgkp", C, h_start) * torch.exp(cum)[..., None]

    y = (y.permute(0, 1, 4, 2, 3, 5) + y_prev).reshape(b, c * Q, H, P)[:, :T]
    y = y + D.float()[:, None] * x[:, :T]
    return y.to(dtype), h_end[:, -1].reshape(b, H, P, N)


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {  # gaia Config field -> key in transformers' MambaConfig / Mamba2Config
    "vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "n_embd": "hidden_size", "d_state": "state_size",
    "d_conv": "conv_kernel", "expand": "expand", "bias": "use_bias", "conv_bias": "use_conv_bias",
    "norm_eps": "layer_norm_epsilon", "dt_min": "time_step_min", "dt_max": "time_step_max",
    "tie_word_embeddings": "tie_word_embeddings",
    "dt_rank": "time_step_rank",                                                  # Mamba-1 only
    "head_dim": "head_dim", "n_groups": "n_groups", "chunk_size": "chunk_size",  # Mamba-2 only
}
HF_ONLY_IN = {"dt_rank": "mamba1", "head_dim": "mamba2", "n_groups": "mamba2", "chunk_size": "mamba2"}
HF_MODEL_TYPE = {"mamba1": ("mamba", "MambaForCausalLM"), "mamba2": ("mamba2", "Mamba2ForCausalLM")}

HF_NAMES = {  # gaia parameter -> HF tensor name; {i} is the layer. Inside the mixers the names are the same.
    "transformer.wte.weight": "backbone.embeddings.weight",
    "transformer.h.{i}.ln_1.weight": "backbone.layers.{i}.norm.weight",
    "transformer.h.{i}.mixer.in_proj.weight": "backbone.layers.{i}.mixer.in_proj.weight",
    "transformer.h.{i}.mixer.in_proj.bias": "backbone.layers.{i}.mixer.in_proj.bias",
    "transformer.h.{i}.mixer.conv1d.weight": "backbone.layers.{i}.mixer.conv1d.weight",
    "transformer.h.{i}.mixer.conv1d.bias": "backbone.layers.{i}.mixer.conv1d.bias",
    "transformer.h.{i}.mixer.x_proj.weight": "backbone.layers.{i}.mixer.x_proj.weight",    # Mamba-1
    "transformer.h.{i}.mixer.dt_proj.weight": "backbone.layers.{i}.mixer.dt_proj.weight",  # Mamba-1
    "transformer.h.{i}.mixer.dt_proj.bias": "backbone.layers.{i}.mixer.dt_proj.bias",      # Mamba-1
    "transformer.h.{i}.mixer.dt_bias": "backbone.layers.{i}.mixer.dt_bias",                # Mamba-2
    "transformer.h.{i}.mixer.A_log": "backbone.layers.{i}.mixer.A_log",
    "transformer.h.{i}.mixer.D": "backbone.layers.{i}.mixer.D",
    "transformer.h.{i}.mixer.norm.weight": "backbone.layers.{i}.mixer.norm.weight",        # Mamba-2
    "transformer.h.{i}.mixer.out_proj.weight": "backbone.layers.{i}.mixer.out_proj.weight",
    "transformer.h.{i}.mixer.out_proj.bias": "backbone.layers.{i}.mixer.out_proj.bias",
    "transformer.ln_f.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
# the gaia file that loads each Hugging Face model_type, for the error when a checkpoint meets the wrong one
GAIA_FILES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "moe", "qwen3_moe": "moe", "mamba": "mamba",
              "mamba2": "mamba", "deepseek_v3": "mla"}


def hf_names(model):
    """HF_NAMES with {i} filled in for every layer: gaia parameter -> HF tensor name, for the tensors this model
    has (its variant's, its biases). A tied head is left out: HF ties it too."""
    own, n_layer = model.state_dict(), model.config.n_layer
    names = {ours.format(i=i): theirs.format(i=i) for ours, theirs in HF_NAMES.items() for i in range(n_layer)}
    names = {ours: theirs for ours, theirs in names.items() if ours in own}
    if model.config.tie_word_embeddings:
        del names["lm_head.weight"]
    return names


def read_safetensors(path):
    """Every tensor of a Hugging Face directory: model.safetensors, or the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; save the model "
                         f"with safetensors (transformers' default), not as pytorch_model.bin")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def from_hf(path):
    """A gaia Model from a local MambaForCausalLM or Mamba2ForCausalLM directory."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    variant = {"mamba": "mamba1", "mamba2": "mamba2"}.get(kind)
    if variant is None:
        hint = f"use --model={GAIA_FILES[kind]}" if kind in GAIA_FILES else "no gaia model file loads it"
        raise ValueError(f"{path} holds a {kind!r} model, not mamba or mamba2; {hint}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: gaia's mamba.py uses SiLU only")
    if not float(hf["expand"]).is_integer():
        raise ValueError(f"expand={hf['expand']} is not an integer; gaia's mamba.py needs an integer expand")
    values = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items()
              if theirs in hf and HF_ONLY_IN.get(ours, variant) == variant}
    values.update(variant=variant, expand=int(hf["expand"]))
    values.setdefault("tie_word_embeddings", variant == "mamba1")
    if variant == "mamba1" and values.get("dt_rank") == "auto":
        values["dt_rank"] = None  # ceil(n_embd / 16), in both
    if variant == "mamba2":
        if hf["num_heads"] * hf["head_dim"] != int(hf["expand"]) * hf["hidden_size"]:
            raise ValueError(f"num_heads * head_dim = {hf['num_heads'] * hf['head_dim']} differs from "
                             f"expand * hidden_size = {int(hf['expand']) * hf['hidden_size']}")
        # transformers 5 writes inf as {"__float__": "Infinity"}, older versions as a bare Infinity
        limit = [float(v["__float__"] if isinstance(v, dict) else v) for v in hf.get("time_step_limit", (0, "inf"))]
        if limit != [0.0, float("inf")]:
            raise ValueError(f"time_step_limit={limit}: gaia's mamba.py does not clamp Δ; only (0, inf) is supported")
    model = Model(Config(**values))
    state = read_safetensors(path)
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}  # an older name
    names = hf_names(model)
    missing = [theirs for theirs in names.values() if theirs not in state]
    unexpected = sorted(set(state) - set(names.values()) - {"lm_head.weight"})  # a tied head may be stored as well
    if missing or unexpected:
        raise ValueError(f"{path} does not match {kind}'s layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({ours: state[theirs] for ours, theirs in names.items()}, strict=False)  # all but a tied head
    return model


def to_hf(model, path):
    """Write a MambaForCausalLM / Mamba2ForCausalLM directory (config.json + model.safetensors) for transformers."""
    from safetensors.torch import save_file
    c = model.config
    os.makedirs(path, exist_ok=True)
    state = model.state_dict()
    tensors = {theirs: state[ours].detach().float().cpu().contiguous() for ours, theirs in hf_names(model).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model_type, architecture = HF_MODEL_TYPE[c.variant]
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items() if HF_ONLY_IN.get(ours, c.variant) == c.variant}
    hf.update(model_type=model_type, architectures=[architecture], hidden_act="silu", residual_in_fp32=True)
    if c.variant == "mamba1":
        hf["intermediate_size"] = c.d_inner
    else:
        hf["num_heads"] = c.n_head  # time_step_limit: HF's default (0, inf)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # HF's defaults (0 or 1, 0, 2) may not fit the vocab
        hf[k] = None
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
