"""
A vision-language model that answers questions about images, in one file: nanoVLM (Wiedmann et al. 2025,
huggingface/nanoVLM), in the LLaVA recipe (Liu et al. 2023, "Visual Instruction Tuning"): a vision encoder turns the
image into patch vectors, a modality projector turns those into a few tokens of the language model's width, and a
decoder reads them in place of an <image> placeholder in the prompt and writes the answer.

- Vision encoder: SigLIP's ViT (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"; the ViT of
  Dosovitskiy et al. 2021): a patch embedding, learned positions, pre-norm blocks of LayerNorm, bidirectional
  multi-head attention with biases and a tanh-GELU MLP, a final LayerNorm (post_layernorm), no CLS token.
  Loads a transformers SiglipVisionModel directory; its output is that model's last_hidden_state.
- Modality projector: nanoVLM's pixel shuffle (Shi et al. 2016's space-to-depth, as in Idefics3): each s x s
  square of patches becomes one token s^2 times as wide, so the decoder reads N / s^2 image tokens, then a linear
  map to the decoder's width.
- Language decoder: llama.py's blocks, repeated here (one file, one model): RMSNorm, RoPE, grouped-query attention,
  SwiGLU, KV cache; loads a LlamaForCausalLM directory. Against llama.py: the input is (images, ids), and the
  embeddings of the <image> ids are replaced by the image tokens; the loss counts answer tokens only; RoPE is the
  plain one (no Llama 3 scaling); generating with images refuses to crop the context (the image would fall out).
- Tokenizer: UTF-8 bytes (no library) or GPT-2's BPE (tiktoken), then two ids of our own: <image> and <eos>.

A sequence: the prompt "<image>" + question + "\\n", where "<image>" is expanded to n_image_tokens <image> ids
(the image tokens take their places one for one, as in nanoVLM and LLaVA-1.5 in transformers, so ids, logits and
targets keep one length), then the answer and <eos>. Only the answer and <eos> are predicted (targets -1 elsewhere);
the loss is the mean over the examples of each one's mean over those tokens, so every example weighs the same and
data-parallel ranks (whose answer-token counts differ) average to the loss of one process on the whole batch.

Data (the train.py contract of "models that bring their own data", README): built-in, generated with numpy, no
download: 32 x 32 images of one to four shapes (circle, square, triangle, cross) in five colours, sizes and
positions, with questions of five kinds (colour of a named shape, how many of a shape, where one shape is relative
to another, is there a <colour> <shape>, a caption listing the shapes left to right), single-word answers except
the caption. The held-out split has other seeds, and half of its questions are about colour-shape pairs that never
occur in training (HELD_OUT); their accuracy is reported on its own (answer_acc_unseen). Or --data=FILE.jsonl of
{"image": path, "question": ..., "answer": ...} rows. evaluate() gives exact-match answer accuracy on 300 held-out
questions, per kind; --blind=True trains the same model on blank images, the baseline that shows the image is used.

    python train.py --model=vlm                  # built-in shapes, about 10 minutes on a laptop CPU
    python train.py --model=vlm --blind=True     # the baseline: the same run on blank images
    python train.py --model=vlm --data=qa.jsonl  # your images and questions

Measured (2026-12-02, 2-core AMD EPYC, torch 2.13 CPU, OMP_NUM_THREADS=1, the two runs side by side, each on its own
core, nothing else running: 449 and 452 s wall for 3000 iterations), `python train.py --model=vlm` against
`--blind=True`, exact match on the 300 held-out questions: overall 0.437 vs 0.307; colour 0.400 vs 0.183; exists 0.800
vs 0.467; caption 0.100 vs 0.000; count 0.600 vs 0.600; position 0.283 vs 0.283; unseen pairs 0.340 vs 0.253 (at
iteration 1000: overall 0.350 vs 0.310, colour 0.367 vs 0.150). The image is used for colour, existence and captions;
counting and positions are not learned in this budget (the two runs score the same).
"""
import functools
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TOKENIZER_SIZES = {"byte": 256, "gpt2": 50257}  # ids of the tokenizer itself; <image> and <eos> come after them


