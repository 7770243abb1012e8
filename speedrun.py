"""
The modded-nanogpt speedrun model (Keller Jordan et al. 2024-25, github.com/KellerJordan/modded-nanogpt: GPT-2 small
trained to 3.28 val loss on FineWeb as fast as possible), in one file; train it with `--optimizer=muon`
(config/speedrun.py), the recipe's other half.

Differences from llama.py, each a few lines below with its source: norms without gains (RMSNorm as a function,
also on the embedding); QK-norm (RMSNorm of each head's q and k); a ReLU² MLP instead of SwiGLU; multi-head
attention (no GQA); the output projections of attention and MLP, and the untied head, start at zero, so every
block is the identity at init; the logits soft-capped, cap * tanh(logits / cap). Behind keys, off by default (at
this size they did not help: README, "The models"): value embeddings (extra token tables mixed into the values of
the first and last layers) and U-net skips (the second half of the layers adds the outputs of the first, mirrored).
No Hugging Face interop: modded-nanogpt has no transformers architecture.

The model contract every gaia model file follows is written in README.md ("The model contract").
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class Config:
    vocab_size: int = 256        # train.py sets this from the tokenizer
    block_size: int = 256        # maximum context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 480  # ReLU² hidden width; the recipe's 4 * n_embd is 512: 480 keeps the default model
                                  # (untied head) within nanoGPT's 4x128 byte-level parameter count
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    softcap: float = 15.0        # logits = softcap * tanh(logits / softcap); 0 = off
    value_embeds: int = 0        # token tables mixed into the values of the first and last layers; 0 = off
    unet: bool = False           # U-net skips: layer n_layer-1-i adds the output of layer i (weighted), i < n_layer // 2
    # each recipe piece can be switched off, for the ablations (README: python bench.py time-to-loss --ablate)
    qk_norm: bool = True         # RMSNorm of each head's q and k
    relu2: bool = True           # ReLU² MLP; False: GPT-2's tanh GELU
    zero_init: bool = True       # the output projections and the head start at zero; False: as c_q (uniform)

    def __post_init__(self):
        if self.vocab_size is not None and self.vocab_size < 1:  # train.py builds the Config with None, then sets it
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1")
        for key in ("block_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.n_embd % (2 * self.n_head):  # head_dim = n_embd / n_head must be whole, and even: RoPE turns pairs
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of 2 * n_head={2 * self.n_head} (whole, even "
                             f"heads for RoPE); e.g. --n_embd={max(2 * self.n_head, self.n_embd - self.n_embd % (2 * self.n_head))}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0 (it keeps 1/rms finite); e.g. --norm_eps=1e-5")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0; e.g. --rope_theta=10000")
        if not self.softcap >= 0:
            raise ValueError(f"softcap={self.softcap} must be >= 0 (0 = no soft-capping); e.g. --softcap=15")
        if not 0 <= self.value_embeds <= (self.n_layer + 1) // 2:
            raise ValueError(f"value_embeds={self.value_embeds} must be in [0, {(self.n_layer + 1) // 2}]: each table "
                             f"serves layer i and layer n_layer-1-i, so n_layer={self.n_layer} uses at most that many")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def norm(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last dim, statistics in fp32: RMSNorm without a gain (modded-nanogpt's
    norm(), F.rms_norm with no weight)."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    """norm() as a module, so the blocks keep gaia's names (ln_1, ln_2, ln_f, q_norm, k_norm); no parameters."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return norm(x, self.eps)


def rope_frequencies(config, dim):
    """inv_freq_i = rope_theta^(-2i / dim), i = 0 .. dim/2 - 1: the angle per position of pair i, (dim/2,)."""
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))


# The rotation itself is kernels.rope(q, k, cos, sin), HF's rotate-half layout, as in llama.py.


class Attention(nn.Module):
    def __init__(self, config, value_embed=False):
        super().__init__()
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # zero at init (_init_weights)
        self.q_norm, self.k_norm = (RMSNorm(config.norm_eps), RMSNorm(config.norm_eps)) if config.qk_norm else (None, None)
        # value residual (Zhou et al. 2024, "Value Residual Learning"; token value embeddings by @KoszarskyB):
        # v = lambda_0 v + lambda_1 ve, ve a token table of this layer
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_embed else None

    def forward(self, x, cos, sin, ve=None, cache=None, layer=0):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, -1, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.c_k(x).view(B, T, -1, self.head_dim)
        v = self.c_v(x).view(B, T, -1, self.head_dim)
        if ve is not None:
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve.view_as(v)
        # QK-norm (Dehghani et al. 2023; in modded-nanogpt by @Grad62304977): each head's q and k RMS-normed, so
        # the attention logits stay bounded however the weights grow
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim: (B, T, n_head, head_dim)
        q, k = kernels.rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, T, head_dim)
        if cache is None:
            y = kernels.attention(q, k, v, causal=True)
        else:
            k, v, mask = cache.update(layer, k, v)  # the whole prefix, (B, n_head, pos + T, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """c_proj(relu(c_fc(x))^2): ReLU² (So et al. 2021, "Primer"; in modded-nanogpt by @SKYLINEZ007 and
    @Grad62304977, a little better than GELU there)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)  # zero at init
        self.relu2 = config.relu2

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(F.relu(h).square() if self.relu2 else kernels.gelu_tanh(h))


