"""
I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture"), in one file.

Learn image features without labels and without pixel reconstruction: from one large visible block of an
image (the context), predict the *features* of a few other blocks (the targets), where the target features
come from a slowly moving copy of the encoder itself. The nearest gaia model is gpt2.py; the differences:
- the input is an image cut into patches (a strided Conv2d), not text: no vocabulary, no head, no sampling;
- a ViT encoder with fixed 2-D sin-cos positions and no causal mask: every patch attends to every patch;
- three networks: the context `encoder` (trained), a narrow `predictor` ViT (trained) that turns context tokens
  plus position-carrying mask tokens into predictions, and the `target_encoder`, a copy of the encoder that is
  never trained by gradients but follows it as an exponential moving average (after_optimizer_step);
- the loss is a smooth L1 between predicted and (layer-normed) target features at the target patches;
- the masks are drawn per batch by sample_masks (the reference's multi-block MaskCollator);
- it comes with its own data (load_splits, Batches: images and masks) and its own evaluation (a linear probe on
  frozen features), since next-token loss means nothing here.
Loads and saves the Hugging Face IJepaModel layout (the released I-JEPA weights are the target encoder).
Reference code: github.com/facebookresearch/ijepa (src/models/vision_transformer.py, src/masks/multiblock.py).
"""
import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    img_size: int = 32            # images are img_size x img_size (load_splits resizes them to it)
    patch_size: int = 4           # a patch is patch_size x patch_size pixels: an 8 x 8 grid of 64 patches by default
    in_chans: int = 3
    n_embd: int = 128             # encoder width (embed_dim in the reference)
    n_layer: int = 6              # encoder depth
    n_head: int = 4
    mlp_ratio: float = 4.0        # MLP hidden width = mlp_ratio * width
    qkv_bias: bool = True
    norm_eps: float = 1e-6        # LayerNorm's epsilon (the reference's partial(nn.LayerNorm, eps=1e-6))
    pred_n_embd: int = 64         # predictor width (predictor_embed_dim): narrower than the encoder, a bottleneck
    pred_n_layer: int = 3
    pred_n_head: int = 4
    ema_start: float = 0.996      # target encoder momentum, rising linearly to ema_end over the run
    ema_end: float = 1.0
    n_targets: int = 4            # target blocks per image (npred)
    target_scale: tuple[float, float] = (0.15, 0.2)   # a target block covers this fraction of the patches
    target_aspect: tuple[float, float] = (0.75, 1.5)  # and has this height / width
    context_scale: tuple[float, float] = (0.85, 1.0)  # the context block (square) covers this fraction, before
    min_keep: int = 4             # the targets are cut out of it; every block keeps more than min_keep patches

    def __post_init__(self):
        for key in ("img_size", "patch_size", "in_chans", "n_embd", "n_layer", "n_head", "pred_n_embd",
                    "pred_n_layer", "pred_n_head", "n_targets"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be an integer >= 1")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; choose "
                             f"e.g. --img_size={max(1, self.img_size // self.patch_size) * self.patch_size}")
        if self.img_size // self.patch_size < 2:
            raise ValueError(f"patch_size={self.patch_size} leaves a {self.grid} x {self.grid} grid of patches; "
                             f"I-JEPA needs at least 2 x 2 to hide blocks (e.g. --patch_size={self.img_size // 4 or 1})")
        for width, heads in (("n_embd", "n_head"), ("pred_n_embd", "pred_n_head")):
            w, h = getattr(self, width), getattr(self, heads)
            if w % h:
                raise ValueError(f"{width}={w} is not divisible by {heads}={h}; choose {width} as a multiple of "
                                 f"{heads} (e.g. --{width}={max(1, w // h) * h})")
            if w % 4:  # the 2-D sin-cos positions give a quarter of the width to each of sin/cos of row/column
                raise ValueError(f"{width}={w} must be a multiple of 4 (2-D sin-cos positions); "
                                 f"e.g. --{width}={max(4, w - w % 4)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0; e.g. --mlp_ratio=4")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias={self.qkv_bias!r} must be True or False")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0; e.g. --norm_eps=1e-6")
        if not 0 <= self.ema_start <= self.ema_end <= 1:
            raise ValueError(f"ema_start={self.ema_start} and ema_end={self.ema_end} must satisfy "
                             f"0 <= ema_start <= ema_end <= 1; e.g. --ema_start=0.996 --ema_end=1.0")
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise ValueError(f"min_keep={self.min_keep!r} must be an integer >= 0")
        for key, upper in (("target_scale", 1), ("target_aspect", None), ("context_scale", 1)):
            value = getattr(self, key)
            if isinstance(value, list):  # a checkpoint or a JSON config stores the pair as a list
                value = tuple(value)
                setattr(self, key, value)
            ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
                  and 0 < value[0] <= value[1] and (upper is None or value[1] <= upper))
            if not ok:
                bound = "0 < low <= high <= 1" if upper else "0 < low <= high"
                raise ValueError(f"{key}={value!r} must be a pair (low, high) with {bound}; "
                                 f"e.g. --{key}='{Config.__dataclass_fields__[key].default}'")
        # a block must keep more than min_keep patches, or sample_masks would retry forever (as the reference)
        for key, aspect in (("target_scale", self.target_aspect), ("context_scale", (1.0, 1.0))):
            h, w = min((block_size(u / 100, getattr(self, key), aspect, self.grid) for u in range(101)),
                       key=lambda hw: hw[0] * hw[1])
            if h * w <= self.min_keep:
                raise ValueError(f"{key}={getattr(self, key)} can give a {h} x {w} block of the {self.grid} x "
                                 f"{self.grid} patch grid, not more than min_keep={self.min_keep} patches; raise "
                                 f"{key}, use smaller patches, or lower --min_keep")

    @property
    def grid(self):
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def n_patches(self):
        return self.grid ** 2


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions, (grid * grid, dim), row-major over the patch grid, as the reference's
    get_2d_sincos_pos_embed: the first half of the channels encodes the column (the reference's "w goes first"),
    the second half the row; within each half, sin(pos * omega) then cos(pos * omega), omega_i = 10000^(-i / (dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one_axis(pos):  # (grid * grid,) -> (grid * grid, dim/2)
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(cols), one_axis(rows)], axis=1)).float()


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no causal mask), q, k, v from one fused Linear as the reference."""

    def __init__(self, dim, n_head, config):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)  # rows: [q; k; v], each head after head
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v, every token sees every token
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim, config):
        super().__init__()
        hidden = round(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU, as the reference's nn.GELU


class Block(nn.Module):
    """A pre-norm ViT block, as gpt2.py's without the causal mask."""

    def __init__(self, dim, n_head, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, n_head, config)
        self.ln_2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = MLP(dim, config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def gather_tokens(x, idx):
    """x (B, N, C) at patch indices idx (B, K) -> (B, K, C): the reference's apply_masks for one mask."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):
    """The ViT: patches -> tokens + positions -> [keep only some tokens] -> blocks -> final norm."""

    def __init__(self, config):
        super().__init__()
        self.patch_embed = nn.Conv2d(config.in_chans, config.n_embd, config.patch_size, stride=config.patch_size)
        # persistent although fixed: a loaded checkpoint brings its own (Hugging Face stores them as a parameter)
        self.register_buffer("pos_embed", sincos_pos_embed(config.n_embd, config.grid).unsqueeze(0))  # (1, N, C)
        self.h = nn.ModuleList([Block(config.n_embd, config.n_head, config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps)

    def forward(self, images, keep=None):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, C, grid, grid) -> (B, N, C), row-major
        x = x + self.pos_embed
        if keep is not None:  # after the positions, so each kept token still knows where it was
            x = gather_tokens(x, keep)  # (B, K, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class Predictor(nn.Module):
    """A narrow ViT: given the context tokens and, for one target block, one mask token per target patch (the
    same learned vector plus that patch's position), it predicts the target encoder's features there."""

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Linear(config.n_embd, config.pred_n_embd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.pred_n_embd))
        self.register_buffer("pos_embed", sincos_pos_embed(config.pred_n_embd, config.grid).unsqueeze(0),
                             persistent=False)  # (1, N, P): always this function of the config
        self.h = nn.ModuleList([Block(config.pred_n_embd, config.pred_n_head, config)
                                for _ in range(config.pred_n_layer)])
        self.ln_f = nn.LayerNorm(config.pred_n_embd, eps=config.norm_eps)
        self.proj = nn.Linear(config.pred_n_embd, config.n_embd)

    def forward(self, ctx, context, targets):
        """ctx (B, K_ctx, C): the encoder's output at patches context (B, K_ctx); targets (n_targets, B, K_tgt)
        -> predictions (n_targets, B, K_tgt, C)."""
        n_t, B, K_tgt = targets.shape
        K_ctx = ctx.shape[1]
        pos = self.pos_embed.expand(B, -1, -1)  # (B, N, P)
        x = self.embed(ctx) + gather_tokens(pos, context)  # (B, K_ctx, P)
        # one sequence per (target block, image), as the reference: the context repeated per target block
        x = x.repeat(n_t, 1, 1)  # (n_t * B, K_ctx, P), row j * B + b = block j of image b
        queries = self.mask_token + gather_tokens(pos.repeat(n_t, 1, 1), targets.reshape(n_t * B, K_tgt))
        x = torch.cat([x, queries], dim=1)  # (n_t * B, K_ctx + K_tgt, P)
        for block in self.h:
            x = block(x)
        x = self.proj(self.ln_f(x[:, K_ctx:]))  # the mask tokens' outputs only, (n_t * B, K_tgt, C)
        return x.view(n_t, B, K_tgt, -1)


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.predictor = Predictor(config)
        self.apply(self._init_weights)
        w = self.encoder.patch_embed.weight  # as a Linear (out, in_chans * patch^2), MAE's init: see the table
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.trunc_normal_(self.predictor.mask_token, std=0.02)
        for blocks in (self.encoder.h, self.predictor.h):  # the reference's fix_init_weight
            for layer_id, block in enumerate(blocks, start=1):
                with torch.no_grad():
                    block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                    block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        # the target encoder starts as an exact copy and is never trained by gradients, only by the EMA
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self._target_std = None  # the collapse watch, set by each training forward (metrics())

    def _init_weights(self, module):
        """The reference's init (src/models/vision_transformer.py), except for patch_embed:
        | tensor                                                | init                                          |
        | Linear weights (qkv, proj, fc1, fc2, embed)           | trunc_normal(0, 0.02), cut at +-2 (absolute)  |
        | attn.proj and mlp.fc2 weights of block layer_id (1..)  | the same, then / sqrt(2 * layer_id), after    |
        | encoder.patch_embed weight, as an (n_embd, 3 * p * p)  | xavier_uniform, after                         |
        | Linear and Conv2d biases                              | 0                                             |
        | LayerNorm weight, bias                                | 1, 0                                          |
        | predictor.mask_token                                  | trunc_normal(0, 0.02), after                  |
        | encoder.pos_embed, predictor.pos_embed                | fixed 2-D sin-cos (buffers, not trained)      |
        | target_encoder                                        | an exact copy of the encoder, after           |
        patch_embed: the reference's trunc_normal(0.02) gives a 14 x 14 x 3 patch (588 inputs) a content signal of
        about 0.5 per channel beside sin-cos positions of 0.7; a 4 x 4 x 3 patch (48 inputs) gets 0.08, the targets are
        then almost only their positions, which the predictor can tell without looking, and training collapses to
        them (tried: target_std falls from 0.08 to 0.03 and the probe stays at chance). MAE's xavier init restores
        the reference's balance (about 0.4)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images, masks=None):
        """images (B, in_chans, img_size, img_size) float; masks = (context (B, K_ctx), targets (n_targets, B, K_tgt))
        patch indices, from sample_masks. Returns (predictions (n_targets, B, K_tgt, n_embd), loss); without masks
        (encode(images), None)."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"images of shape {tuple(images.shape)}; this model takes (B, {c.in_chans}, "
                             f"{c.img_size}, {c.img_size}) (in_chans, img_size)")
        if masks is None:
            return self.encode(images), None
        context, targets = masks
        with torch.no_grad():  # the targets: layer-normed features of the whole image from the EMA encoder
            h = F.layer_norm(self.target_encoder(images), (c.n_embd,))  # (B, N, C), no affine: as the reference
            if self.training:  # the collapse watch follows the training batches, not the eval ones
                self._target_std = h.mean(1).std(0, correction=0).mean()  # per-dim spread over the batch
            target = h[torch.arange(h.shape[0], device=h.device)[:, None], targets]  # (n_targets, B, K_tgt, C)
        pred = self.predictor(self.encoder(images, context), context, targets)  # (n_targets, B, K_tgt, C)
        return pred, F.smooth_l1_loss(pred, target)

    def encode(self, images):
        """The image's features, (B, N, n_embd): the target (EMA) encoder's last hidden state after its final norm.
        This is what the released I-JEPA weights are, and what save_pretrained writes."""
        return self.target_encoder(images)

    @torch.no_grad()
    def after_optimizer_step(self, step, total_steps):
        """The EMA of the target encoder, after optimizer step `step` (1-based) of total_steps: momentum
        m = ema_start + (ema_end - ema_start) * step / total_steps, and target = m * target + (1 - m) * online."""
        c = self.config
        m = c.ema_start + (c.ema_end - c.ema_start) * min(step, total_steps) / max(total_steps, 1)
        target, online = list(self.target_encoder.parameters()), list(self.encoder.parameters())
        torch._foreach_lerp_(target, online, 1.0 - m)  # target + (1 - m) (online - target)

    def metrics(self):
        """The collapse watch: target_std, the per-dimension standard deviation across the batch of the
        layer-normed, mean-pooled target features of the last training forward, averaged over dimensions. It
        falls towards 0 when every image gets the same features (the collapse an EMA target and a narrow
        predictor are there to prevent)."""
        return {} if self._target_std is None else {"target_std": float(self._target_std)}

    def num_params(self):
        """Trained parameters: the encoder and the predictor (the target encoder is their moving average)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_sample(self, n_context=None, n_target=None):
        """Training FLOPs per image, counting the matmuls (2 per multiply-add) and nothing else (norms, softmax,
        GELU, the gathers are small): forward + backward (3x the forward) of the encoder on the n_context context
        tokens and of the predictor on its n_targets sequences of n_context + n_target tokens; forward only of the
        target encoder on all N patches. The patch embedding runs on all N patches and needs no input gradient:
        forward + weight gradient, 2x. Attention's QK^T and AV cost 4 * T^2 * width per layer forward (T tokens).
        Without token counts, the expected ones: the mean target block over the block-size draws, and the mean
        context block times the chance (1 - K_tgt / N)^n_targets that a patch lies outside all targets: an upper
        estimate, since sample_masks cuts every context to the batch's shortest (about half of it at batch 64)."""
        c = self.config
        N, C, P = c.n_patches, c.n_embd, c.pred_n_embd
        if n_context is None or n_target is None:
            tgt = np.mean([np.prod(block_size(u / 1000, c.target_scale, c.target_aspect, c.grid)) for u in range(1001)])
            ctx = np.mean([np.prod(block_size(u / 1000, c.context_scale, (1, 1), c.grid)) for u in range(1001)])
            n_target = tgt if n_target is None else n_target
            n_context = ctx * (1 - tgt / N) ** c.n_targets if n_context is None else n_context
        hidden = lambda d: round(d * c.mlp_ratio)  # noqa: E731
        block = lambda d: 4 * d * d + 2 * d * hidden(d)  # noqa: E731  (qkv, proj, fc1, fc2 weights)
        patch = 2 * c.in_chans * c.patch_size ** 2 * C * N  # the patch embedding's forward, all N patches
        encoder = 6 * c.n_layer * (block(C) * n_context + 2 * n_context ** 2 * C) + 2 * patch
        target = 2 * c.n_layer * (block(C) * N + 2 * N ** 2 * C) + patch
        T = n_context + n_target  # each predictor sequence
        predictor = 6 * (C * P * n_context + c.n_targets * (
            c.pred_n_layer * (block(P) * T + 2 * T ** 2 * P) + P * C * n_target))
        return float(encoder + target + predictor)

    @classmethod
    def from_pretrained(cls, path):
        """A local Hugging Face IJepaModel directory (config.json + safetensors, sharded or not) into both encoders;
        the predictor is new. Interop below the fence."""
        return from_hf(path)

    def save_pretrained(self, path):
        """The target encoder as a Hugging Face IJepaModel directory."""
        to_hf(self, path)


# ---------------------------------------------------------------- masks: the reference's multi-block sampler

def block_size(u, scale, aspect, grid):
    """The reference's _sample_block_size given its one uniform draw u in [0, 1] (one draw for both the scale and
    the aspect ratio, so large blocks are also the tall ones): a block of int(N * scale) patches, height / width =
    aspect, each side rounded to the nearest integer and kept below the grid size. Returns (h, w)."""
    area = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))  # max_keep in the reference
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = round(math.sqrt(area * ratio))
    w = round(math.sqrt(area / ratio))
    return min(h, grid - 1), min(w, grid - 1)


