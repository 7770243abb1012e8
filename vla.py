"""
A vision-language-action policy (VLA) in one file: it reads an image and an instruction ("put the green triangle on
the yellow square") and outputs the next actions; trained by behaviour cloning on a scripted expert's demonstrations
and judged closed loop, by the share of held-out episodes it solves.

- The RT-2 / OpenVLA recipe (Brohan et al. 2023, "RT-2"; Kim et al. 2024, "OpenVLA"): a transformer reads image
  tokens and instruction tokens, and each action dimension is discretised into n_bins = 256 uniform bins over
  [-1, 1] and predicted as a token (action_head=tokens). Discrete action spaces (BabyAI's 7 moves) use their own ids.
  Unlike RT-2, the action dimensions are predicted in parallel from action_dim readout tokens (as OpenVLA-OFT), not
  one after another: one forward per step.
- pi0's flow matching (Black et al. 2024, "pi0: A Vision-Language-Action Flow Model"), action_head=flow: a chunk of
  chunk_size future actions drawn from noise. Training: t ~ Beta(1.5, 1), x_t = t * noise + (1 - t) * a, and the
  network regresses the velocity noise - a (mean squared error). Inference: 10 Euler steps from t = 1 (noise) to
  t = 0. The action expert is pi0's, small (ActionExpert): one token per step of the chunk, which attend to the
  backbone's final tokens (image grid, words, readouts) and to each other; the backbone runs once per step of the
  policy, the 10 Euler steps only the expert. Unlike pi0, the readouts are also trained as the tokens head's are
  (cross-entropy over the current action's bins, added to the flow loss), as pi0.5 trains its backbone on discrete
  action tokens beside its expert (Driess et al. 2025, "Knowledge Insulating Vision-Language-Action Models"; there
  the expert's gradient is stopped at the backbone, here it is not). Why both, measured below.
- ACT's temporal ensembling (Zhao et al. 2023, "Learning Fine-Grained Bimanual Manipulation with Low-Cost
  Hardware"): a chunk is predicted at every step, and the action executed at step t is the average of every
  prediction made for t (up to chunk_size of them), weighted exp(-0.01 i), i = 0 for the oldest.

Against vlm.py (the nearest gaia model): the image goes through a convolutional stem (Xiao et al. 2021, "Early
Convolutions Help Transformers See Better": stride-2 3x3 convs, then one token per cell of the last grid) instead of
ViT patches, with x, y input channels (CoordConv) and FiLM conditioning on the instruction (as RT-1's image encoder);
the instruction is a bag of hashed words (crc32 into n_words ids: no tokenizer to ship, any environment's missions
map to ids); one bidirectional transformer (GPT-2's blocks, no causal mask) over image tokens, words and readout
tokens, whose readouts also get a linear map of the whole final grid (Stem and Model say why each of these is there:
without them a CPU run's policy stayed at chance); the output is actions, not text, so there is no generate() and no
KV cache.

Environments (Gymnasium's API shape: reset(seed) -> obs, info; step(a) -> obs, reward, terminated, truncated, info;
obs = {"image": uint8 (S, S, 3), "mission": str}):
- tabletop (built in, numpy): a gripper point and three objects (circle, square, triangle in red, green, blue,
  yellow) on a square table, continuous actions (dx, dy, grip) in [-1, 1], three task families: reach ("go to the
  red circle"), push ("push the blue square to the left edge"), place ("put the green triangle on the yellow
  square"). A scripted expert (Tabletop.expert) solves them; its rollouts are the demonstrations.
- babyai:LEVEL-ID (BabyAI, Chevalier-Boisvert et al. 2019, inside the minigrid package): the full grid rendered to
  RGB and turned so that the agent faces up, the mission as the instruction, 7 discrete actions (sampled from the
  policy's softmax, as BabyAI's own evaluation does), minigrid's BabyAIBot as the expert. Any gymnasium environment
  with an image and a text mission needs only the adapter's few lines (GymAdapter).

    python train.py --model=vla                                          # tabletop, action tokens
    python train.py --model=vla --action_head=flow                       # pi0's flow matching
    python train.py --model=vla --env=babyai:BabyAI-GoToLocalS8N2-v0 --n_demos=2000 --max_iters=1000
                                                    # a BabyAI level (pip install minigrid)

evaluate() runs success_<family> over eval_episodes held-out seeded episodes per family, and two baselines beside
it: success_<family>_blind (the same trained model given an empty instruction) and success_<family>_random (uniform
random actions). --blind=True trains the model on empty instructions: the instruction-blind policy at its best.

Measured (2026-12-02, 2-core AMD EPYC, torch 2.13 CPU, 1 thread, the other core busy: 782 s wall, demonstrations
included), `OMP_NUM_THREADS=1 python train.py --model=vla`, success over 100 held-out episodes per family, policy /
empty instruction / random: reach 0.86 / 0.05 / 0.05, push 0.05 / 0.00 / 0.00, place 0.16 / 0.00 / 0.00. The flow
head and BabyAI: README.

The flow head, `OMP_NUM_THREADS=1 python train.py --model=vla --action_head=flow` (2000 steps, the same seeds; 1129 s
wall, the expert's 10 passes per action included): reach 0.33 / 0.11 / 0.05, push 0.02 / 0.00 / 0.00, place 0.01 /
0.00 / 0.00; with FiLM reading the unnormed mean of the words (tried) reach 0.47 / 0.22. An MLP over one readout vector
(h, the noisy chunk, the time) as the expert (tried): reach 0.15 / 0.13. An open-loop probe after 500 steps (the
sign of the first action's dx, dy against the expert's on held-out steps, reach / push / place): that MLP 0.47 / 0.50
/ 0.51 (chance), the attention expert alone 0.48 / 0.56 / 0.53, with the cross-entropy beside it 0.52 / 0.61 / 0.60,
and the bins' argmax of those readouts 0.62 / 0.75 / 0.64. Flow draws a sample, and a sample of a still broad
distribution has the likelier sign no more often than its probability (started from zero noise instead, the same
expert's sign: 0.60 / 0.75 / 0.66); after 2000 steps that no longer mattered (reach 0.47 either way in the
unnormed-FiLM run), the distribution had narrowed.
"""
import contextlib
import io
import hashlib
import json
import math
import os
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    env: str = "tabletop"            # tabletop | babyai:LEVEL-ID (e.g. babyai:BabyAI-GoToRedBallGrey-v0)
    tasks: str = "reach,push,place"  # the tabletop's task families, trained and evaluated
    image_size: int = 64             # observations are image_size x image_size RGB
    n_stem: int = 4                  # stride-2 convs in the stem: a grid of image_size / 2^n_stem cells, one token each
    stem_channels: int = 16          # the first conv's width, doubled by each next one
    n_words: int = 512               # instruction words are hashed into ids 1 .. n_words - 1 (0 pads)
    max_words: int = 12              # longest instruction, in words
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    norm_eps: float = 1e-5
    dropout: float = 0.0
    action_head: str = "tokens"      # tokens (RT-2 / OpenVLA bins) | flow (pi0 flow matching over a chunk)
    n_bins: int = 256                # tokens: uniform bins over [-1, 1] per action dimension
    chunk_size: int = 8              # flow: future actions predicted at once (pi0's H)
    flow_steps: int = 10             # flow: Euler steps from noise to actions at inference
    flow_layers: int = 2             # flow: the action expert's layers (ExpertBlock)
    ensemble_m: float = 0.01         # flow: ACT's temporal ensembling, weights exp(-m i), i = 0 the oldest prediction
    blind: bool = False              # True: train (and act) on empty instructions, the instruction-blind baseline
    n_demos: int = 10000             # expert episodes per task family for training (cached in cache_dir); 2000 of
                                     # reach overfit in 1000 steps of 64 (train loss 0.20, val loss 1.57)
    n_val_demos: int = 50            # held-out expert episodes per family, for the val loss
    eval_episodes: int = 100         # held-out seeded episodes per family at each evaluate()

    def __post_init__(self):
        if not (self.env == "tabletop" or self.env.startswith("babyai:") and len(self.env) > 7):
            raise ValueError(f"env={self.env!r} is not tabletop or babyai:LEVEL-ID; e.g. "
                             f"--env=babyai:BabyAI-GoToRedBallGrey-v0")
        if self.env == "tabletop":
            bad = [t for t in self.tasks.split(",") if t not in FAMILIES]
            if bad or not self.tasks:
                raise ValueError(f"tasks={self.tasks!r}: {bad[0] if bad else 'empty'} is not a tabletop task family; "
                                 f"choose from {','.join(FAMILIES)} (e.g. --tasks=reach,place)")
        if self.action_head not in ("tokens", "flow"):
            raise ValueError(f"action_head={self.action_head!r} is not tokens or flow; e.g. --action_head=tokens")
        if self.action_head == "flow" and self.discrete:
            raise ValueError(f"action_head=flow needs continuous actions, and {self.env}'s are discrete; "
                             f"use --action_head=tokens")
        for key in ("image_size", "n_stem", "stem_channels", "max_words", "n_layer", "n_head", "n_embd", "n_bins",
                    "chunk_size", "flow_steps", "flow_layers", "n_demos", "n_val_demos", "eval_episodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.n_words < 2:
            raise ValueError(f"n_words={self.n_words} must be >= 2 (id 0 pads)")
        if self.image_size % 2 ** self.n_stem:
            raise ValueError(f"image_size={self.image_size} is not a multiple of 2^n_stem={2 ** self.n_stem}; each "
                             f"stride-2 conv halves it (e.g. --image_size={2 ** self.n_stem * 8})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose a multiple of it")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def discrete(self):
        return self.env.startswith("babyai:")

    @property
    def action_dim(self):
        return 1 if self.discrete else 3  # BabyAI: one action id; tabletop: (dx, dy, grip)

    @property
    def n_actions(self):
        """Ids the tokens head chooses from, per action dimension: the env's own ids, or the n_bins bins."""
        return BABYAI_ACTIONS if self.discrete else self.n_bins

    @property
    def grid(self):
        return self.image_size // 2 ** self.n_stem

    @property
    def families(self):
        """Task families, each scored on its own: the tabletop's tasks, or the BabyAI level (BabyAI-GoToLocal-v0 ->
        GoToLocal)."""
        if self.env == "tabletop":
            return tuple(self.tasks.split(","))
        return (self.env.split(":", 1)[1].removeprefix("BabyAI-").rsplit("-v", 1)[0],)


# ------------------------------------------------------------------------------------- actions as tokens, as flow

def value_to_bin(a, n_bins):
    """RT-2's discretisation: a in [-1, 1] -> the uniform bin it falls in, 0 .. n_bins - 1 (1 lands in the last)."""
    return ((a.clamp(-1, 1) + 1) / 2 * n_bins).floor().long().clamp(0, n_bins - 1)


def bin_to_value(b, n_bins):
    """A bin -> its centre, -1 + (b + 0.5) * 2 / n_bins."""
    return -1 + (b.float() + 0.5) * 2 / n_bins


def sample_time(u):
    """pi0's t ~ Beta(1.5, 1) from a uniform u by the inverse CDF: P(t <= x) = x^1.5, so t = u^(2/3). The density
    1.5 sqrt(t) favours t near 1, the noisier end, where the velocity is hardest to tell."""
    return u.pow(2 / 3)


def euler(velocity, x, steps):
    """Integrate dx/dt = velocity(x, t) from t = 1 (x: noise) to t = 0 (actions) in `steps` equal Euler steps."""
    dt = 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), 1.0 - k * dt, device=x.device)
        x = x - dt * velocity(x, t)
    return x


