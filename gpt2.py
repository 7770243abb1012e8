"""
GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), in one file.

Learned position embeddings, pre-LayerNorm residual blocks, GELU (tanh approximation), weights of the
token embedding tied to the output head, and GPT-2's init (residual projections scaled by
1/sqrt(2 * n_layer)). Loads and saves the Hugging Face GPT2LMHeadModel layout (config.json +
model.safetensors), so weights move both ways between gaia and transformers.

The model contract every gaia model file follows is written in README.md ("The model contract").
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


@dataclass
class Config:
    vocab_size: int = 50257  # train.py sets this from the tokenizer
    block_size: int = 256    # maximum context length (n_positions in GPT-2)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm; False is a little faster and as good
    layer_norm_epsilon: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}"
        self.head_dim = config.n_embd // config.n_head
        # separate q, k, v (GPT-2 fuses them in one c_attn; split, each can be sharded by heads for tensor parallel)
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        if isinstance(self.c_q.weight, DTensor):  # tensor parallel: each projection holds this rank's heads
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:  # one matmul for all three, as GPT-2's fused c_attn (faster than three small ones)
            w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
            b = torch.cat([self.c_q.bias, self.c_k.bias, self.c_v.bias]) if self.c_q.bias is not None else None
            q, k, v = F.linear(x, w, b).split(C, dim=-1)
        # (B, T, C) -> (B, n_head, T, head_dim); -1 heads, so a tensor-parallel shard sees its own heads
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            k, v, mask = cache.update(layer, k, v)  # k, v: (B, n_head, pos + T, head_dim), the whole prefix
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class GELUTanhCPU(torch.autograd.Function):
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written with a sigmoid: since
    0.5 (1 + tanh(z)) = sigmoid(2z), it is x * sigmoid(u) with u = 2 sqrt(2/pi) (x + 0.044715 x^3). Same
    function (to float rounding), but on the CPU ATen's tanh costs ~4x its sigmoid, which made F.gelu(tanh)
    ~2x slower than the erf GELU. The derivative, written out: d/dx [x s(u)] = s + x s (1 - s) u'."""
    A, C = 2 * math.sqrt(2 / math.pi), 0.044715

    @staticmethod
    def forward(ctx, x):
        A, C = GELUTanhCPU.A, GELUTanhCPU.C
        a = torch.tensor(A, dtype=x.dtype)
        s = torch.addcmul(a, x, x, value=A * C).mul_(x).sigmoid_()  # s = sigmoid(x (A + A C x^2)), in place
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        A, C = GELUTanhCPU.A, GELUTanhCPU.C
        x, s = ctx.saved_tensors
        # u' = A (1 + 3 C x^2), capped at |x| = 20: beyond it s (1 - s) is 0 in float32 anyway, and a finite u'
        # keeps that product 0 for huge x, never inf * 0 = nan
        d = torch.addcmul(torch.tensor(A, dtype=x.dtype), x, x, value=3 * A * C).clamp_(max=A * (1 + 3 * C * 400))
        torch.ops.aten.sigmoid_backward(d, s, grad_input=d)  # u' s (1 - s), one fused pass
        return d.mul_(x).add_(s).mul_(grad)  # (s + x u' s (1 - s)) grad


def gelu_tanh(x):
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return GELUTanhCPU.apply(x)
    # one fused kernel on GPUs, what torch.compile fuses best, and float32 math inside for bf16/fp16 inputs
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
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
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
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
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
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
        if targets is None:
            return self.lm_head(x), None
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

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
        gather = lambda n_args: PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                                   desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
                                                   use_local_output=True)
        plan = {"transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                "transformer.ln_f": SequenceParallel(use_local_output=True),
                "lm_head": gather(1)}
        for i in range(self.config.n_layer):
            p = f"transformer.h.{i}."
            plan.update({p + "ln_1": SequenceParallel(use_local_output=True), p + "attn": gather(3),
                         p + "attn.c_q": ColwiseParallel(), p + "attn.c_k": ColwiseParallel(),
                         p + "attn.c_v": ColwiseParallel(), p + "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
                         p + "ln_2": SequenceParallel(use_local_output=True), p + "mlp": gather(1),
                         p + "mlp.c_fc": ColwiseParallel(), p + "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1))})
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
        cache = KVCache(c.n_layer, B, c.n_head, max_len, c.n_embd // c.n_head, param.device, param.dtype)
        logits, _ = self(idx[:, -c.block_size:], cache=cache)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            next_token = sample(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if cache.pos == max_len:
                # the context is full: positions are learned, so the window slides and the prefix is recomputed
                cache.pos = 0
                logits, _ = self(idx[:, -c.block_size:], cache=cache)  # nanoGPT's crop: the last block_size tokens
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face GPT2LMHeadModel directory (config.json + model.safetensors)."""
        from safetensors.torch import load_file
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{path} holds a {hf.get('model_type')!r} model, not gpt2; use --model={hf.get('model_type')} "
                             f"or a GPT-2 checkpoint")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"activation_function={act!r} is not GPT-2's tanh GELU; gaia's gpt2.py supports gelu_new only")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError(f"{flag}=True is not supported by gaia's gpt2.py")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise ValueError(f"n_inner={hf['n_inner']} is not 4 * n_embd; gaia's gpt2.py keeps GPT-2's 4x MLP")
        config = Config(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True,
                        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)
        state = load_file(os.path.join(path, "model.safetensors"))
        state = {k.removeprefix("transformer."): v for k, v in state.items()}  # old checkpoints lack the prefix
        C = config.n_embd
        own = {}
        for k, v in state.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # causal-mask buffers of old checkpoints; the head is tied to wte
            if k.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            if ".c_attn." in k:  # fused q, k, v -> three projections
                for name, part in zip(("c_q", "c_k", "c_v"), v.split(C, dim=0)):
                    own["transformer." + k.replace("c_attn", name)] = part
            else:
                own["transformer." + k] = v
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path} does not match GPT-2's layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face GPT2LMHeadModel directory: transformers' from_pretrained loads it."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        c = self.config
        state = {k: v.detach().float().cpu() for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied
        if not c.bias:  # GPT-2 always has biases: zeros compute the same function
            for name, m in self.named_modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                    state[name + ".bias"] = torch.zeros(m.weight.shape[0])
        for i in range(c.n_layer):  # three projections -> HF's fused c_attn
            p = f"transformer.h.{i}.attn."
            for kind in ("weight", "bias"):
                state[p + "c_attn." + kind] = torch.cat([state.pop(f"{p}{n}.{kind}") for n in ("c_q", "c_k", "c_v")])
        for k in state:
            if k.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                state[k] = state[k].t()  # nn.Linear (out, in) -> HF's Conv1D (in, out)
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                  n_head=c.n_head, n_inner=None, activation_function="gelu_new",
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                  layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=0.02,
                  tie_word_embeddings=True)
        if c.vocab_size > 50256:  # the GPT-2 tokenizer's <|endoftext|>
            hf.update(bos_token_id=50256, eos_token_id=50256)
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