def sample_block(h, w, grid, min_keep, generator, avoid=()):
    """A random h x w block of the grid (a bool (grid, grid) mask) minus the regions of `avoid`, redrawn until
    it keeps more than min_keep patches. The reference's tolerance: after every 20 failed draws, one more of the
    regions to avoid is given up, the last first. Unlike the reference, whose top-left corner is drawn from
    [0, grid - h) and so never touches the last row or column (nor does its context, always at the top left
    when it is grid - 1 wide), the corner is drawn from [0, grid - h]: on an 8 x 8 grid that row and column are
    an eighth of the image each."""
    tries, timeout = 0, 20
    while True:
        top = int(torch.randint(0, grid - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (1,), generator=generator))
        mask = torch.zeros(grid, grid, dtype=torch.bool)
        mask[top:top + h, left:left + w] = True
        for region in avoid[:max(len(avoid) - tries, 0)]:
            mask &= ~region
        if mask.sum() > min_keep:
            return mask
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, 20


def sample_masks(config, batch_size, generator):
    """The reference's MaskCollator (multi-block masking) for one batch, every draw from `generator`:
    one target block size for the batch (target_scale, target_aspect) and one context block size (context_scale,
    square); per image n_targets target blocks at random places, then one context block at a random place with
    every target block cut out of it (allow_overlap=False), so the encoder never sees what it must predict.
    Every mask is truncated to the shortest in the batch (row-major order), so the batch is one tensor.
    Returns (context (B, K_ctx), targets (n_targets, B, K_tgt)), int64 patch indices, row-major."""
    c, grid = config, config.grid
    t_h, t_w = block_size(float(torch.rand(1, generator=generator)), c.target_scale, c.target_aspect, grid)
    c_h, c_w = block_size(float(torch.rand(1, generator=generator)), c.context_scale, (1.0, 1.0), grid)
    contexts, targets = [], []
    for _ in range(batch_size):
        blocks = [sample_block(t_h, t_w, grid, c.min_keep, generator) for _ in range(c.n_targets)]
        context = sample_block(c_h, c_w, grid, c.min_keep, generator, avoid=blocks)
        targets.append([b.flatten().nonzero().squeeze(1) for b in blocks])
        contexts.append(context.flatten().nonzero().squeeze(1))
    k_ctx = min(len(m) for m in contexts)
    k_tgt = min(len(m) for ms in targets for m in ms)
    context = torch.stack([m[:k_ctx] for m in contexts])  # (B, K_ctx)
    target = torch.stack([torch.stack([ms[j][:k_tgt] for ms in targets]) for j in range(c.n_targets)])
    return context, target  # (n_targets, B, K_tgt)