@dataclass
class Config:
    # the image and the vision encoder (SigLIP's names in the comments)
    image_size: int = 32
    patch_size: int = 4
    vision_n_layer: int = 3
    vision_n_head: int = 4
    vision_n_embd: int = 96                      # hidden_size
    vision_intermediate_size: int | None = None  # the MLP's hidden width; None: 4 * vision_n_embd
    vision_norm_eps: float = 1e-6                # layer_norm_eps
    # the modality projector
    pixel_shuffle: int = 2                       # s: each s x s square of patches becomes one image token
    # the language decoder (llama.py's names)
    tokenizer: str = "byte"                      # byte | gpt2 (the same key as train.py's --tokenizer)
    vocab_size: int | None = None                # None: the tokenizer's, plus <image> and <eos>
    block_size: int = 128                        # longest sequence, image tokens included
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    intermediate_size: int | None = None         # SwiGLU's hidden width; None: 2/3 * 4 * n_embd rounded up to 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    blind: bool = False                          # True: every image is blank (zeros), the baseline without vision

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_SIZES:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not one of byte, gpt2; e.g. --tokenizer=byte")
        need = TOKENIZER_SIZES[self.tokenizer] + 2
        if self.vocab_size is None:
            self.vocab_size = need
        if self.vocab_size < need:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the {self.tokenizer} tokenizer's {need} "
                             f"ids (its own, <image> and <eos>); drop --vocab_size or set it >= {need}")
        for key in ("image_size", "patch_size", "vision_n_layer", "vision_n_head", "vision_n_embd", "pixel_shuffle",
                    "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                             f"the patches must tile the image (e.g. --image_size={self.patch_size * 8})")
        grid = self.image_size // self.patch_size
        if grid % self.pixel_shuffle:
            raise ValueError(f"the {grid} x {grid} grid of patches does not split into squares of pixel_shuffle="
                             f"{self.pixel_shuffle}; choose a pixel_shuffle that divides {grid} "
                             f"(e.g. --pixel_shuffle=1)")
        if self.vision_n_embd % self.vision_n_head:
            raise ValueError(f"vision_n_embd={self.vision_n_embd} is not divisible by vision_n_head="
                             f"{self.vision_n_head}; choose a multiple of it")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; each key/value head "
                             f"serves a whole group of query heads (e.g. --n_kv_head=1)")
        if self.n_embd % (2 * self.n_head):
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of 2 * n_head={2 * self.n_head}: head_dim must "
                             f"be whole and even, RoPE turns pairs (e.g. --n_embd={2 * self.n_head * 16})")
        if self.block_size <= self.n_image_tokens:
            raise ValueError(f"block_size={self.block_size} leaves no room for text after the {self.n_image_tokens} "
                             f"image tokens; raise --block_size (e.g. --block_size={self.n_image_tokens + 112})")
        for key in ("vision_intermediate_size", "intermediate_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1, or None for the default width")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); e.g. --dropout=0.1")
        for key in ("norm_eps", "vision_norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.vision_intermediate_size is None:
            self.vision_intermediate_size = 4 * self.vision_n_embd
        if self.intermediate_size is None:  # llama.py's Meta rule with multiple_of 32: SwiGLU's 3 matrices ~ GPT's 2
            self.intermediate_size = 32 * ((int(2 * 4 * self.n_embd / 3) + 31) // 32)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_image_tokens(self):
        return self.n_patches // self.pixel_shuffle ** 2


class Tokenizer:
    """Text <-> ids: the tokenizer's own ids (UTF-8 bytes 0..255, or GPT-2's 50257 BPE ids), then image_id (the
    <image> placeholder) and eos_id (ends an answer; also pads a batch, under a -1 target)."""

    def __init__(self, config):
        self.name, self.n_image_tokens = config.tokenizer, config.n_image_tokens
        self.image_id = TOKENIZER_SIZES[config.tokenizer]
        self.eos_id = self.image_id + 1
        self.bpe = None
        if config.tokenizer == "gpt2":
            import tiktoken  # imported here: byte-level models need no library
            try:
                self.bpe = tiktoken.get_encoding("gpt2")
            except Exception as e:  # no network and no cache
                raise ValueError(f"could not load the GPT-2 BPE ({type(e).__name__}: {e}); point TIKTOKEN_CACHE_DIR "
                                 f"at a folder holding its files, or use --tokenizer=byte") from None

    def encode(self, text):
        """The ids of text; its one "<image>" (if any) becomes n_image_tokens image ids."""
        parts = text.split("<image>")
        if len(parts) > 2:
            raise ValueError(f"{text!r} has {len(parts) - 1} <image> markers; a prompt holds one image")
        ids = self._encode(parts[0])
        if len(parts) == 2:
            ids += [self.image_id] * self.n_image_tokens + self._encode(parts[1])
        return ids

    def _encode(self, text):
        return self.bpe.encode_ordinary(text) if self.bpe else list(text.encode("utf-8"))

    def decode(self, ids):
        ids = [int(i) for i in ids if i < self.image_id]  # our own ids are not text
        return self.bpe.decode(ids) if self.bpe else bytes(ids).decode("utf-8", errors="replace")


def prompt_text(question):
    """The prompt around a question: the image first (unless the question places "<image>" itself), a newline last."""
    return (question if "<image>" in question else "<image>" + question) + "\n"


# ------------------------------------------------------------------------------------- the vision encoder (SigLIP)

class VisionAttention(nn.Module):
    """Bidirectional multi-head attention, SigLIP's: q, k, v and out projections with biases, no RoPE, no mask."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.vision_n_embd // config.vision_n_head
        self.q_proj = nn.Linear(config.vision_n_embd, config.vision_n_embd)
        self.k_proj = nn.Linear(config.vision_n_embd, config.vision_n_embd)
        self.v_proj = nn.Linear(config.vision_n_embd, config.vision_n_embd)
        self.out_proj = nn.Linear(config.vision_n_embd, config.vision_n_embd)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, n_head, N, head_dim); every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.vision_n_embd, config.vision_intermediate_size)
        self.fc2 = nn.Linear(config.vision_intermediate_size, config.vision_n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.vision_n_embd, eps=config.vision_norm_eps)
        self.attn = VisionAttention(config)
        self.ln_2 = nn.LayerNorm(config.vision_n_embd, eps=config.vision_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionEncoder(nn.Module):
    """images (B, 3, H, W), SigLIP-normalized to [-1, 1] -> patch vectors (B, n_patches, vision_n_embd), the patches
    in raster order (row by row), as SiglipVisionModel's last_hidden_state."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # a linear map of each patch_size x patch_size x 3 patch, written as the strided convolution SigLIP uses
        self.patch_embed = nn.Conv2d(3, config.vision_n_embd, config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(config.n_patches, config.vision_n_embd))  # learned, one per patch
        self.h = nn.ModuleList([VisionBlock(config) for _ in range(config.vision_n_layer)])
        self.ln_f = nn.LayerNorm(config.vision_n_embd, eps=config.vision_norm_eps)  # SigLIP's post_layernorm

    def forward(self, images):
        x = self.patch_embed(images)  # (B, vision_n_embd, H / patch, W / patch)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, n_patches, vision_n_embd)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    @classmethod
    def from_pretrained(cls, path, **config):
        """A local transformers SiglipVisionModel directory (or a SiglipModel's, whose vision half it takes)."""
        encoder = cls(Config(**{**siglip_config(path), **config}))
        encoder.load_state_dict(read_siglip(path, encoder.config))
        return encoder

    def save_pretrained(self, path):
        """A SiglipVisionModel directory (config.json + model.safetensors) that transformers loads."""
        write_siglip(self, path)


# ------------------------------------------------------------------------------------- the modality projector

def pixel_shuffle(x, s):
    """nanoVLM's pixel shuffle: x (B, N, D), a square grid of N patches in raster order -> (B, N / s^2, D * s^2).
    Output token (i, j) is the s x s square of patches (i*s + di, j*s + dj), concatenated di-major, then dj."""
    B, N, D = x.shape
    g = math.isqrt(N)  # patches per side
    x = x.view(B, g // s, s, g // s, s, D)  # (B, row block i, di, column block j, dj, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, i, j, di, dj, D)
    return x.reshape(B, (g // s) ** 2, s * s * D)


class Projector(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.s = config.pixel_shuffle
        self.proj = nn.Linear(config.vision_n_embd * self.s ** 2, config.n_embd, bias=False)  # nanoVLM: no bias

    def forward(self, x):
        return self.proj(pixel_shuffle(x, self.s))  # (B, n_image_tokens, n_embd)


# ------------------------------------------------------------------------------------- the language decoder (llama.py)

class RMSNorm(nn.Module):
    """x / rms(x) * weight, in fp32 (as llama.py)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(config, dim):
    """inv_freq_i = rope_theta^(-2i / dim), i = 0 .. dim/2 - 1 (plain RoPE; llama.py adds Llama 3's scaling)."""
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, n_head, dim) rotated by position, pairs (i, i + dim/2): HF's layout, as llama.py."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """llama.py's grouped-query attention: n_head query heads share n_kv_head key/value heads."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_head, head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv_head, head_dim)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        gqa = q.shape[1] != k.shape[1]  # SDPA groups the query heads itself: no repeated k, v in memory
        if cache is None:  # causal over the whole sequence: the image tokens see each other in raster order, as nanoVLM
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=gqa)
        else:
            k, v, mask = cache.update(layer, k, v)  # (B, n_kv_head, pos + T, head_dim): the whole prefix
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_head * head_dim)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """llama.py's: rotated keys and values of every layer, n_kv_head heads, preallocated. After the prompt it holds
    the image tokens' keys and values too, so decoding never runs the vision encoder again."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0  # tokens stored so far

    @property
    def bytes_per_token(self):
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        return 2 * n_layer * n_kv_head * head_dim * self.k.element_size()

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        mask = None  # new query i (position pos + i) sees keys 0 .. pos + i
        if T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask


# ------------------------------------------------------------------------------------- the model

def split_inputs(inputs):
    """forward's and generate's inputs: (images (B, 3, H, W), ids (B, T)), or ids alone (text, no image)."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (None, inputs)


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.projector = Projector(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        angles = torch.outer(torch.arange(config.block_size).float(), rope_frequencies(config, config.head_dim))
        angles = torch.cat((angles, angles), dim=-1)  # (block_size, head_dim)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.image_id = TOKENIZER_SIZES[config.tokenizer]
        self.eos_id = self.image_id + 1
        self._tokenizer = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # after the rest, so the random draws keep their order
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        """GPT-2's init for the decoder (as llama.py), the same normal(0, 0.02) for the vision encoder (as nanoVLM
        trains SigLIP-shaped encoders from scratch) and the projector:
        | tensor                                                        | init                              |
        | wte, Linear weights (q/k/v/o, gate/up, fc1/fc2, proj, lm_head) | normal(0, 0.02)                   |
        | o_proj, down_proj                                             | normal(0, 0.02 / sqrt(2 n_layer)) |
        | vision.patch_embed.weight, vision.pos_embed                   | normal(0, 0.02)                   |
        | Linear and Conv2d biases (vision only)                        | 0                                 |
        | LayerNorm weight / bias, RMSNorm weight                       | 1 / 0, 1                          |"""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, VisionEncoder):
            nn.init.normal_(module.pos_embed, mean=0.0, std=0.02)

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # built on first use: a gpt2 model needs tiktoken only when it reads text
            self._tokenizer = Tokenizer(self.config)
        return self._tokenizer

    def image_tokens(self, images):
        """images (B, 3, H, W) -> the decoder's image tokens (B, n_image_tokens, n_embd)."""
        if self.config.blind:  # the baseline: the same model and budget, but nothing to see
            images = torch.zeros_like(images)
        return self.projector(self.vision(images))

    def forward(self, inputs, targets=None, cache=None):
        """inputs: (images (B, 3, H, W), ids (B, T)) with n_image_tokens <image> ids per row (Tokenizer.encode
        expands "<image>"), or ids alone (text; then <image> ids are ordinary embeddings). targets (B, T): -1 except
        where the next token is an answer token or <eos>. Returns logits (B, T, vocab_size) and the loss: the mean
        over the examples of each one's mean cross-entropy over its answer tokens and <eos> (each weighs the same)."""
        images, idx = split_inputs(inputs)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if images is not None:
            is_image = idx == self.image_id  # (B, T)
            counts = is_image.sum(1)
            if not bool((counts == self.config.n_image_tokens).all()):
                raise ValueError(f"each row must hold {self.config.n_image_tokens} <image> ids, one per image token "
                                 f"(Tokenizer.encode expands '<image>'); the rows hold {counts.tolist()}")
            tokens = self.image_tokens(images).to(x.dtype)  # (B, n_image_tokens, n_embd)
            # the image tokens fill the <image> positions in order, row by row (masked_scatter reads them in that order)
            x = x.masked_scatter(is_image.unsqueeze(-1), tokens)
        cos, sin = self.rope_cos[start:start + T, None, :], self.rope_sin[start:start + T, None, :]  # (T, 1, head_dim)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        # The loss is a mean over examples of each example's mean cross-entropy over its answer tokens and <eos>: every
        # example weighs the same, whatever its answer's length (a caption does not outweigh a "yes"). A mean over all
        # answer tokens of the batch would not split over data-parallel ranks: their token counts differ, so the mean
        # of per-rank token means is not the global one. The mean of equal-size per-rank example means is, so 2 ranks
        # of 8 train exactly as 1 process of 16. Rows with no target (none in training: each ends in <eos>) are left
        # out of the mean.
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1,
                                    reduction="none").view(B, T)  # 0 where the target is -1
        counts = (targets != -1).sum(1)  # (B,) answer tokens + <eos> of each example
        has = counts > 0
        per_example = per_token.sum(1)[has] / counts[has]
        loss = per_example.mean() if bool(has.any()) else per_token.sum() * 0.0
        return logits, loss

    def num_params(self, part=None):
        """Parameters of the whole model, or of part ("vision", "projector", "decoder"), without the embedding table
        (a lookup, no FLOPs) unless it is tied to the head."""
        named = dict(self.named_parameters())  # a tied weight is listed once
        if not self.config.tie_word_embeddings:
            named.pop("transformer.wte.weight")
        owner = lambda n: n.split(".")[0] if n.split(".")[0] in ("vision", "projector") else "decoder"
        return sum(p.numel() for n, p in named.items() if part is None or owner(n) == part)

    def flops_per_token(self, seq_len):
        """The decoder's training FLOPs per token (forward + backward), as llama.py: 6 per parameter plus attention."""
        c = self.config
        return 6 * self.num_params("decoder") + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def flops_per_sample(self):
        """Training FLOPs per example: the vision encoder over every patch, the projector over the image tokens, the
        decoder over block_size tokens. An upper bound: batches are padded to their longest example, not block_size."""
        c = self.config
        vision = (6 * self.num_params("vision") + 12 * c.vision_n_layer * c.vision_n_embd * c.n_patches) * c.n_patches
        projector = 6 * self.num_params("projector") * c.n_image_tokens
        return vision + projector + self.flops_per_token(c.block_size) * c.block_size

    # ---------------------------------------------------------------- generation with a KV cache

    def make_cache(self, batch, max_len):
        c, param = self.config, self.lm_head.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, param.device, param.dtype)

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens, temperature=1.0, top_k=None, top_p=None, return_logits=False,
                 stop_id=None):
        """Continue inputs (as forward's: (images, ids) or ids) by max_new_tokens tokens, temperature 0 greedy. The
        prompt, image tokens included, runs once into the KV cache; each new token is one decoder step. With images
        the <image> id is never drawn. stop_id: stop early once every row has drawn it. return_logits=True also
        returns the logits each new token was drawn from, (B, new tokens, vocab_size)."""
        images, idx = split_inputs(inputs)
        block_size = self.config.block_size
        if images is not None and idx.shape[1] + max_new_tokens > block_size:  # a crop would cut the image off
            raise ValueError(f"prompt of {idx.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds block_size="
                             f"{block_size}; generate fewer tokens")
        max_len = min(idx.shape[1] + max_new_tokens, block_size)
        cache = self.make_cache(idx.shape[0], max_len)
        logits, _ = self((images, idx) if images is not None else idx[:, -block_size:], cache=cache)
        steps, done = [], torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1, :])
            step = logits[:, -1, :]
            if images is not None:
                step = step.clone()
                step[:, self.image_id] = float("-inf")
            next_token = sample(step, temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if stop_id is not None:
                done |= next_token[:, 0] == stop_id
                if bool(done.all()):
                    break
            if cache.pos == max_len:  # text only: nanoGPT's crop, the last block_size tokens afresh
                cache = self.make_cache(idx.shape[0], max_len)
                logits, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = self(next_token, cache=cache)
        return (idx, torch.stack(steps, dim=1)) if return_logits else idx

    # ---------------------------------------------------------------- Hugging Face interop

    @classmethod
    def from_pretrained(cls, path):
        """A directory save_pretrained wrote (config.json + model.safetensors, sharded or not); or a SiglipVisionModel
        or a LlamaForCausalLM directory, for a model whose other parts start random (from_parts)."""
        return from_pretrained(path)

    def save_pretrained(self, path):
        """gaia's own layout: config.json (this Config) + model.safetensors (these parameter names)."""
        write_gaia(self, path)

    @classmethod
    def from_parts(cls, vision=None, decoder=None, **config):
        """nanoVLM's start: a SigLIP vision encoder and/or a Llama decoder from transformers directories, the rest
        (always the projector) random; config sets the other keys (tokenizer, pixel_shuffle, ...)."""
        return from_parts(vision, decoder, **config)

    def save_parts(self, vision_path, decoder_path):
        """The vision encoder as a SiglipVisionModel directory, the decoder as a LlamaForCausalLM one."""
        write_siglip(self.vision, vision_path)
        write_llama(self, decoder_path)


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


@torch.no_grad()
def answer(model, images, questions, max_new_tokens=None, temperature=0.0, top_k=None, top_p=None):
    """The model's answers (strings, up to <eos>) to questions[i] about images[i] (B, 3, H, W); greedy by default.
    Questions are batched by prompt length, so no row is padded and each answer is the one it gets alone."""
    tok, device = model.tokenizer, model.lm_head.weight.device
    prompts = [tok.encode(prompt_text(q)) for q in questions]
    out = [None] * len(prompts)
    for n in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == n]
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        new = model.config.block_size - n  # what the context has room for
        new = new if max_new_tokens is None else min(new, max_new_tokens)
        if new < 1:
            raise ValueError(f"the prompt {questions[rows[0]]!r} fills block_size={model.config.block_size}")
        gen = model.generate((images[rows].to(device), ids), new, temperature, top_k, top_p, stop_id=tok.eos_id)
        for r, i in enumerate(rows):
            ids_i = gen[r, n:].tolist()
            out[i] = tok.decode(ids_i[:ids_i.index(tok.eos_id)] if tok.eos_id in ids_i else ids_i)
    return out