def ensemble(predictions, m):
    """ACT's temporal ensembling: predictions (k, action_dim) for this step, made at the k latest steps, oldest first;
    weights exp(-m i), i = 0 for the oldest, normalised."""
    w = torch.exp(-m * torch.arange(len(predictions), dtype=torch.float32))
    return (w[:, None] * predictions).sum(0) / w.sum()


def sincos(t, dim, min_period=4e-3, max_period=4.0):
    """pi0's time embedding: sin and cos of t at dim / 2 periods, geometric from min_period to max_period. (B, dim)"""
    fraction = torch.linspace(0, 1, dim // 2, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t[:, None] / period * 2 * math.pi
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


# ------------------------------------------------------------------------------------- the network

class Stem(nn.Module):
    """images (B, 3, S, S) in [-1, 1] and the instruction's vector (B, n_embd) -> one token per cell of the last grid
    (B, grid^2, n_embd), raster order: n_stem stride-2 3x3 convs, then a 1x1 conv to n_embd (Xiao et al. 2021's
    convolutional stem). Two more input channels hold each pixel's x and y in [-1, 1] (CoordConv, Liu et al. 2018):
    a policy needs where things are to a pixel, finer than its token grid. Each conv's output is modulated by the
    instruction, FiLM (Perez et al. 2018), as RT-1 conditions its image encoder: x * (1 + gamma) + beta, gamma and
    beta per channel from the instruction, starting at 0 (identity). Without it the transformer must find the named
    object among the image tokens by attention alone, which took far longer than a CPU run allows (tried: 300 steps
    of batch 64 left the policy at chance, predicting the actions' marginal)."""

    def __init__(self, config):
        super().__init__()
        widths = [3 + 2] + [config.stem_channels * 2 ** i for i in range(config.n_stem)]
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:])])
        self.film = nn.ModuleList([nn.Linear(config.n_embd, 2 * b) for b in widths[1:]])
        self.proj = nn.Conv2d(widths[-1], config.n_embd, 1)
        ramp = torch.linspace(-1, 1, config.image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="xy")), persistent=False)

    def forward(self, x, instruction):
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)  # (B, 5, S, S): RGB, x, y
        for conv, film in zip(self.convs, self.film):
            gamma, beta = film(instruction)[:, :, None, None].chunk(2, dim=1)  # (B, channels, 1, 1) each
            x = F.gelu(conv(x) * (1 + gamma) + beta)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, n_embd)