# ---------------------------------------------------------------- data: built-in shapes or a folder of images

@dataclass
class ImageSplit:
    images: torch.Tensor        # (N, img_size, img_size, 3) uint8
    labels: torch.Tensor | None  # (N,) int64, or None for a flat folder (no classes)
    classes: list

    def __len__(self):
        return len(self.images)


SHAPES = ("circle", "ring", "square", "diamond", "triangle", "cross", "star", "crescent")
BUILTIN = dict(version=2, n_train=6000, n_val=1200, train_seed=1, val_seed=2)  # the built-in data's parameters


def render_shapes(n, size, seed):
    """n images (n, size, size, 3) uint8 of one shape each, and their labels (n,) (indices into SHAPES): a light
    shape of random tint, size, position and tilt on a dark textured background of random
    tint: one of four patterns (flat, stripes, a gradient, a checkerboard) in two nearby colours, over a mosaic of
    8 x 8 tiles each shifted by its own random colour, plus pixel noise. The tints are mild beside the light/dark
    contrast, so colour does not drown the shape; the tiles make the background of a hidden block unpredictable
    from the rest of the image, so what one block tells about another is mostly the shape. Deterministic in seed;
    numpy only."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    images = np.empty((n, size, size, 3), np.uint8)
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size  # pixel centres in (0, 1)
    tile = np.arange(size) * 8 // size  # each pixel's tile row (and column): an 8 x 8 mosaic
    for start in range(0, n, 500):  # vectorized over 500 images at a time (bounded memory)
        lab = labels[start:start + 500]
        m = len(lab)
        p = lambda *shape: rng.random((m,) + shape, dtype=np.float32)  # noqa: E731  (uniform [0, 1), per image)
        tint = lambda lo, hi: lo + (hi - lo) * p(1, 1, 1) + 0.3 * (p(1, 1, 3) - 0.5)  # noqa: E731  (a grey level, tinted)
        # background: t in [0, 1] per pixel mixes two colours
        kind, angle = rng.integers(0, 4, m)[:, None, None], p(1, 1) * np.pi
        along = x * np.cos(angle) + y * np.sin(angle)  # (m, size, size)
        freq = 2 + 4 * p(1, 1)
        t = np.select([kind == 0, kind == 1, kind == 2],
                      [np.zeros_like(along), np.sin(2 * np.pi * freq * along) > 0,
                       (along - along.min((1, 2), keepdims=True)) / np.ptp(along, (1, 2), keepdims=True)],
                      (np.sin(np.pi * freq * x) * np.sin(np.pi * freq * y)) > 0)
        c1 = np.clip(tint(0.1, 0.35), 0, 1)  # dark
        c2 = np.clip(c1 + 0.5 * (p(1, 1, 3) - 0.5), 0, 1)  # a second colour near the first
        tiles = 0.6 * (p(8, 8, 3) - 0.5)
        background = c1 + t[..., None] * (c2 - c1) + tiles[:, tile][:, :, tile]
        # the shape, in its own frame: (u, v) = the pixel relative to the centre, rotated by -theta, / radius
        r = 0.36 + 0.09 * p(1, 1)
        cx, cy = r + (1 - 2 * r) * p(1, 1), r + (1 - 2 * r) * p(1, 1)
        # every shape stands upright, tilted by up to 15 degrees (a square turned 45 degrees is the diamond)
        theta = (p(1, 1) - 0.5) * np.pi / 6 + np.where(lab == SHAPES.index("diamond"), np.pi / 4, 0)[:, None, None]
        dx, dy = x - cx, y - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / r
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        inside = {
            "circle": rho <= 1,
            "ring": (rho <= 1) & (rho >= 0.55),
            "square": np.maximum(abs(u), abs(v)) <= 0.8,
            "diamond": np.maximum(abs(u), abs(v)) <= 0.8,
            "triangle": rho * np.cos(np.mod(phi, 2 * np.pi / 3) - np.pi / 3) <= 0.6,  # equilateral, circumradius 1.2
            "cross": ((abs(u) <= 0.3) & (abs(v) <= 1)) | ((abs(v) <= 0.3) & (abs(u) <= 1)),
            "star": rho <= 0.4 + 0.65 * ((1 + np.cos(5 * phi)) / 2) ** 2,
            "crescent": (rho <= 1) & ((u - 0.45) ** 2 + v ** 2 > 0.75 ** 2),
        }
        mask = np.select([lab[:, None, None] == i for i in range(len(SHAPES))], [inside[s] for s in SHAPES])
        colour = tint(0.65, 0.95)  # light
        out = np.where(mask[..., None], colour, background)
        out = out + rng.normal(0, 1, out.shape).astype(np.float32) * (0.06 * p(1, 1, 1))
        images[start:start + m] = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, labels


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
VAL_FRACTION, VAL_SEED = 0.15, 1234  # a folder's held-out share, drawn with its own seed (not the training seed)


def load_splits(path, config, cache_dir=None):
    """(train, val) ImageSplits at config.img_size. path "": the built-in shapes (6000 train, 1200 val, 8 classes,
    generated with fixed seeds). Otherwise a folder of PNG/JPEG images: class subfolders (labels by folder name,
    sorted) or one flat folder (labels None); 15% of each class (or of the flat folder) is held out for val by a
    fixed seed. A folder's decoded images are cached in cache_dir, keyed by its files, their sizes and times."""
    if path == "":
        train = render_shapes(BUILTIN["n_train"], config.img_size, BUILTIN["train_seed"])
        val = render_shapes(BUILTIN["n_val"], config.img_size, BUILTIN["val_seed"])
        return tuple(ImageSplit(torch.from_numpy(im), torch.from_numpy(lab).long(), list(SHAPES))
                     for im, lab in (train, val))
    if not os.path.exists(path):
        raise ValueError(f"--data={path} does not exist; give a folder of PNG/JPEG images (or --data= for the "
                         f"built-in shapes)")
    if not os.path.isdir(path):
        raise ValueError(f"--data={path} is a file; give the folder that holds the images (class subfolders or flat)")
    is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")  # noqa: E731
    loose = sorted(f for f in os.listdir(path) if is_image(f) and os.path.isfile(os.path.join(path, f)))
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                     and any(is_image(f) for f in os.listdir(os.path.join(path, d))))
    if classes and loose:
        raise ValueError(f"{path} has both images ({loose[0]}, ...) and class subfolders ({classes[0]}, ...); put every "
                         f"image in a class subfolder, or all of them in one flat folder")
    if not classes and not loose:
        raise ValueError(f"{path} holds no PNG/JPEG images (.png, .jpg, .jpeg), neither directly nor in class subfolders")
    if len(classes) == 1:
        raise ValueError(f"{path} has one class subfolder ({classes[0]}); a probe needs two or more classes, or put the "
                         f"images in one flat folder (unlabelled)")
    if classes:
        files = [(os.path.join(path, d, f), i) for i, d in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(path, d))) if is_image(f)]
    else:
        files = [(os.path.join(path, f), 0) for f in loose]
    key = hashlib.sha256(json.dumps([config.img_size, VAL_FRACTION, VAL_SEED] + [
        (f, os.path.getsize(f), os.path.getmtime(f)) for f, _ in files]).encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"jepa_images_{key}.npz") if cache_dir else None
    if cached and os.path.exists(cached):
        images = np.load(cached)["images"]
    else:
        images = np.stack([read_image(f, config.img_size) for f, _ in files])
        if cached:
            os.makedirs(cache_dir, exist_ok=True)
            np.savez(cached + ".tmp.npz", images=images)
            os.replace(cached + ".tmp.npz", cached)
    labels = np.array([label for _, label in files])
    # the val split: a seeded VAL_FRACTION of each class (at least one image of a class of two or more)
    rng, is_val = np.random.default_rng(VAL_SEED), np.zeros(len(files), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = max(1, round(VAL_FRACTION * len(members))) if len(members) >= 2 else 0
        is_val[rng.permutation(members)[:n_val]] = True
    names = classes or []
    split = lambda sel: ImageSplit(torch.from_numpy(images[sel]),  # noqa: E731
                                   torch.from_numpy(labels[sel]).long() if classes else None, names)
    return split(~is_val), split(is_val)


def read_image(file, size):
    """A PNG/JPEG as (size, size, 3) uint8 RGB: its shorter side resized to size (bicubic), then the centre crop."""
    from PIL import Image
    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as e:  # Pillow raises several types for a damaged or foreign file
        raise ValueError(f"cannot read image {file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                         f"remove or replace the file") from None


def to_input(images):
    """uint8 images (B, H, W, 3) -> the model's input (B, 3, H, W) float32, each channel mapped to [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Batches:
    """Training batches (images (batch_size, 3, H, W) float32, masks) from one split, every draw from one
    torch.Generator(seed): the image indices, a horizontal flip per image, and the masks. Each data-parallel rank
    draws the whole global batch (batch_size * world images and their masks, so the masks are truncated over the
    global batch) and keeps its rows: 2 ranks x batch 8 see exactly what 1 process with batch 16 sees.
    position is the generator state that drew the last batch; seek(position) makes the next next() redraw it."""

    def __init__(self, split, config, batch_size, seed, rank=0, world=1):
        self.split, self.config, self.batch_size, self.rank, self.world = split, config, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.position = self.generator.get_state()

    def next(self):
        self.position = self.generator.get_state()
        g, n, total = self.generator, len(self.split), self.batch_size * self.world
        idx = torch.randperm(n, generator=g)[:total] if n >= total else torch.randint(0, n, (total,), generator=g)
        flip = torch.rand(total, generator=g) < 0.5
        context, targets = sample_masks(self.config, total, g)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        images = self.split.images[idx[rows]]  # (B, H, W, 3)
        images = torch.where(flip[rows, None, None, None], images.flip(2), images)
        return to_input(images), (context[rows], targets[:, rows])

    def seek(self, position):
        self.generator.set_state(position)


# ---------------------------------------------------------------- evaluation: a linear probe on frozen features

# train.py's keys for `python train.py --model=jepa` (config files and --key=value still override): the reference's
# AdamW (betas 0.9, 0.999; weight decay 0.04), and a batch of 64 images (the reference: 2048) for a CPU. The learning
# rate matters most at this batch: at 1e-3 the target features drift towards one vector shared by every patch of
# every image (93% of their layer-normed energy after 300 iterations, 44% at init) and the probe stalls at 0.50,
# falling when trained longer; 5e-4 ends at 0.50 too, 1e-4 learns too slowly (0.41 at 300); 3e-4 climbs for 600.
# train.py's beta2 of 0.95 (a language model's) left the probe seed-dependent at 3e-4 (0.61 or 0.49 by the seed),
# the reference's 0.999 gave 0.58 for the worse seed. A deeper predictor (6 or 2 layers against 3) did not help.
TRAIN_DEFAULTS = dict(batch_size=64, learning_rate=3e-4, min_lr=1e-5, beta2=0.999, weight_decay=0.04,
                      warmup_iters=40, max_iters=600, eval_interval=100, eval_iters=5, log_interval=20)

PROBE_TRAIN = 2000  # the probe is fit on this many training images (a fixed subset), scored on all of val
_random_probe = {}  # probe_acc_random, computed once per (config, splits)


@torch.no_grad()
def features(model, split, batch=250):
    """Mean-pooled encode() features (N, n_embd) in fp32 of the split's images, on the model's device."""
    device = next(model.parameters()).device
    out = [model.encode(to_input(split.images[i:i + batch]).to(device)).float().mean(1)
           for i in range(0, len(split), batch)]
    return torch.cat(out)


def linear_probe(train_x, train_y, val_x, val_y, weight_decay=1e-3, steps=100):
    """Accuracy on (val_x, val_y) of a multinomial logistic regression fit on (train_x, train_y): features
    standardized with the train statistics, full-batch L-BFGS from zero weights (deterministic), an L2 penalty
    weight_decay * |W|^2."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    W = torch.zeros(train_x.shape[1], n_classes, device=train_x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=train_x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ W + b, train_y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # evaluate may be called under no_grad
        opt.step(closure)
    with torch.no_grad():
        return float(((val_x @ W + b).argmax(1) == val_y).float().mean())


def evaluate(model, train, val):
    """{"probe_acc", "probe_acc_random"}: linear-probe accuracy on val of mean-pooled encode() features, for this
    model and for a randomly initialised one of the same shape (fixed seed, computed once): the gap is what the
    self-supervised training taught. {} when the splits have no labels."""
    if train.labels is None or val.labels is None:
        return {}
    device = next(model.parameters()).device
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:PROBE_TRAIN]
    fit = ImageSplit(train.images[subset], train.labels[subset], train.classes)
    y_fit, y_val = fit.labels.to(device), val.labels.to(device)

    def accuracy(m):
        return linear_probe(features(m, fit), y_fit, features(m, val), y_val)

    key = (repr(asdict(model.config)), len(train), len(val), int(train.images[:64].sum()), int(val.images[:64].sum()),
           str(device))
    if key not in _random_probe:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            torch.manual_seed(0)
            random_model = Model(model.config).to(device)
        _random_probe[key] = accuracy(random_model)
    return {"probe_acc": accuracy(model), "probe_acc_random": _random_probe[key]}


def draw(model, val, path, n=8):
    """A PNG of n val images with masks from sample_masks (a fixed generator): the context patches as they are,
    the rest darkened, and each target block outlined in its own colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    c = model.config
    n = min(n, len(val))
    context, targets = sample_masks(c, n, torch.Generator().manual_seed(0))
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, n, figsize=(2 * n, 2.6), squeeze=False)
    for b, ax in enumerate(axes[0]):
        seen = torch.zeros(c.n_patches, dtype=torch.bool)
        seen[context[b]] = True
        shade = (~seen).view(c.grid, c.grid).repeat_interleave(c.patch_size, 0).repeat_interleave(c.patch_size, 1)
        image = val.images[b].float() / 255
        image = torch.where(shade[..., None], 0.3 * image, image)  # darken what the encoder does not see
        ax.imshow(image.numpy(), interpolation="nearest")
        for j in range(c.n_targets):
            rows, cols = targets[j, b] // c.grid, targets[j, b] % c.grid
            top, left = int(rows.min()), int(cols.min())
            ax.add_patch(Rectangle((left * c.patch_size - 0.5, top * c.patch_size - 0.5),
                                   (int(cols.max()) - left + 1) * c.patch_size, (int(rows.max()) - top + 1) * c.patch_size,
                                   fill=False, edgecolor=colours[j % 10], linewidth=2))
        ax.set_title(val.classes[int(val.labels[b])] if val.labels is not None else f"val {b}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"I-JEPA masks: bright = context (the encoder's input), dark = hidden; "
                 f"boxes = the {c.n_targets} target blocks whose features the predictor predicts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# === Hugging Face interop: not needed to understand the model ===

HF_CONFIG = {"img_size": "image_size", "patch_size": "patch_size", "in_chans": "num_channels", "n_embd": "hidden_size",
             "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "norm_eps": "layer_norm_eps",
             "qkv_bias": "qkv_bias"}
# and: mlp_ratio = intermediate_size / hidden_size; the predictor and the masking keys are not in a Hugging Face
# checkpoint (it holds the target encoder only): they keep gaia's defaults. Dropout rates load as 0 (no dropout here).

# encoder parameter -> Hugging Face tensor name (the layout transformers writes, and the released checkpoints use);
# a tuple is concatenated along dim 0: the reference's fused qkv is HF's query, key, value stacked, in that order
QKV = ("query", "key", "value")
HF_NAMES = {
    "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
    "pos_embed": "embeddings.position_embeddings",
    "h.{i}.ln_1.weight": "encoder.layer.{i}.layernorm_before.weight",
    "h.{i}.ln_1.bias": "encoder.layer.{i}.layernorm_before.bias",
    "h.{i}.attn.qkv.weight": tuple(f"encoder.layer.{{i}}.attention.attention.{x}.weight" for x in QKV),
    "h.{i}.attn.qkv.bias": tuple(f"encoder.layer.{{i}}.attention.attention.{x}.bias" for x in QKV),
    "h.{i}.attn.proj.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "h.{i}.attn.proj.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "h.{i}.ln_2.weight": "encoder.layer.{i}.layernorm_after.weight",
    "h.{i}.ln_2.bias": "encoder.layer.{i}.layernorm_after.bias",
    "h.{i}.mlp.fc1.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "h.{i}.mlp.fc1.bias": "encoder.layer.{i}.intermediate.dense.bias",
    "h.{i}.mlp.fc2.weight": "encoder.layer.{i}.output.dense.weight",
    "h.{i}.mlp.fc2.bias": "encoder.layer.{i}.output.dense.bias",
    "ln_f.weight": "layernorm.weight",
    "ln_f.bias": "layernorm.bias",
}
GAIA_FILES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "moe", "qwen3_moe": "moe", "mamba": "mamba",
              "mamba2": "mamba", "deepseek_v3": "mla"}


def hf_names(config):
    """HF_NAMES for every layer of this config (without the qkv bias when qkv_bias=False)."""
    names = {}
    for ours, theirs in HF_NAMES.items():
        if ours == "h.{i}.attn.qkv.bias" and not config.qkv_bias:
            continue
        for i in range(config.n_layer if "{i}" in ours else 1):
            fill = lambda name: name.format(i=i)  # noqa: E731
            names[fill(ours)] = tuple(map(fill, theirs)) if isinstance(theirs, tuple) else fill(theirs)
    return names


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


def square(hf, key):
    """An HF size that may be an int or an [h, w] pair; gaia's model is square."""
    value = hf.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}={value} is not square; gaia's jepa.py supports square images and patches only")
        value = value[0]
    return value


