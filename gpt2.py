"""
GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), in one file.

Learned position embeddings, pre-LayerNorm residual blocks, multi-head attention, a GELU (tanh approximation)
MLP 4x wide, the token embedding tied to the output head, and GPT-2's init (residual projections scaled by
1/sqrt(2 * n_layer)). This is the template of gaia's model files: the others say how they differ from it.
Loads and saves the Hugging Face GPT2LMHeadModel layout (interop at the end of the file).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import kernels


@dataclass
class Config:
    vocab_size: int = 50257  # train.py sets this from the tokenizer
    block_size: int = 256    # maximum context length (n_positions in GPT-2)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm; False is a little faster and as good
    norm_eps: float = 1e-5   # LayerNorm's epsilon (layer_norm_epsilon in GPT-2)

    def __post_init__(self):
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if value is not None and value < 1:  # vocab_size None: train.py sets it from the tokenizer
                raise ValueError(f"{key}={value} must be >= 1")
        if self.n_embd % self.n_head:
            near = min((d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0),
                       key=lambda d: (abs(d - self.n_head), -d))  # the divisor of n_embd nearest n_head
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose n_embd as a multiple "
                             f"of n_head (e.g. --n_embd={self.n_embd // self.n_head * self.n_head or self.n_head} "
                             f"or --n_head={near})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); e.g. --dropout=0.1")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0; e.g. --norm_eps=1e-5")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the channels (Ba et al. 2016); bias optional."""

    def __init__(self, dim, eps, bias):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        # separate q, k, v (GPT-2 fuses them in one c_attn; split, each can be sharded by heads for tensor parallel)
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = fused_qkv(x, self.c_q, self.c_k, self.c_v)  # = c_q(x), c_k(x), c_v(x); one matmul below the speed fence
        # (B, T, C) -> (B, n_head, T, head_dim); -1 heads, so a tensor-parallel shard sees its own heads
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is None:  # softmax(q k^T / sqrt(head_dim) + causal mask) v: flash attention on GPUs (kernels.py)
            y = kernels.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v, mask = cache.update(layer, k, v)  # k, v: (B, n_head, pos + T, head_dim), the whole prefix
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = kernels.gelu_tanh(self.c_fc(x))  # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), fused in kernels.py
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.norm_eps, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.norm_eps, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: decoding one token
    computes only that token's q, k, v and attends to the stored prefix, never recomputing it."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self):
        """Bytes the cache holds per token of one sequence, all layers: 2 (k, v) * n_layer * n_head * head_dim * dtype size."""
        n_layer, _, n_head, _, head_dim = self.k.shape
        return 2 * n_layer * n_head * head_dim * self.k.element_size()

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
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.norm_eps, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # each block adds two of them, and the sum's variance should not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        """GPT-2's init:
        | tensor                                  | init                                                   |
        | Linear weights (c_q, c_k, c_v, c_fc)    | normal(0, 0.02)                                        |
        | c_proj weights (attention and MLP)      | normal(0, 0.02 / sqrt(2 * n_layer)), in __init__ after |
        | Linear biases                           | 0                                                      |
        | wte (= lm_head), wpe                    | normal(0, 0.02)                                        |
        | LayerNorm weight, bias                  | 1, 0 (PyTorch's default)                               |"""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, need_logits=True):
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                             f"crop the input or build the model with a larger block_size")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
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
        """An empty KV cache for batch sequences of up to max_len tokens, in the parameters' dtype and device."""
        c = self.config
        param = self.lm_head.weight
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

    def num_params(self, non_embedding=True):
        """Parameters, without the position embeddings by default (the token embedding counts: it is the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter for the matmuls, plus attention's
        QK^T and AV, 2 * 2 * n_layer * seq_len * n_embd forward, times 3 with backward (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def tp_plan(self):
        """Tensor parallel (Megatron-LM) with sequence parallel (Korthikanti et al. 2022). Inside attention and
        the MLP, q, k, v and c_fc are split by output features (each rank holds whole heads) and c_proj by
        input features. Between them the residual stream and the LayerNorms are split along the sequence, so
        each rank stores 1/tp of those activations: an all-gather before each attention/MLP, a reduce-scatter
        after. The embeddings and the tied head stay replicated."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                       RowwiseParallel, SequenceParallel)

        def gather(n_args):  # the first argument arrives split along the sequence; the module needs all of it
            return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                      desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
                                      use_local_output=True)

        return {"transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "transformer.h.*.ln_1": SequenceParallel(use_local_output=True),
                "transformer.h.*.attn": gather(3),  # (x, cache, layer)
                "transformer.h.*.attn.c_q": ColwiseParallel(),
                "transformer.h.*.attn.c_k": ColwiseParallel(),
                "transformer.h.*.attn.c_v": ColwiseParallel(),
                "transformer.h.*.attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
                "transformer.h.*.ln_2": SequenceParallel(use_local_output=True),
                "transformer.h.*.mlp": gather(1),
                "transformer.h.*.mlp.c_fc": ColwiseParallel(),
                "transformer.h.*.mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
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

def fused_qkv(x, c_q, c_k, c_v):
    """c_q(x), c_k(x), c_v(x) as one matmul with the three weights side by side, as GPT-2's fused c_attn:
    one (C, 3C) matmul is faster than three (C, C) ones. Under tensor parallelism each projection holds only
    this rank's heads as a DTensor: there the three plain calls run, which the sharding plan handles."""
    if isinstance(c_q.weight, DTensor):
        return c_q(x), c_k(x), c_v(x)
    w = torch.cat([c_q.weight, c_k.weight, c_v.weight])  # (3C, C)
    b = torch.cat([c_q.bias, c_k.bias, c_v.bias]) if c_q.bias is not None else None
    return F.linear(x, w, b).split(c_q.out_features, dim=-1)


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer", "n_head": "n_head",
             "n_embd": "n_embd", "norm_eps": "layer_norm_epsilon"}