def answer_image(model, path, question, max_new_tokens=None, temperature=0.0, top_k=None, top_p=None):
    """One answer about the image file at path (what sample.py --image=PATH --prompt=... prints)."""
    pixels = to_pixels(read_image(path, model.config.image_size))
    return answer(model, pixels[None], [question], max_new_tokens, temperature, top_k, top_p)[0]


# ===================================================================================== data

# The built-in shapes: scenes drawn on a 32 x 32 canvas (rendered at any image_size), five kinds of question.
CANVAS = 32
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
           "white": (235, 235, 235)}
COLOUR_NAMES = tuple(COLOURS)
KINDS = ("colour", "count", "position", "exists", "caption")
# colour-shape pairs that never occur in training, not in the images nor in the text: one per shape, each colour
# and each shape still seen with others. Half of the held-out questions are about them (answer_acc_unseen).
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "cross")}
# examples, numpy seed: fixed, independent of train.py's --seed. A million training examples: a run of minutes sees
# each image once, so its accuracy measures what it learned about shapes, not which images it has memorized
SPLITS = {"train": (1_000_000, 0), "val": (2_000, 1)}
# the longest built-in examples, what block_size must hold: four shapes' caption, the longest question
LONGEST = [("describe the image.", ", ".join(["yellow triangle"] * 4)),
           ("where is the triangle relative to the square?", "above")]