class Block(nn.Module):
    def __init__(self, config, value_embed=False):
        super().__init__()
        self.ln_1 = RMSNorm(config.norm_eps)
        self.attn = Attention(config, value_embed)
        self.ln_2 = RMSNorm(config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ve=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, ve, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys (already rotated) and values of every layer, preallocated for the whole generation (llama.py's, with
    n_head key/value heads)."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def bytes_per_token(self):
        """2 (k and v) * n_layer * n_head * head_dim * dtype size."""
        n_layer, _, n_head, _, head_dim = self.k.shape
        return 2 * n_layer * n_head * head_dim * self.k.element_size()

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        mask = None  # new query i (absolute position pos + i) may see keys 0 .. pos + i
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n = config.n_layer
        # layer i reads value table min(i, n-1-i) when there is one: the first and last layers share, mirrored
        # (U-net structure on token value embeddings, @leloykun)
        self.ve_table = [min(i, n - 1 - i) if min(i, n - 1 - i) < config.value_embeds else None for i in range(n)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            ve=nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.value_embeds)]),
            h=nn.ModuleList([Block(config, self.ve_table[i] is not None) for i in range(n)]),
            ln_f=RMSNorm(config.norm_eps),
        ))
        # U-net skips (@brendanh0gan): layer n-1-i adds skip_weights * the output of layer i, i < n // 2
        self.skip_weights = nn.Parameter(torch.ones(n // 2)) if config.unet else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        angles = torch.outer(torch.arange(config.block_size).float(), rope_frequencies(config, config.head_dim))
        angles = torch.cat((angles, angles), dim=-1)  # (block_size, head_dim): pair (i, i + head_dim/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # the layers that write into the residual, and the head
            if config.zero_init and (name.endswith("c_proj.weight") or name == "lm_head.weight"):
                nn.init.zeros_(p)

    def _init_weights(self, module):
        """modded-nanogpt's init:
        | tensor                                      | init                                                    |
        | transformer.wte, transformer.ve.*           | normal(0, 1) (nn.Embedding's; the embedding is normed)  |
        | c_q, c_k, c_v, mlp.c_fc                     | uniform, std 0.5 / sqrt(fan_in) (its CastedLinear)      |
        | attn.c_proj, mlp.c_proj, lm_head            | 0 (@Grad62304977): each block starts as the identity    |
        |                                             | (in Model.__init__)                                     |
        | attn.ve_lambdas                             | (0.5, 0.5)                                              |
        | skip_weights                                | 1                                                       |
        | rope_cos, rope_sin                          | buffers, computed from rope_theta                       |"""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            bound = 3 ** 0.5 * 0.5 * module.in_features ** -0.5  # uniform(-b, b) has std b / sqrt(3)
            nn.init.uniform_(module.weight, -bound, bound)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        cos = self.rope_cos[start:start + T, None]  # (T, 1, head_dim)
        sin = self.rope_sin[start:start + T, None]
        x = norm(self.transformer.wte(idx), self.config.norm_eps)  # (B, T, n_embd), normed (@Grad62304977)
        ves = [table(idx) for table in self.transformer.ve]
        n, skips = self.config.n_layer, []
        for i, block in enumerate(self.transformer.h):
            if self.skip_weights is not None and i >= n - n // 2:  # the decoder half takes the mirrored layer's output
                x = x + self.skip_weights[i - (n - n // 2)] * skips.pop()
            ve = ves[self.ve_table[i]] if self.ve_table[i] is not None else None
            x = block(x, cos, sin, ve, cache, i)
            if self.skip_weights is not None and i < n // 2:
                skips.append(x)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is not None and not need_logits and not self.config.softcap:  # the head and the loss fused
            return None, kernels.linear_cross_entropy(x, self.lm_head, targets)
        # soft-capping bends the logits before the loss, which kernels.linear_cross_entropy cannot: the plain path
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.softcap:  # logit soft-capping (Gemma 2; in modded-nanogpt by @Grad62304977)
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameters; by default without the token and value tables, lookups that cost no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in [self.transformer.wte.weight, *self.transformer.ve.parameters()])
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter for the matmuls, plus attention's
        QK^T and AV, 2 * 2 * n_layer * seq_len * n_embd forward, times 3 with backward (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    # ---------------------------------------------------------------- generation with a KV cache

    def make_cache(self, batch, max_len):
        """An empty KV cache for batch sequences of up to max_len tokens."""
        c, param = self.config, self.lm_head.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.head_dim, param.device, param.dtype)

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