# and: dropout, one rate in gaia, is HF's resid_pdrop, embd_pdrop and attn_pdrop (loaded as 0: set it to fine-tune);
# bias: GPT-2 always has biases (a bias=False model saves zeros)

HF_NAMES = {
    "transformer.wte.weight": "transformer.wte.weight",  # lm_head.weight is this tensor (tied)
    "transformer.wpe.weight": "transformer.wpe.weight",
    "transformer.h.{i}.ln_1.weight": "transformer.h.{i}.ln_1.weight",
    "transformer.h.{i}.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    # q, k, v are the three thirds, in this order, of HF's fused c_attn (split and concatenated below)
    "transformer.h.{i}.attn.c_q.weight": "transformer.h.{i}.attn.c_attn.weight",
    "transformer.h.{i}.attn.c_k.weight": "transformer.h.{i}.attn.c_attn.weight",
    "transformer.h.{i}.attn.c_v.weight": "transformer.h.{i}.attn.c_attn.weight",
    "transformer.h.{i}.attn.c_q.bias": "transformer.h.{i}.attn.c_attn.bias",
    "transformer.h.{i}.attn.c_k.bias": "transformer.h.{i}.attn.c_attn.bias",
    "transformer.h.{i}.attn.c_v.bias": "transformer.h.{i}.attn.c_attn.bias",
    "transformer.h.{i}.attn.c_proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "transformer.h.{i}.attn.c_proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "transformer.h.{i}.ln_2.weight": "transformer.h.{i}.ln_2.weight",
    "transformer.h.{i}.ln_2.bias": "transformer.h.{i}.ln_2.bias",
    "transformer.h.{i}.mlp.c_fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "transformer.h.{i}.mlp.c_fc.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "transformer.h.{i}.mlp.c_proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "transformer.h.{i}.mlp.c_proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
}
# the gaia file that loads each Hugging Face model_type, for the error when a checkpoint meets the wrong one
GAIA_FILES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "moe", "qwen3_moe": "moe", "mamba": "mamba",
              "mamba2": "mamba", "deepseek_v3": "mla"}
QKV = ("c_q", "c_k", "c_v")  # their order in c_attn
CONV1D = ("c_attn.weight", "c_fc.weight", "c_proj.weight")  # HF's Conv1D stores (in, out), nn.Linear (out, in)


def layer_names(model):
    """HF_NAMES with {i} filled in for every layer: gaia parameter -> HF tensor name (biases too when bias=False:
    GPT-2 has them, to_hf writes zeros)."""
    return {ours.format(i=i): theirs.format(i=i) for ours, theirs in HF_NAMES.items() for i in range(model.config.n_layer)}


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
    """A gaia Model holding the weights of a local Hugging Face GPT2LMHeadModel directory."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    t = hf.get("model_type", "gpt2")
    if t != "gpt2":
        hint = f"use --model={GAIA_FILES[t]}" if t in GAIA_FILES else "no gaia model file loads it"
        raise ValueError(f"{path} holds a {t!r} model, not gpt2; {hint}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"activation_function={act!r} is not GPT-2's tanh GELU; gaia's gpt2.py supports gelu_new only")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"{flag}=True is not supported by gaia's gpt2.py")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={hf['n_inner']} is not 4 * n_embd; gaia's gpt2.py keeps GPT-2's 4x MLP")
    model = Model(Config(**{ours: hf[theirs] for ours, theirs in HF_CONFIG.items() if theirs in hf}))

    # the original OpenAI checkpoints name their tensors without the "transformer." prefix
    hf_state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
                for k, v in read_safetensors(path).items()}
    names = layer_names(model)
    missing = sorted({theirs for theirs in names.values() if theirs not in hf_state})
    unused = [k for k in hf_state if k not in names.values() and k != "lm_head.weight"  # lm_head: tied to wte
              and not k.endswith((".attn.bias", ".attn.masked_bias"))]  # causal-mask buffers of old checkpoints
    if missing or unused:
        raise ValueError(f"{path} does not match GPT-2's layout: missing {missing[:5]}, unexpected {unused[:5]}")
    state = {}
    for ours, theirs in names.items():
        v = hf_state[theirs]
        if ".c_attn." in theirs:  # this projection's third of the fused q, k, v (the last dim in Conv1D's layout)
            v = v.chunk(3, dim=-1)[QKV.index(ours.split(".")[-2])]
        state[ours] = v.t() if theirs.endswith(CONV1D) else v
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    return model


def to_hf(model, path):
    """Write a Hugging Face GPT2LMHeadModel directory: transformers' from_pretrained loads it."""
    from safetensors.torch import save_file
    c = model.config
    own = model.state_dict()
    hf_state = {}
    for ours, theirs in layer_names(model).items():
        if ours in own:
            v = own[ours].detach().float().cpu()
        else:  # bias=False: GPT-2 always has biases, zeros compute the same function
            v = torch.zeros(model.get_submodule(ours.removesuffix(".bias")).weight.shape[0])
        v = v.t() if theirs.endswith(CONV1D) else v
        if ".c_attn." in theirs:  # c_q, c_k, c_v side by side, in that order (the order of HF_NAMES)
            v = torch.cat([hf_state[theirs], v], dim=-1) if theirs in hf_state else v
        hf_state[theirs] = v
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items()}
    hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=c.block_size, n_inner=None,
              activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
              initializer_range=0.02, tie_word_embeddings=True)
    if c.vocab_size > 50256:  # the GPT-2 tokenizer's <|endoftext|>
        hf.update(bos_token_id=50256, eos_token_id=50256)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