EVAL_EXAMPLES = 300  # the held-out questions evaluate() answers at each eval (60 of each kind, built in)


class Split:
    """One split's examples: question, answer, kind, unseen (about a HELD_OUT pair) and the image, either pixels
    (user data, uint8 (N, S, S, 3)) or a scene [(shape, colour, x, y, r)] drawn when asked for (built in)."""

    def __init__(self, examples, config, pixels=None):
        self.examples, self.pixels = examples, pixels
        self.image_size, self.tokenizer = config.image_size, Tokenizer(config)

    def __len__(self):
        return len(self.examples)

    def image(self, i):
        """Example i's image as the model reads it, (3, S, S) in [-1, 1]."""
        if self.pixels is not None:
            return to_pixels(self.pixels[i])
        return to_pixels(render(self.examples[i]["scene"], self.image_size))

    def encode(self, i):
        return encode_example(self.tokenizer, self.examples[i]["question"], self.examples[i]["answer"])


def encode_example(tok, question, answer):
    """(ids of prompt + answer + <eos>, number of prompt ids)."""
    prompt = tok.encode(prompt_text(question))
    return prompt + tok.encode(answer) + [tok.eos_id], len(prompt)


def to_pixels(rgb):
    """uint8 (S, S, 3) -> float (3, S, S) in [-1, 1], SigLIP's normalization (mean 0.5, std 0.5)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


def render(scene, size):
    """A scene on a black size x size image, uint8 (size, size, 3): each pixel takes the colour of the shape its
    centre falls in, shapes scaled from the 32-pixel canvas."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    centres = (np.arange(size) + 0.5) * CANVAS / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    for shape, colour, cx, cy, r in scene:
        dx, dy = x - (cx + 0.5), y - (cy + 0.5)
        if shape == "circle":
            inside = dx ** 2 + dy ** 2 <= (r + 0.5) ** 2
        elif shape == "square":
            inside = (abs(dx) <= 0.85 * r) & (abs(dy) <= 0.85 * r)
        elif shape == "triangle":  # apex up, base 2r wide
            inside = (dy >= -r - 0.5) & (dy <= r + 0.5) & (abs(dx) <= (dy + r + 0.5) / 2)
        else:  # cross: two bars a third of its width
            w = max(1.0, r / 3)
            inside = ((abs(dx) <= w) & (abs(dy) <= r + 0.5)) | ((abs(dy) <= w) & (abs(dx) <= r + 0.5))
        image[inside] = COLOURS[colour]
    return image