def from_hf(path):
    """A Model whose encoder and target encoder hold a local Hugging Face IJepaModel directory's weights."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    t = hf.get("model_type", "ijepa")
    if t != "ijepa":
        fix = f"--model={GAIA_FILES[t]}" if t in GAIA_FILES else "an IJepaModel checkpoint"
        raise ValueError(f"{path} holds a {t!r} model, not ijepa; use {fix}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not the exact GELU; gaia's jepa.py supports 'gelu' only")
    # IJepaConfig's defaults where a config.json leaves a key out
    hf = {"image_size": 224, "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-12, "qkv_bias": True, **hf}
    hf["image_size"], hf["patch_size"] = square(hf, "image_size"), square(hf, "patch_size")
    if hf["image_size"] % hf["patch_size"]:
        raise ValueError(f"image_size={hf['image_size']} is not a multiple of patch_size={hf['patch_size']} (Hugging "
                         f"Face drops the remainder); gaia's jepa.py needs whole patches")
    config = {ours: hf[theirs] for ours, theirs in HF_CONFIG.items()}
    config["mlp_ratio"] = hf["intermediate_size"] / hf["hidden_size"]
    # a coarse grid (small images in large patches) can make the default blocks too small for min_keep: lower it
    grid = hf["image_size"] // hf["patch_size"]
    smallest = min(math.prod(block_size(u / 100, scale, aspect, grid)) for u in range(101) for scale, aspect in
                   ((Config.target_scale, Config.target_aspect), (Config.context_scale, (1.0, 1.0))))
    config["min_keep"] = max(0, min(Config.min_keep, smallest - 1))
    model = Model(Config(**config))
    tensors = {k.removeprefix("ijepa."): v for k, v in read_safetensors(path).items()}
    if any(k.startswith("pooler.") for k in tensors):
        raise ValueError(f"{path} has a pooler (pooler.dense); gaia's jepa.py has none: save the model with "
                         f"add_pooling_layer=False, or load it with transformers")
    names = hf_names(model.config)
    wanted = {n for theirs in names.values() for n in (theirs if isinstance(theirs, tuple) else (theirs,))}
    missing, unused = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted - {"embeddings.mask_token"})
    if missing or unused:
        raise ValueError(f"{path} does not match IJepaModel's layout: missing {missing[:3]}, unexpected {unused[:3]}")
    state = {ours: torch.cat([tensors[n] for n in theirs]) if isinstance(theirs, tuple) else tensors[theirs]
             for ours, theirs in names.items()}
    model.encoder.load_state_dict(state)
    model.target_encoder.load_state_dict(state)
    return model


def to_hf(model, path):
    """Write the target encoder as a Hugging Face IJepaModel directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    c, state = model.config, model.target_encoder.state_dict()
    tensors = {}
    for ours, theirs in hf_names(c).items():
        v = state[ours].detach().float().cpu()
        if isinstance(theirs, tuple):  # qkv -> query, key, value
            tensors.update(zip(theirs, v.chunk(3)))
        else:
            tensors[theirs] = v
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    hf = {theirs: getattr(c, ours) for ours, theirs in HF_CONFIG.items()}
    hf.update(model_type="ijepa", architectures=["IJepaModel"], intermediate_size=round(c.n_embd * c.mlp_ratio),
              hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
              dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