class Attention(nn.Module):
    """GPT-2's multi-head attention without the causal mask: every token sees every token, except padding words."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, -1, self.head_dim).transpose(1, 2) for z in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class ExpertBlock(nn.Module):
    """One layer of the action expert: the action tokens attend to the backbone's final tokens and to each other
    (pi0's attention pattern for its action tokens), then an MLP. (B, chunk, C), (B, T, C) -> (B, chunk, C)"""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(C, eps=config.norm_eps)
        self.ln_kv = nn.LayerNorm(C, eps=config.norm_eps)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, context, mask):
        B, H, C = x.shape
        a = self.ln_1(x)
        q = self.q(a).view(B, H, self.n_head, -1).transpose(1, 2)  # (B, nh, chunk, hs)
        k, v = (z.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2)
                for z in self.kv(torch.cat([self.ln_kv(context), a], dim=1)).split(C, dim=2))  # (B, nh, T + chunk, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, H, C))
        return x + self.mlp(self.ln_2(x))


class ActionExpert(nn.Module):
    """pi0's action expert, small: one token per step of the chunk, made from the noisy action and the time by an MLP
    (pi0's W3 swish(W2 [W1 a, sincos(t)])) plus a learned position per step, then flow_layers ExpertBlocks over the
    backbone's final tokens (the image grid, the words, the readouts). An MLP over one readout vector learnt where to
    move no better than chance (the module docstring's figures); these tokens reach the grid tokens that hold the
    gripper and the objects. (x_t (B, chunk, dim), t (B,), context (B, T, C), mask (B, 1, 1, T) of the context's
    real tokens) -> the velocity (B, chunk, dim)."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.action_in = nn.Linear(config.action_dim, C)
        self.time_fc1 = nn.Linear(2 * C, C)
        self.time_fc2 = nn.Linear(C, C)
        self.pos = nn.Parameter(torch.zeros(config.chunk_size, C))
        self.h = nn.ModuleList([ExpertBlock(config) for _ in range(config.flow_layers)])
        self.ln_f = nn.LayerNorm(C, eps=config.norm_eps)
        self.out = nn.Linear(C, config.action_dim)

    def forward(self, x_t, t, context, mask):
        B, H, _ = x_t.shape
        a = self.action_in(x_t)  # (B, chunk, C)
        time = sincos(t, a.shape[-1])[:, None].expand(-1, H, -1)  # (B, chunk, C)
        x = self.time_fc2(F.silu(self.time_fc1(torch.cat([a, time], dim=-1)))) + self.pos
        mask = F.pad(mask, (0, H), value=True)  # and every action token sees every action token
        for block in self.h:
            x = block(x, context, mask)
        return self.out(self.ln_f(x))  # (B, chunk, dim)


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stem = Stem(config)
        self.pos_embed = nn.Parameter(torch.zeros(config.grid ** 2, config.n_embd))  # learned, one per image token
        self.query = nn.Parameter(torch.zeros(config.action_dim, config.n_embd))  # the readout tokens
        # and a linear map of the whole grid of final image tokens into each readout: the readout tokens alone sat at
        # chance for hundreds of steps (tried), their attention must first learn to single out the one token of 77
        # that holds the gripper; a map of the flattened grid reads positions at once (Diffusion Policy and ACT also
        # flatten their image features)
        self.spatial = nn.Linear(config.grid ** 2 * config.n_embd, config.action_dim * config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.n_words, config.n_embd),
            wpe=nn.Embedding(config.max_words, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.n_actions)
        if config.action_head == "flow":
            self.flow = ActionExpert(config)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if name.startswith("stem.film."):  # FiLM starts as the identity (RT-1's init)
                nn.init.zeros_(p)

    def _init_weights(self, module):
        """GPT-2's init, and He's for the convolutions: the stem must pass the small objects of a mostly black image
        on at full strength (PyTorch's default conv init shrinks them by about half per layer, and a policy then sat at
        chance for hundreds of steps, tried):
        | tensor                                           | init                               |
        | Linear weights (spatial too), wte, wpe, pos_embed, query | normal(0, 0.02)            |
        | attn.c_proj, mlp.c_proj weights                  | normal(0, 0.02 / sqrt(2 n_layer))  |
        | Linear biases                                    | 0                                  |
        | stem convs (convs, proj)                         | kaiming_normal (He, ReLU gain)     |
        | stem conv biases                                 | 0                                  |
        | stem.film weights and biases                     | 0 (FiLM starts as the identity)    |
        | LayerNorm weight, bias                           | 1, 0                               |"""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, ActionExpert):
            nn.init.normal_(module.pos, mean=0.0, std=0.02)
        elif isinstance(module, Model):
            nn.init.normal_(module.pos_embed, mean=0.0, std=0.02)
            nn.init.normal_(module.query, mean=0.0, std=0.02)

    def encode(self, images, words):
        """images (B, 3, S, S), words (B, max_words) ids (0 pads) -> the final tokens (B, T, n_embd), the readouts
        last, and the mask (B, 1, 1, T) of the real ones (padding words are not)."""
        c = self.config
        if c.blind:
            words = torch.zeros_like(words)
        B = images.shape[0]
        wte = self.transformer.wte(words)  # (B, max_words, C)
        real = (words != 0).float()[..., None]
        # the mean of the real words, for FiLM, layer-normed (no words stay 0): wte starts at std 0.02 and FiLM at 0,
        # so FiLM's gradient (times this vector) and the words' (times FiLM's weights) start near 0. Unnormed, 500
        # steps on BabyAI-GoToLocalS8N2 left the val loss at 0.42 under the mission and under another episode's (tried;
        # normed: 0.26 and 0.98)
        instruction = F.layer_norm((wte * real).sum(1) / real.sum(1).clamp(min=1), (c.n_embd,))
        x = torch.cat([self.stem(images, instruction) + self.pos_embed,  # (B, grid^2, C)
                       wte + self.transformer.wpe.weight,  # (B, max_words, C)
                       self.query.expand(B, -1, -1)], dim=1)  # (B, action_dim, C)
        # every token attends to the image, the readouts and the real words, never to a padding id
        keep = torch.cat([torch.ones(B, c.grid ** 2, dtype=torch.bool, device=words.device), words != 0,
                          torch.ones(B, c.action_dim, dtype=torch.bool, device=words.device)], dim=1)
        mask = keep[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
        for block in self.transformer.h:
            x = block(x, mask)
        x = self.transformer.ln_f(x)
        grid = self.spatial(x[:, :c.grid ** 2].flatten(1)).view(B, c.action_dim, -1)  # (B, action_dim, C)
        return torch.cat([x[:, :-c.action_dim], x[:, -c.action_dim:] + grid], dim=1), mask  # (B, T, C), (B, 1, 1, T)

    def forward(self, inputs, targets=None):
        """inputs: (images, words) for tokens, (images, words, noise (B, chunk, dim), t (B,)) for flow, as Batches
        draws them. targets: the action bins or ids (B, action_dim) (tokens), the clean chunk (B, chunk, dim) (flow).
        Returns (logits (B, action_dim, n_actions), cross-entropy) or (velocity (B, chunk, dim), flow-matching
        loss + the readouts' cross-entropy)."""
        images, words = inputs[:2]
        x, mask = self.encode(images, words)
        if self.config.action_head == "tokens":
            logits = self.lm_head(x[:, -self.config.action_dim:])  # (B, action_dim, n_actions)
            loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            return logits, loss
        noise, t = inputs[2:]
        tt = t[:, None, None]
        x_t = tt * noise + (1 - tt) * targets  # the straight path from the actions (t = 0) to noise (t = 1)
        v = self.flow(x_t, t, x, mask)
        # and the current action's bins, as the tokens head: they teach the backbone where to move far sooner than
        # the flow loss does (the module docstring's probe)
        logits = self.lm_head(x[:, -self.config.action_dim:])
        bins = value_to_bin(targets[:, 0], self.config.n_bins)
        return v, F.mse_loss(v, noise - targets) + F.cross_entropy(logits.flatten(0, 1), bins.flatten())

    @torch.no_grad()
    def act(self, images, words, generator=None):
        """The policy: (B, chunk, action_dim) actions for this step and the next ones (chunk 1 for tokens); a discrete
        env's action ids as floats, sampled from the policy's distribution. Flow draws its noise, a discrete env its
        actions, from generator (evaluation passes a seeded one)."""
        c = self.config
        x, mask = self.encode(images, words)
        if c.action_head == "tokens":
            logits = self.lm_head(x[:, -c.action_dim:])  # (B, action_dim, n_actions)
            if c.discrete:  # sampled, as BabyAI's own evaluation does: an argmax imitation policy that errs in a state
                # errs the same way each time it returns there, and turns left and right in place until time runs out
                probs = logits[:, 0].float().softmax(-1).cpu()
                return torch.multinomial(probs, 1, generator=generator).float().to(x.device)[:, None, :]  # (B, 1, 1)
            return bin_to_value(logits.argmax(-1), c.n_bins)[:, None, :]  # the most likely bin of each dimension
        noise = torch.randn(images.shape[0], c.chunk_size, c.action_dim, generator=generator).to(images.device)
        return euler(lambda x_t, t: self.flow(x_t, t, x, mask), noise, c.flow_steps).clamp(-1, 1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self):
        """Training FLOPs per step of a demonstration (forward + backward = 3x the forward's 2 per multiply-add): the
        stem's convs over their output grids, the transformer's weights over its tokens plus attention's
        QK^T and AV (4 T^2 C per layer), the head once (Euler's steps run at inference only)."""
        c = self.config
        conv = sum(2 * m.weight.numel() * (c.image_size // 2 ** (i + 1)) ** 2 for i, m in enumerate(self.stem.convs))
        conv += 2 * self.stem.proj.weight.numel() * c.grid ** 2
        T = c.grid ** 2 + c.max_words + c.action_dim
        blocks = sum(p.numel() for p in self.transformer.h.parameters() if p.dim() == 2)  # the Linear weights
        head = self.lm_head.weight.numel() * c.action_dim
        if c.action_head == "flow":  # its Linear weights over the chunk's tokens, and the context's keys and values
            expert = sum(p.numel() for p in self.flow.parameters() if p.dim() == 2)
            head += expert * c.chunk_size + 2 * c.n_embd ** 2 * T * c.flow_layers
        return 3 * (conv + 2 * blocks * T + 4 * c.n_layer * T * T * c.n_embd + 2 * head)

    @classmethod
    def from_pretrained(cls, path):
        """A directory save_pretrained wrote (config.json + model.safetensors, sharded or not)."""
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type") != "gaia_vla":
            raise ValueError(f"{path} holds a {hf.get('model_type')!r} model; vla.py loads its own save_pretrained "
                             f"directories (there is no Hugging Face VLA architecture of this shape)")
        model = cls(Config(**{k: v for k, v in hf.items() if k != "model_type"}))
        model.load_state_dict(read_safetensors(path))
        return model

    def save_pretrained(self, path):
        """gaia's own layout: config.json (this Config) + model.safetensors (these parameter names)."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "gaia_vla", **asdict(self.config)}, f, indent=2)


def read_safetensors(path):
    """Every tensor of a directory: model.safetensors, or each shard model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return load_file(os.path.join(path, "model.safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; a checkpoint in "
                         f"another format (pytorch_model.bin) must be re-saved as safetensors")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


def words_of(text, config):
    """An instruction -> (max_words,) ids: each lower-cased word hashed by crc32 into 1 .. n_words - 1, 0 after."""
    ids = [1 + zlib.crc32(w.encode()) % (config.n_words - 1) for w in text.lower().replace(",", " ").split()]
    ids = ids[:config.max_words]
    return ids + [0] * (config.max_words - len(ids))


def to_input(images):
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ===================================================================================== the tabletop

# Units: the table is the square [0, 1]^2, x to the right, y down (as the image). A step moves the gripper by up to
# MAX_STEP per axis. The gripper's rules: an open gripper hovers over the objects; closing it over an object (within
# the object's radius of its centre) picks that object up, which then moves with it until the gripper opens; a
# closed, empty gripper pushes the objects it meets (they slide out of its way, along the line of centres).
FAMILIES = ("reach", "push", "place")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
COLOUR_NAMES = tuple(COLOURS)
EDGES = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0)}
STEP_LIMIT = {"reach": 20, "push": 40, "place": 40}
N_OBJECTS, MAX_STEP, GRIPPER_R = 3, 0.07, 0.02
EDGE_ZONE = 0.2    # push succeeds once the object's centre is within this of its edge
PLACE_TOL = 0.05   # place succeeds once the object lies (released) within this of the other's centre
BABYAI_ACTIONS = 7  # minigrid's left, right, forward, pickup, drop, toggle, done


class Tabletop:
    """The built-in environment. family None: each reset draws one of `families` from its seed."""

    def __init__(self, family=None, image_size=64, families=FAMILIES):
        self.fixed, self.families, self.image_size = family, families, image_size

    def reset(self, seed=None, options=None):
        rng = np.random.default_rng(seed)
        self.family = self.fixed or self.families[int(rng.integers(len(self.families)))]
        kinds = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
        picks = rng.choice(len(kinds), N_OBJECTS, replace=False)  # distinct colour-shape pairs (colours may repeat)
        while True:  # objects apart, the gripper over none of them; a push target away from every edge zone
            xy = rng.uniform(0.12, 0.88, (N_OBJECTS, 2))
            r = rng.uniform(0.06, 0.08, N_OBJECTS)
            g = rng.uniform(0.05, 0.95, 2)
            far = all(np.linalg.norm(xy[i] - xy[j]) > r[i] + r[j] + 0.06
                      for i in range(N_OBJECTS) for j in range(i))
            if far and np.linalg.norm(xy - g, axis=1).min() > 0.15 and (
                    self.family != "push" or np.abs(xy[0] - 0.5).max() < 0.2):
                break
        # (shape, colour, x, y, r) rows; object 0 is the one the instruction names first
        self.objects = np.array([[SHAPES.index(kinds[k][1]), COLOUR_NAMES.index(kinds[k][0]), *xy[i], r[i]]
                                 for i, k in enumerate(picks)])
        self.gripper, self.closed, self.held, self.steps = g, False, -1, 0
        name = lambda i: f"{COLOUR_NAMES[int(self.objects[i, 1])]} {SHAPES[int(self.objects[i, 0])]}"  # noqa: E731
        self.edge = list(EDGES)[int(rng.integers(4))]
        self.mission = {"reach": f"go to the {name(0)}", "push": f"push the {name(0)} to the {self.edge} edge",
                        "place": f"put the {name(0)} on the {name(1)}"}[self.family]
        return self.obs(), {"family": self.family}

    def state(self):
        """What the image shows, as floats: gripper x, y, closed, held; then (shape, colour, x, y, r) per object."""
        return np.concatenate([[*self.gripper, float(self.closed), float(self.held)], self.objects.ravel()])

    def obs(self):
        return {"image": render(self.state(), self.image_size), "mission": self.mission}

    def success(self):
        o = self.objects
        if self.family == "reach":
            return bool(np.linalg.norm(self.gripper - o[0, 2:4]) < o[0, 4])
        if self.family == "push":
            dx, dy = EDGES[self.edge]
            coordinate = o[0, 2] if dx else o[0, 3]
            return bool(coordinate < EDGE_ZONE if dx + dy < 0 else coordinate > 1 - EDGE_ZONE)
        return bool(self.held != 0 and np.linalg.norm(o[0, 2:4] - o[1, 2:4]) < PLACE_TOL)

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -1, 1)
        close = bool(a[2] > 0)
        if close and not self.closed:  # closing: pick up the object under the gripper (the nearest), if any
            d = np.linalg.norm(self.objects[:, 2:4] - self.gripper, axis=1)
            k = int(d.argmin())
            self.held = k if d[k] < self.objects[k, 4] else -1
        if not close:
            self.held = -1
        self.closed = close
        new = np.clip(self.gripper + MAX_STEP * a[:2], 0, 1)
        if self.held >= 0:
            self.objects[self.held, 2:4] += new - self.gripper
        elif self.closed:  # an empty closed gripper pushes: an object it overlaps slides out along the centres' line
            for o in self.objects:
                gap = o[2:4] - new
                d, reach = np.linalg.norm(gap), o[4] + GRIPPER_R
                if 0 < d < reach:
                    o[2:4] = np.clip(new + gap / d * reach, o[4], 1 - o[4])
        self.gripper = new
        self.steps += 1
        ok = self.success()
        return self.obs(), float(ok), ok, self.steps >= STEP_LIMIT[self.family] and not ok, {"success": ok}

    def expert(self):
        """The scripted expert's action in the current state: a function of what the image shows (and the
        instruction), so a memoryless policy can imitate it."""
        o, g = self.objects, self.gripper
        if self.family == "reach":
            return np.array([*toward(g, o[0, 2:4]), -1.0])
        if self.family == "place":
            if self.held == 0:  # carry it over the other object, then open
                at = np.linalg.norm(o[1, 2:4] - g) < 1e-6
                return np.array([*toward(g, o[1, 2:4]), -1.0 if at else 1.0])
            if self.closed:  # holding nothing, or the wrong object: let go
                return np.array([0.0, 0.0, -1.0])
            at = np.linalg.norm(o[0, 2:4] - g) < 1e-6  # above the object's centre: close on it
            return np.array([*toward(g, o[0, 2:4]), 1.0 if at else -1.0])
        # push: closed throughout. In the frame of the push direction (u along it, v across, the object at 0), get
        # behind the object without touching it, then push, steering back onto the line of centres.
        direction = np.array(EDGES[self.edge])
        across = np.array([-direction[1], direction[0]])
        rel = g - o[0, 2:4]
        u, v = rel @ direction, rel @ across
        d = o[0, 4] + GRIPPER_R
        if u < 0 and u > -(d + 0.03) and abs(v) < 0.3 * o[0, 4]:  # behind and in line: push
            target = g + MAX_STEP * direction - v * across
        elif u < -(d + 0.005):  # behind, off the line: the segment to the line stays behind the object
            target = o[0, 2:4] - (d + 0.015) * direction
        elif abs(v) >= d + 0.02:  # beside it: to the corner behind, staying beside it
            target = o[0, 2:4] + (d + 0.03) * (np.sign(v) * across - direction)
        else:  # in front of it: step sideways, away from the line (away from the object)
            target = g + (d + 0.04 - abs(v)) * (1.0 if v >= 0 else -1.0) * across
        return np.array([*toward(g, target, straight=True), 1.0])


def toward(g, target, straight=False):
    """(dx, dy) that moves g toward target, each axis at full speed until it is within a step (most actions are then
    -1, 0 or 1 on each axis: a policy tells them apart sooner than a continuum); straight=True scales both axes alike
    instead, so the path is the straight segment (pushing needs that to stay clear of the object)."""
    delta = (target - g) / MAX_STEP
    return delta / max(1.0, float(np.abs(delta).max())) if straight else np.clip(delta, -1, 1)


def render(state, size):
    """Tabletop.state() -> uint8 (size, size, 3): the objects on a black table, the held one last, then the gripper:
    a white cross when open, a white square when closed."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    centres = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    gx, gy, closed, held = state[:4]
    objects = state[4:].reshape(-1, 5)
    order = [i for i in range(len(objects)) if i != int(held)] + ([int(held)] if held >= 0 else [])
    for i in order:
        shape, colour, cx, cy, r = objects[i]
        dx, dy = x - cx, y - cy
        if SHAPES[int(shape)] == "circle":
            inside = dx ** 2 + dy ** 2 <= r ** 2
        elif SHAPES[int(shape)] == "square":
            inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        else:  # triangle, apex up
            inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        image[inside] = COLOURS[COLOUR_NAMES[int(colour)]]
    dx, dy = np.abs(x - gx), np.abs(y - gy)
    if closed:
        mark = (dx <= 0.035) & (dy <= 0.035)
    else:
        mark = ((dx <= 0.05) & (dy <= 0.016)) | ((dy <= 0.05) & (dx <= 0.016))
    image[mark] = 255
    return image


# ===================================================================================== BabyAI and other gymnasium envs

class GymAdapter:
    """A gymnasium environment whose observations are {"image": RGB, "mission": str}, in the tabletop's shape: the
    image padded to image_size x image_size (top-left), info["success"] = a positive reward at the end."""

    def __init__(self, env, image_size):
        self.env, self.image_size = env, image_size

    def obs(self, obs):
        image = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        h, w = obs["image"].shape[:2]
        image[:min(h, self.image_size), :min(w, self.image_size)] = obs["image"][:self.image_size, :self.image_size]
        return {"image": image, "mission": obs["mission"]}

    def reset(self, seed=None, options=None):
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints its rejected level samples
            obs, info = self.env.reset(seed=seed, options=options)
        return self.obs(obs), info

    def step(self, action):
        action = int(np.asarray(action).reshape(-1)[0])  # an id, or [id]
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.obs(obs), reward, terminated, truncated, {**info, "success": bool(terminated and reward > 0)}


class BabyAI(GymAdapter):
    """A BabyAI level: the full grid as RGB (minigrid's RGBImgObsWrapper, tiles of image_size / grid pixels) turned so
    that the agent faces up, the mission, minigrid's BabyAIBot as the expert."""

    def __init__(self, level, image_size):
        try:
            import gymnasium
            import minigrid  # noqa: F401  (registers the BabyAI levels)
            from minigrid.wrappers import RGBImgObsWrapper
        except ImportError:
            raise ValueError(f"--env=babyai:{level} needs the minigrid package (BabyAI ships inside it): "
                             f"pip install minigrid") from None
        try:
            env = gymnasium.make(level)
        except gymnasium.error.Error as e:
            raise ValueError(f"babyai level {level!r} does not exist ({type(e).__name__}); e.g. "
                             f"--env=babyai:BabyAI-GoToRedBallGrey-v0") from None
        tile = max(1, image_size // max(env.unwrapped.width, env.unwrapped.height))
        super().__init__(RGBImgObsWrapper(env, tile_size=tile), image_size)

    def obs(self, obs):
        # turned so that the agent faces up, as in BabyAI's own egocentric view: the move towards a cell then depends
        # on where the cell lies, not also on which way the agent faces. Unturned, 500 steps on GoToLocalS8N2 left
        # the val loss at 0.61, 0.62 under another episode's mission: the policy went to any object (turned: 0.26, and
        # 0.98 under another's). rot90 turns anticlockwise; minigrid's directions are 0 right, 1 down, 2 left, 3 up
        turns = (self.env.unwrapped.agent_dir + 1) % 4
        return super().obs({**obs, "image": np.ascontiguousarray(np.rot90(obs["image"], turns))})

    def reset(self, seed=None, options=None):
        from minigrid.utils.baby_ai_bot import BabyAIBot
        out = super().reset(seed, options)
        self.bot = BabyAIBot(self.env.unwrapped)
        return out

    def expert(self):
        return np.array([float(self.bot.replan())])


def make_env(config, family):
    if config.env == "tabletop":
        return Tabletop(family, config.image_size)
    return BabyAI(config.env.split(":", 1)[1], config.image_size)


# ===================================================================================== demonstrations

def seed_of(split, family_index, k):
    """Episode k's seed: training and held-out seeds never meet."""
    return {"train": 0, "val": 10 ** 9}[split] + family_index * 10 ** 7 + k


class Demos:
    """One split's expert demonstrations, flat over steps: obs (the tabletop's state vectors, rendered when asked
    for, or a gym env's uint8 images), actions (N, action_dim), episode (N,) the episode of each step, end (E,) the
    index after each episode's last step, words (E, max_words), family (E,) an index into families."""

    def __init__(self, arrays, config, split):
        self.__dict__.update(arrays)
        self.config, self.split = config, split

    def __len__(self):
        return len(self.actions)

    def image(self, i):
        return render(self.obs[i], self.config.image_size) if self.config.env == "tabletop" else self.obs[i]


def record(config, family, seeds):
    """The expert's successful episodes on these seeds: lists of obs, actions and per-episode missions."""
    env, obs, actions, lengths, missions = make_env(config, family), [], [], [], []
    tabletop = config.env == "tabletop"
    for seed in seeds:
        o, _ = env.reset(seed=seed)
        ep_obs, ep_actions = [], []
        while True:
            a = env.expert()
            ep_obs.append(env.state() if tabletop else o["image"])
            ep_actions.append(a)
            o, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                break
        if info["success"]:  # the expert fails very rarely; a failed demonstration would teach failing
            obs += ep_obs
            actions += ep_actions
            lengths.append(len(ep_actions))
            missions.append(env.mission if tabletop else o["mission"])
    return obs, actions, lengths, missions


def make_demos(config, split, n):
    obs, actions, lengths, missions, family = [], [], [], [], []
    for f, name in enumerate(config.families):
        o, a, n_steps, m = record(config, name, [seed_of(split, f, k) for k in range(n)])
        obs, actions, lengths, missions = obs + o, actions + a, lengths + n_steps, missions + m
        family += [f] * len(m)
    dtype = np.float32 if config.env == "tabletop" else np.uint8
    return dict(obs=np.array(obs, dtype=dtype), actions=np.array(actions, dtype=np.float32),
                episode=np.repeat(np.arange(len(lengths)), lengths), end=np.cumsum(lengths),
                missions=np.array(missions), family=np.array(family))


DEMO_VERSION = 3  # bump when the environment or the expert changes: cached demonstrations are then made afresh


def load_splits(path, config, cache_dir=None):
    """(train, val) Demos: n_demos (train) and n_val_demos (val) expert episodes per family, from disjoint seeds,
    made once and kept in cache_dir. path must be "": the data comes from the environment (--env)."""
    if path:
        raise ValueError(f"--data={path}: vla makes its own demonstrations from --env (tabletop or "
                         f"babyai:LEVEL-ID); drop --data")
    splits = []
    for split, n in (("train", config.n_demos), ("val", config.n_val_demos)):
        key = json.dumps([DEMO_VERSION, config.env, config.tasks, config.image_size if config.discrete else 0, split,
                          n]).encode()
        file = os.path.join(cache_dir, f"vla_{hashlib.sha256(key).hexdigest()[:16]}.npz") if cache_dir else None
        if file and os.path.exists(file):
            with np.load(file) as f:
                arrays = dict(f)
        else:
            if config.discrete:
                make_env(config, None)  # a missing minigrid or level fails here, before a long wait
            arrays = make_demos(config, split, n)
            if file:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = f"{file}.{os.getpid()}.tmp.npz"  # data-parallel ranks may make it side by side
                np.savez(tmp, **arrays)
                os.replace(tmp, file)
        arrays["words"] = np.array([words_of(m, config) for m in arrays["missions"]], dtype=np.int64).reshape(
            -1, config.max_words)
        splits.append(Demos(arrays, config, split))
    return tuple(splits)


class Batches:
    """Random steps of one split's demonstrations, drawn with their own torch.Generator (its state is the data
    position). Each data-parallel rank draws the global batch and keeps its slice; the flow's noise and time are
    drawn here too, with the batch, so 2 ranks of 8 train exactly as 1 process of 16.
    next() -> ((images (B, 3, S, S), words (B, max_words)[, noise (B, chunk, dim), t (B,)]), targets)."""

    def __init__(self, split, config, batch_size, seed, rank=0, world=1):
        self.split, self.config, self.batch_size, self.rank, self.world = split, config, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.position = self.generator.get_state()

    def next(self):
        self.position = self.generator.get_state()
        c, s, total = self.config, self.split, self.batch_size * self.world
        picks = torch.randint(len(s), (total,), generator=self.generator)
        if c.action_head == "flow":
            noise = torch.randn(total, c.chunk_size, c.action_dim, generator=self.generator)
            t = sample_time(torch.rand(total, generator=self.generator))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        picks = picks[mine].numpy()
        images = to_input(np.stack([s.image(i) for i in picks]))
        words = torch.from_numpy(s.words[s.episode[picks]])
        if c.action_head == "tokens":
            a = torch.from_numpy(s.actions[picks])  # (B, action_dim)
            return (images, words), (a.long() if c.discrete else value_to_bin(a, c.n_bins))
        # the chunk: the next chunk_size expert actions; past the episode's end, stay (no motion, the last grip)
        ahead = picks[:, None] + np.arange(c.chunk_size)  # (B, chunk)
        last = s.end[s.episode[picks]][:, None] - 1
        chunk = torch.from_numpy(s.actions[np.minimum(ahead, last)])  # (B, chunk, dim)
        chunk[..., :2] *= torch.from_numpy(ahead <= last)[..., None]
        return (images, words, noise[mine], t[mine]), chunk

    def seek(self, position):
        self.generator.set_state(position)
        self.position = position


# ===================================================================================== closed-loop evaluation

@torch.no_grad()
def rollout(model, config, family, seeds, policy="model", frames=False):
    """Run one episode per seed of a family, side by side, with the model (policy "model"), the model given an empty
    instruction ("blind") or uniform random actions ("random"). Returns success per episode, and with frames=True
    the images of each episode (a list per episode, the last one after the last step)."""
    envs = [make_env(config, family) for _ in seeds]
    obs = [env.reset(seed=s)[0] for env, s in zip(envs, seeds)]
    done, success = [False] * len(envs), [False] * len(envs)
    shots = [[o["image"]] for o in obs] if frames else None
    plans = [[] for _ in envs]  # flow: each episode's chunks still covering a step, oldest first, as (start, chunk)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)  # the same draws at every eval
    device = next(model.parameters()).device if model is not None else "cpu"
    step = 0
    while not all(done):
        live = [i for i in range(len(envs)) if not done[i]]
        if policy == "random":
            chunks = (rng.integers(config.n_actions, size=(len(live), 1, 1)).astype(np.float32) if config.discrete
                      else rng.uniform(-1, 1, (len(live), 1, config.action_dim)))
        else:
            images = to_input(np.stack([obs[i]["image"] for i in live])).to(device)
            words = torch.tensor([words_of("" if policy == "blind" else obs[i]["mission"], config) for i in live],
                                 dtype=torch.long, device=device)
            chunks = model.act(images, words, generator).float().cpu().numpy()
        for j, i in enumerate(live):
            if policy != "random" and config.action_head == "flow":  # ACT's temporal ensembling
                plans[i] = [(start, c) for start, c in plans[i] if step - start < config.chunk_size]
                plans[i].append((step, chunks[j]))
                a = ensemble(torch.tensor(np.stack([c[step - start] for start, c in plans[i]])), config.ensemble_m)
                a = a.numpy()
            else:
                a = chunks[j, 0]
            obs[i], _, terminated, truncated, info = envs[i].step(a)
            if frames:
                shots[i].append(obs[i]["image"])
            if terminated or truncated:
                done[i], success[i] = True, bool(info["success"])
        step += 1
    return (success, shots) if frames else success


def eval_seeds(config, f, n=None):
    return [seed_of("val", f, k) for k in range(config.eval_episodes if n is None else n)]


_random_scores = {}  # the random policy's success, per (env, family, episodes): computed once


def evaluate(model, train, val):
    """Closed-loop success rates over eval_episodes held-out seeded episodes per family: the policy
    (success_<family>), the same model with an empty instruction (_blind), uniform random actions (_random), and the
    means over families (success, success_blind, success_random)."""
    c, scores = model.config, {}
    for f, family in enumerate(c.families):
        seeds = eval_seeds(c, f)
        key = (c.env, c.image_size, family, tuple(seeds))
        if key not in _random_scores:
            _random_scores[key] = float(np.mean(rollout(None, c, family, seeds, "random")))
        scores[f"success_{family}"] = float(np.mean(rollout(model, c, family, seeds)))
        scores[f"success_{family}_blind"] = float(np.mean(rollout(model, c, family, seeds, "blind")))
        scores[f"success_{family}_random"] = _random_scores[key]
    for kind in ("", "_blind", "_random"):
        scores[f"success{kind}"] = float(np.mean([scores[f"success_{f}{kind}"] for f in c.families]))
    return scores


@torch.no_grad()
def draw(model, val, path, per_family=2, n_frames=8):
    """A filmstrip PNG: per family, per_family held-out episodes of the policy, n_frames evenly spaced frames each,
    under the instruction and the outcome (green: solved, red: not, with the steps taken)."""
    from PIL import Image, ImageDraw
    c = model.config
    cell, gap, text_h = 96, 4, 26
    rows = []
    for f, family in enumerate(c.families):
        seeds = eval_seeds(c, f, per_family)
        success, shots = rollout(model, c, family, seeds, frames=True)
        mission = [make_env(c, family).reset(seed=s)[0]["mission"] for s in seeds]
        rows += list(zip(mission, success, shots))
    sheet = Image.new("RGB", (n_frames * (cell + gap) + gap, len(rows) * (cell + text_h + gap)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, (mission, ok, shots) in enumerate(rows):
        y0 = r * (cell + text_h + gap)
        outcome = f"{'solved' if ok else 'failed'} in {len(shots) - 1} steps"
        pen.text((gap, y0 + 2), f'"{mission}"', fill="black")
        pen.text((gap, y0 + 13), outcome, fill=(0, 140, 0) if ok else (200, 0, 0))
        picks = np.unique(np.linspace(0, len(shots) - 1, n_frames).round().astype(int))
        for k, i in enumerate(picks):
            frame = Image.fromarray(shots[i]).resize((cell, cell), Image.NEAREST)
            sheet.paste(frame, (gap + k * (cell + gap), y0 + text_h))
            pen.text((gap + k * (cell + gap) + 2, y0 + text_h + 2), f"t={i}", fill="white")
    sheet.save(path)


# train.py's defaults for this file: about 10 minutes on one CPU thread, three evaluations (start, middle, end)
TRAIN_DEFAULTS = dict(batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, max_iters=2000,
                      eval_interval=1000, eval_iters=5, log_interval=100, weight_decay=0.01)