def random_scene(rng, allow_held_out):
    """One to four shapes [(shape, colour, x, y, r)] whose boxes do not touch, at distinct x (captions read left to
    right); r 5..8 pixels on the canvas (shapes a few patches wide, which a small ViT trained from scratch tells
    apart early in a run), 200 placement attempts so that crowded scenes still reach four shapes."""
    n, scene = 1 + int(rng.integers(4)), []
    for us, uc, ur, ux, uy in rng.random((200, 5)).tolist():  # attempts, one row of draws each: a crowded canvas
        if len(scene) == n:                                     # may hold fewer than n
            break
        shape, colour, r = SHAPES[int(us * len(SHAPES))], COLOUR_NAMES[int(uc * len(COLOUR_NAMES))], 5 + int(ur * 4)
        if not allow_held_out and (colour, shape) in HELD_OUT:
            continue
        x, y = r + int(ux * (CANVAS - 2 * r)), r + int(uy * (CANVAS - 2 * r))  # the whole shape on the canvas
        if all(max(abs(x - ox), abs(y - oy)) > r + orad and abs(x - ox) >= 2 for _, _, ox, oy, orad in scene):
            scene.append((shape, colour, x, y, r))
    return scene


def make_question(rng, scene, kind, allow_held_out):
    """(question, answer, the colour-shape pairs it is about) of that kind, or None if this scene has none."""
    count = {s: sum(o[0] == s for o in scene) for s in SHAPES}
    single = [o for o in scene if count[o[0]] == 1]  # shapes named without ambiguity
    if kind == "colour":
        if not single:
            return None
        o = single[rng.integers(len(single))]
        return f"what colour is the {o[0]}?", o[1], [(o[1], o[0])]
    if kind == "count":  # mostly a shape that is there, so the answers are not mostly 0
        shape = scene[rng.integers(len(scene))][0] if rng.random() < 0.75 else SHAPES[rng.integers(len(SHAPES))]
        return f"how many {PLURALS[shape]}?", str(count[shape]), [(o[1], o[0]) for o in scene if o[0] == shape]
    if kind == "position":
        if len(single) < 2:
            return None
        i, j = rng.choice(len(single), size=2, replace=False)
        a, b = single[i], single[j]
        dx, dy = a[2] - b[2], a[3] - b[3]
        if abs(abs(dx) - abs(dy)) < 3:  # near a diagonal: neither answer would be clearly right
            return None
        where = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        return f"where is the {a[0]} relative to the {b[0]}?", where, [(a[1], a[0]), (b[1], b[0])]
    if kind == "exists":
        present = {(o[1], o[0]) for o in scene}
        if rng.random() < 0.5:
            pair, yes = sorted(present)[rng.integers(len(present))], "yes"
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES
                      if (c, s) not in present and (allow_held_out or (c, s) not in HELD_OUT)]
            pair, yes = absent[rng.integers(len(absent))], "no"
        return f"is there a {pair[0]} {pair[1]}?", yes, [pair]
    caption = ", ".join(f"{o[1]} {o[0]}" for o in sorted(scene, key=lambda o: o[2]))
    return "describe the image.", caption, [(o[1], o[0]) for o in scene]


@functools.lru_cache(maxsize=4096)  # an example is read for its text, its ids and its image: made once, never changed
def builtin_example(name, i):
    """Example i of a built-in split, made from its own generator, seeded (split seed, i): any example can be made
    alone, in any order, the same every time. Kinds take turns (so any 5k examples hold k of each); in val every
    other group of five is about held-out pairs, the others are not."""
    _, seed = SPLITS[name]
    rng, val = np.random.default_rng([seed, i]), name == "val"
    kind, want_unseen = KINDS[i % len(KINDS)], val and (i // len(KINDS)) % 2 == 1
    while True:
        scene = random_scene(rng, allow_held_out=val)
        qa = make_question(rng, scene, kind, allow_held_out=val)
        if qa is not None and any(p in HELD_OUT for p in qa[2]) == want_unseen:
            return dict(scene=scene, question=qa[0], answer=qa[1], kind=kind, unseen=want_unseen)


class BuiltinExamples:
    """A built-in split's examples as a sequence, each made when asked for: no memory, no time to load."""

    def __init__(self, name):
        self.name = name

    def __len__(self):
        return SPLITS[self.name][0]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return builtin_example(self.name, i)


def read_image(path, size):
    """An image file -> uint8 (size, size, 3) RGB, resized (bilinear) as the model reads it."""
    from PIL import Image
    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def read_jsonl(path, config):
    """The user's rows {"image": path (relative to the file's folder), "question": str, "answer": str, "kind":
    optional str}; (examples, pixels). A bad row raises ValueError naming its line."""
    from PIL import UnidentifiedImageError
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        raise ValueError(f"data path {path!r} is not a .jsonl file; pass --data=FILE.jsonl of rows "
                         f'{{"image": path, "question": ..., "answer": ...}}, or --data= for the built-in shapes')
    examples, pixels, folder = [], [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not JSON ({e}); write one JSON object per line") from None
            missing = [k for k in ("image", "question", "answer") if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f'{where} lacks "{missing[0]}"; each row needs "image", "question" and "answer"')
            if not all(isinstance(row[k], str) and row[k] for k in ("image", "question", "answer")):
                raise ValueError(f'{where}: "image", "question" and "answer" must be non-empty strings')
            file = os.path.join(folder, row["image"])
            if not os.path.isfile(file):
                raise ValueError(f"{where}: image {row['image']!r} does not exist ({file}); fix the path (relative "
                                 f"paths start at the .jsonl file's folder)")
            try:
                pixels.append(read_image(file, config.image_size))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ValueError(f"{where}: image {row['image']!r} cannot be read ({type(e).__name__}); replace it "
                                 f"with a PNG or JPEG") from None
            examples.append(dict(question=row["question"], answer=row["answer"], kind=str(row.get("kind", "qa")),
                                 unseen=False, line=n))
    if len(examples) < 2:
        raise ValueError(f"{path} has {len(examples)} rows; it needs at least 2 (the last tenth is held out)")
    return examples, np.stack(pixels)


def load_splits(path, config, cache_dir=None):
    """(train, val) Splits: the built-in shapes (path ""), or a .jsonl file whose last tenth is held out."""
    if path:
        examples, pixels = read_jsonl(path, config)
        cut = len(examples) - max(1, len(examples) // 10)
        splits = Split(examples[:cut], config, pixels[:cut]), Split(examples[cut:], config, pixels[cut:])
    else:
        splits = Split(BuiltinExamples("train"), config), Split(BuiltinExamples("val"), config)
    tok = Tokenizer(config)  # every example must fit the context: one clear line now, not a crash mid-run
    rows = ([(e["question"], e["answer"], f"{path} line {e['line']}") for split in splits for e in split.examples]
            if path else [(q, a, f"the built-in {q!r} with {len(a)} characters of answer") for q, a in LONGEST])
    for question, answer, where in rows:
        length = len(encode_example(tok, question, answer)[0]) - 1  # inputs drop the last id
        if length > config.block_size:
            raise ValueError(f"{where} is {length} tokens ({config.n_image_tokens} for the image), longer than "
                             f"block_size={config.block_size}; raise --block_size or shorten it")
    return splits


class Batches:
    """Random examples of one split, drawn with their own torch.Generator, whose state is the data position (saved in
    checkpoints, so a resumed run draws the same batches). Every data-parallel rank draws the global batch and keeps
    its slice, padded to the global batch's longest example. next() -> ((images (B, 3, S, S), ids (B, T)),
    targets (B, T)), the targets -1 except where the next token is an answer token or the <eos> after it."""

    def __init__(self, split, config, batch_size, seed, rank=0, world=1):
        self.split, self.batch_size, self.rank, self.world = split, batch_size, rank, world
        self.pad = Tokenizer(config).eos_id  # padding is never a target: any id will do
        self.generator = torch.Generator().manual_seed(seed)
        self.position = self.generator.get_state()

    def next(self):
        self.position = self.generator.get_state()  # the state that draws this batch: what a checkpoint stores
        picks = torch.randint(len(self.split), (self.batch_size * self.world,), generator=self.generator).tolist()
        rows = [self.split.encode(i) for i in picks]
        T = max(len(ids) for ids, _ in rows) - 1  # the global batch's longest: every rank has the same shapes
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        x = torch.full((self.batch_size, T), self.pad, dtype=torch.long)
        y = torch.full((self.batch_size, T), -1, dtype=torch.long)
        for r, k in enumerate(mine):
            ids, n_prompt = rows[k]
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            # position t predicts ids[t + 1]: the answer's first id is predicted at the prompt's last position
            y[r, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
        images = torch.stack([self.split.image(picks[k]) for k in mine])
        return (images, x), y

    def seek(self, position):
        """The next next() draws the batch that position drew."""
        self.generator.set_state(position)
        self.position = position


def eval_indices(split):
    return range(min(EVAL_EXAMPLES, len(split)))


@torch.no_grad()
def evaluate(model, train, val):
    """Exact-match answer accuracy (greedy, up to <eos>) on the first EVAL_EXAMPLES held-out questions: overall,
    per kind, and on the questions about colour-shape pairs never seen in training."""
    picks = list(eval_indices(val))
    examples = [val.examples[i] for i in picks]
    # decoding stops at <eos>, or after the longest true answer of the question's kind and its <eos>: an answer cut
    # there has no <eos> in time and is wrong, as it would be uncut, so the cap changes no score, only the time an
    # untrained model takes (a one-word question does not decode as long as a caption)
    got = [None] * len(picks)
    for kind in dict.fromkeys(e["kind"] for e in examples):
        rows = [r for r, e in enumerate(examples) if e["kind"] == kind]
        longest = max(len(ids) - n_prompt for ids, n_prompt in (val.encode(picks[r]) for r in rows))
        answers = answer(model, torch.stack([val.image(picks[r]) for r in rows]),
                         [examples[r]["question"] for r in rows], longest)
        for r, a in zip(rows, answers):
            got[r] = a
    right = [g.strip() == e["answer"].strip() for g, e in zip(got, examples)]
    scores = {"answer_acc": sum(right) / len(right)}
    kinds = dict.fromkeys(e["kind"] for e in examples)  # in order of appearance
    buckets = {f"answer_acc_{k}": [e["kind"] == k for e in examples] for k in kinds}
    if any(e["unseen"] for e in examples):
        buckets["answer_acc_unseen"] = [e["unseen"] for e in examples]
    for name, member in buckets.items():
        scores[name] = sum(r for r, m in zip(right, member) if m) / sum(member)
    return scores


@torch.no_grad()
def draw(model, val, path, n=16):
    """A PNG grid of n held-out images, each with its question, the model's answer and the truth (green if equal)."""
    from PIL import Image, ImageDraw
    picks = list(eval_indices(val))[:n]
    images = torch.stack([val.image(i) for i in picks])
    # decoding stops at <eos> or past what the cell shows (21 characters) and the longest true answer (+ <eos>):
    # an answer cut there shows the same text and is as wrong as uncut
    longest = max(len(ids) - n_prompt for ids, n_prompt in (val.encode(i) for i in picks))
    got = answer(model, images, [val.examples[i]["question"] for i in picks], max(longest, 22))
    cell, text_h, cols = 176, 52, min(4, len(picks))  # 176 px: 28 characters of PIL's default font per line
    rows = (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h)), "white")
    pen = ImageDraw.Draw(sheet)
    for k, i in enumerate(picks):
        e, x0, y0 = val.examples[i], (k % cols) * (cell + 8), (k // cols) * (cell + text_h)
        rgb = ((images[k].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        sheet.paste(Image.fromarray(rgb).resize((cell, cell), Image.NEAREST), (x0, y0))
        ok = got[k].strip() == e["answer"].strip()
        q = e["question"]
        cut = q.rfind(" ", 0, 28) if len(q) > 28 else len(q)  # the question on two lines, split at a space
        lines = [(q[:cut], "black"), (q[cut:].strip()[:28], "black"), (f"model: {got[k]}"[:28], (0, 140, 0) if ok else
                 (200, 0, 0)), (f"truth: {e['answer']}"[:28], "black")]
        for n, (text, colour) in enumerate(lines):
            pen.text((x0, y0 + cell + 1 + 12 * n), text, fill=colour)
    sheet.save(path)


# train.py's defaults for this file: many small steps at a moderate learning rate (trained 300 steps on colour
# questions alone, 3e-3 read 23 of 100 held-out colours right, 1e-3 45), about 10 minutes on a laptop CPU; block_size
# is train.py's key too, so it is set here
TRAIN_DEFAULTS = dict(batch_size=16, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=3000,
                      eval_interval=1000, eval_iters=10, log_interval=50, block_size=128)


# === Hugging Face interop: not needed to understand the model ===

# the vision encoder <-> transformers' SiglipVisionModel
SIGLIP_CONFIG = {"image_size": "image_size", "patch_size": "patch_size", "vision_n_layer": "num_hidden_layers",
                 "vision_n_head": "num_attention_heads", "vision_n_embd": "hidden_size",
                 "vision_intermediate_size": "intermediate_size", "vision_norm_eps": "layer_norm_eps"}
SIGLIP_NAMES = {"patch_embed.weight": "embeddings.patch_embedding.weight",
                "patch_embed.bias": "embeddings.patch_embedding.bias",
                "pos_embed": "embeddings.position_embedding.weight",
                "h.{i}.ln_1.weight": "encoder.layers.{i}.layer_norm1.weight",
                "h.{i}.ln_1.bias": "encoder.layers.{i}.layer_norm1.bias",
                **{f"h.{{i}}.attn.{p}.{w}": f"encoder.layers.{{i}}.self_attn.{p}.{w}"
                   for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")},
                "h.{i}.ln_2.weight": "encoder.layers.{i}.layer_norm2.weight",
                "h.{i}.ln_2.bias": "encoder.layers.{i}.layer_norm2.bias",
                **{f"h.{{i}}.mlp.{p}.{w}": f"encoder.layers.{{i}}.mlp.{p}.{w}" for p in ("fc1", "fc2")
                   for w in ("weight", "bias")},
                "ln_f.weight": "post_layernorm.weight",
                "ln_f.bias": "post_layernorm.bias"}
# the decoder <-> transformers' LlamaForCausalLM (llama.py's tables)
HF_CONFIG = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
             "norm_eps": "rms_norm_eps", "intermediate_size": "intermediate_size",
             "tie_word_embeddings": "tie_word_embeddings"}
HF_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight",
            "transformer.h.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
            "transformer.h.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
            "transformer.h.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
            "transformer.h.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
            "transformer.h.{i}.attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
            "transformer.h.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
            "transformer.h.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
            "transformer.h.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
            "transformer.h.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
            "transformer.ln_f.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}


def layer_names(table, n_layer):
    """A names table for every layer: gaia name -> HF name."""
    return {ours.format(i=i): theirs.format(i=i) for ours, theirs in table.items() for i in range(n_layer)}


def read_safetensors(path):
    """Every tensor of a Hugging Face directory: model.safetensors, or each shard that
    model.safetensors.index.json lists in its weight_map (large checkpoints ship as several files)."""
    from safetensors.torch import load_file
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; a Hugging Face "
                         f"checkpoint in another format (pytorch_model.bin) must be re-saved as safetensors")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def siglip_config(path):
    """A SiglipVisionModel's (or a SiglipModel's vision_config) config.json -> our Config keys."""
    hf = read_config(path)
    hf = hf.get("vision_config", hf) if hf.get("model_type") == "siglip" else hf
    if hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not a SigLIP vision encoder")
    if hf.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: gaia's vlm.py has SigLIP's tanh GELU only")
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"num_channels={hf['num_channels']}: gaia's vlm.py reads RGB images")
    hf = {"image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, **hf}  # SiglipVisionConfig's defaults
    return {ours: hf[theirs] for ours, theirs in SIGLIP_CONFIG.items() if theirs in hf}


def read_siglip(path, config):
    """The vision encoder's state dict from a SigLIP directory; the pooling head (vision_use_head) is not ours."""
    tensors = read_safetensors(path)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""  # SiglipModel, or 4.x
    names = layer_names(SIGLIP_NAMES, config.vision_n_layer)
    missing = [prefix + theirs for theirs in names.values() if prefix + theirs not in tensors]
    if missing:
        raise ValueError(f"{path} does not match SigLIP's vision layout: it lacks {missing[:3]}")
    return {ours: tensors[prefix + theirs] for ours, theirs in names.items()}


def write_siglip(encoder, path):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    c, state = encoder.config, encoder.state_dict()
    names = layer_names(SIGLIP_NAMES, c.vision_n_layer)
    save_file({theirs: state[ours].detach().float().cpu().contiguous() for ours, theirs in names.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = {theirs: getattr(c, ours) for ours, theirs in SIGLIP_CONFIG.items()}
    hf.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"], hidden_act="gelu_pytorch_tanh",
              num_channels=3, attention_dropout=0.0, vision_use_head=False, dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def llama_config(path):
    """A LlamaForCausalLM's config.json -> our decoder's Config keys (plain RoPE only)."""
    hf = read_config(path)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not a llama decoder")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{path}: gaia's vlm.py decodes with SwiGLU (silu) and no biases, as Llama")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads")
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_parameters") or hf.get("rope_scaling") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path} scales RoPE ({rope.get('rope_type', rope.get('type'))}); gaia's vlm.py has plain "
                         f"RoPE (llama.py has Llama 3's scaling)")
    hf = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **hf}
    config = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items() if hf.get(theirs) is not None}
    config.setdefault("n_kv_head", config["n_head"])
    return {**config, "rope_theta": rope["rope_theta"]}


def read_llama(path, config):
    tensors = read_safetensors(path)
    names = layer_names(HF_NAMES, config.n_layer)
    if config.tie_word_embeddings:
        names["lm_head.weight"] = names["transformer.wte.weight"]
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        raise ValueError(f"{path} does not match Llama's layout: it lacks {missing[:3]}")
    return {ours: tensors[theirs] for ours, theirs in names.items()}


def write_llama(model, path):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    c, state = model.config, model.state_dict()
    names = layer_names(HF_NAMES, c.n_layer)
    if c.tie_word_embeddings:
        del names["lm_head.weight"]
    save_file({theirs: state[ours].detach().float().cpu().contiguous() for ours, theirs in names.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items()}
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=c.head_dim, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_bias=False,
              mlp_bias=False, attention_dropout=0.0, dtype="float32", bos_token_id=None,
              eos_token_id=TOKENIZER_SIZES[c.tokenizer] + 1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def from_parts(vision=None, decoder=None, **config):
    config = {**(siglip_config(vision) if vision else {}), **(llama_config(decoder) if decoder else {}), **config}
    model = Model(Config(**config))
    state = model.state_dict()
    if vision:
        state.update({"vision." + k: v for k, v in read_siglip(vision, model.config).items()})
    if decoder:
        state.update(read_llama(decoder, model.config))
    model.load_state_dict(state)
    return model


def write_gaia(model, path):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # one tensor, stored once
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gaia_vlm", **asdict(model.config)}, f, indent=2)


def from_pretrained(path):
    hf = read_config(path)
    kind = hf.get("model_type")
    if kind in ("siglip", "siglip_vision_model"):
        return from_parts(vision=path)
    if kind == "llama":
        return from_parts(decoder=path)
    if kind != "gaia_vlm":
        raise ValueError(f"{path} holds a {kind!r} model; vlm.py loads its own save_pretrained directories, SigLIP "
                         f"vision encoders and Llama decoders")
    model = Model(Config(**{k: v for k, v in hf.items() if k != "model_type"}))
    tensors = read_safetensors(path)
    if model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors)
    return model
