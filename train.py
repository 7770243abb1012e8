"""
Train any gaia model by name, from a laptop CPU to many GPUs.

    python train.py                                    # gpt2 on the built-in corpus, no download
    python train.py --model=llama --data=corpus.txt    # your text: a .txt file or a folder of them
    python train.py --model=jepa --data=images/        # a model that brings its own data: here a folder of images
    python train.py config/gpt2_124m.py --batch_size=8 # a config file, then overrides
    python train.py --help                             # every key, with default and type
    torchrun --standalone --nproc_per_node=8 train.py --model=llama   # DDP (see README for tp/fsdp)

`--model=NAME` imports NAME.py; its Config fields are keys beside the ones below (README: the model contract).
"""
import contextlib
import importlib
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
from time import perf_counter
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

import configurator
import distributed
import kernels
from configurator import ConfigError
from data import Batches, DataError, get_tokenizer, load_splits
from distributed import DistributedError

ROOT = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    model: str = "gpt2"              # a model file beside train.py: gpt2, llama, moe, mla, mamba, ...
    data: str = ""                   # a .txt file or a folder of .txt files (a model with its own data: what it reads); "" = built in
    tokenizer: str = "byte"          # byte (UTF-8 bytes, vocab 256) | gpt2 (tiktoken BPE) | PATH of a tokenizer.json
    out_dir: str = "out"
    cache_dir: str = ""              # where tokenized data is cached; "" = ~/.cache/gaia
    init_from: str = "scratch"       # scratch | resume (from out_dir) | a local Hugging Face model directory
    vocab_size: int | None = None    # None = the tokenizer's
    block_size: int = 128            # context length of each training sequence
    batch_size: int = 16             # sequences per micro-step (per process)
    gradient_accumulation_steps: int = 1
    max_iters: int = 800
    learning_rate: float = 2e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    lr_decay_iters: int | None = None  # None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 = no clipping
    optimizer: str = "adamw"         # adamw | muon (Muon for the blocks' matrices, AdamW for the rest: make_optimizer)
    muon_lr: float = 0.02            # Muon's peak lr; the schedule scales it as it scales learning_rate
    muon_momentum: float = 0.95      # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0   # Muon's decoupled weight decay (each step: w -= lr * muon_weight_decay * w)
    eval_interval: int = 200
    eval_iters: int = 10
    log_interval: int = 50
    always_save_checkpoint: bool = True  # False: save only when val loss improves
    device: str = "auto"             # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"              # auto (bfloat16 on GPUs that have it, else float16; float32 on cpu) | float32 | bfloat16 | float16
    compile: bool = False            # torch.compile the model
    kernels: str = os.environ.get("GAIA_KERNELS", "auto")  # fused ops (kernels.py): auto (Triton on GPUs) | triton | torch | cuda
    seed: int = 1337
    sample_tokens: int = 500         # length of the text sample at the end; 0 = none
    sample_prompt: str = "\n"
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    wandb_log: bool = False
    wandb_project: str = "gaia"
    wandb_run_name: str = ""         # "" = model name and time
    tensorboard_log: bool = False
    profile: bool = False            # trace iterations 5-9 (torch.profiler; on CUDA also cudaProfilerStart/Stop for nsys)
    tp: int = 1                      # tensor-parallel degree (under torchrun); the rest of the processes are data parallel
    fsdp: bool = False               # shard parameters, gradients and optimizer state with FSDP2 (under torchrun)

    def __post_init__(self):
        configurator.check_ranges(self, {
            "block_size": (self.block_size >= 1, "must be >= 1"),
            "batch_size": (self.batch_size >= 1, "must be >= 1"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, "must be >= 1"),
            "vocab_size": (self.vocab_size is None or self.vocab_size >= 1, "must be >= 1 (or None: the tokenizer's)"),
            "max_iters": (self.max_iters >= 0, "must be >= 0"),
            "learning_rate": (self.learning_rate > 0, "must be > 0"),
            "min_lr": (0 <= self.min_lr <= self.learning_rate, f"must be in [0, learning_rate={self.learning_rate:g}]"),
            "warmup_iters": (self.warmup_iters >= 0, "must be >= 0"),
            "lr_decay_iters": (self.lr_decay_iters is None or self.lr_decay_iters >= 1, "must be >= 1 (or None: max_iters)"),
            "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
            "beta1": (0 <= self.beta1 < 1, "must be in [0, 1)"),
            "beta2": (0 <= self.beta2 < 1, "must be in [0, 1)"),
            "grad_clip": (self.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
            "optimizer": (self.optimizer in OPTIMIZERS, f"is not one of {', '.join(OPTIMIZERS)}"),
            "muon_lr": (self.muon_lr > 0, "must be > 0"),
            "muon_momentum": (0 <= self.muon_momentum < 1, "must be in [0, 1)"),
            "muon_weight_decay": (self.muon_weight_decay >= 0, "must be >= 0"),
            "eval_interval": (self.eval_interval >= 1, "must be >= 1"),
            "eval_iters": (self.eval_iters >= 1, "must be >= 1"),
            "log_interval": (self.log_interval >= 1, "must be >= 1"),
            "sample_tokens": (self.sample_tokens >= 0, "must be >= 0 (0 = no sample)"),
            "tp": (self.tp >= 1, "must be >= 1"),
            "kernels": (self.kernels in kernels.BACKENDS and (self.kernels != "triton" or kernels.HAS_TRITON),
                        f"is not one of {', '.join(kernels.BACKENDS)}" if self.kernels not in kernels.BACKENDS
                        else "needs the triton package (pip install triton; Linux); or use --kernels=auto"),
            **device_rules(self),
            **sampling_rules(self),
        })
        if self.optimizer == "muon" and (self.fsdp or self.tp > 1):
            raise ConfigError(f"optimizer=muon cannot run with {'--fsdp=True' if self.fsdp else f'--tp={self.tp}'}: "
                              f"Newton-Schulz needs each whole matrix, and sharded (DTensor) parameters hold a slice; "
                              f"use DDP (torchrun without --tp/--fsdp), or --optimizer=adamw")


def device_rules(cfg):
    """The rules of the device and dtype keys, shared by train.py's and sample.py's configs."""
    return {"device": (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None,
                       "is not one of auto, cpu, cuda, cuda:N, mps"),
            "dtype": (cfg.dtype in ("auto", "float32", "bfloat16", "float16"), "is not one of auto, float32, bfloat16, float16")}


def sampling_rules(cfg):
    """The rules of the sampling keys, shared by train.py's and sample.py's configs."""
    return {"temperature": (cfg.temperature >= 0, "must be >= 0 (0 = greedy)"),
            "top_k": (cfg.top_k is None or cfg.top_k >= 1, "must be >= 1 (or None: no top-k filter)"),
            "top_p": (cfg.top_p is None or 0 < cfg.top_p <= 1, "must be in (0, 1] (or None: no nucleus filter)")}


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, incompatible checkpoint); the message says what to do."""


def first_line(error):
    """An exception as one line, for the error messages that quote what a library raised."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class Stopped(Exception):
    """The run stopped on Ctrl-C after saving a checkpoint; the message says how to continue."""


# ------------------------------------------------------------------------------------- models and checkpoints

def model_files():
    """The model files beside train.py: those that define a Model class at top level."""
    pattern = re.compile(r"^class Model\(", re.M)
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and pattern.search(open(os.path.join(ROOT, f)).read()))


def load_model_module(name):
    """--model=llama -> the module llama.py beside this file."""
    if not os.path.isfile(os.path.join(ROOT, f"{name}.py")) or name not in model_files():
        raise ConfigError(f"unknown model {name!r}; the model files here are: {', '.join(model_files())}")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(name)


def brings_own_data(module):
    """A model file that defines load_splits trains on its own data (images, episodes) instead of tokenized text."""
    return callable(getattr(module, "load_splits", None))


# train.py keys that only text models read: set for a model that brings its own data, each is refused in one line
# (unless the model's Config has a field of that name, e.g. a vision-language model's tokenizer)
TEXT_KEYS = ("tokenizer", "vocab_size", "block_size", "sample_tokens", "sample_prompt", "temperature", "top_k", "top_p")


def load_own_splits(module, path, config, cache_dir):
    """module.load_splits, whose ValueError (and any OSError reading the files) becomes one DataError line."""
    try:
        return module.load_splits(path, config, cache_dir)
    except (ValueError, OSError) as e:
        raise DataError(str(e) if isinstance(e, ValueError) else f"cannot read {path!r} ({first_line(e)})") from None


def to_device(batch, device):
    """A batch's tensors (alone or nested in tuples, lists, dicts) onto the device; on CUDA pinned first, so the
    copy runs while the GPU still computes the previous step."""
    if torch.is_tensor(batch):
        return batch.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(b, device) for b in batch)


CHECKPOINTS = ("ckpt.pt", "ckpt_meta.pt")  # a run's checkpoint: whole, or a sharded run's (its tensors in ckpt_dcp/)


def existing_checkpoint(out_dir):
    """The path of the run's checkpoint, or None."""
    return next((p for p in (os.path.join(out_dir, n) for n in CHECKPOINTS) if os.path.isfile(p)), None)


def load_checkpoint(out_dir, map_location="cpu"):
    """ckpt.pt of a run, or for a sharded (--tp/--fsdp) run its ckpt_meta.pt: everything but the tensors,
    which stay in ckpt_dcp/ until distributed.load_sharded reads them into a model of any layout."""
    path = existing_checkpoint(out_dir)
    if path is None:
        raise TrainingError(f"no checkpoint at {os.path.join(out_dir, 'ckpt.pt')}; train first, or point --out_dir "
                            f"at the run to resume")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, empty, or not written by torch.save: whatever torch raises
        raise TrainingError(f"{path} cannot be read ({first_line(e)}); it is truncated or not a gaia checkpoint. "
                            f"Resume from a good copy, or start a new run in another --out_dir (this file is left "
                            f"as it is)") from None
    if not isinstance(ckpt, dict) or "model_name" not in ckpt:
        raise TrainingError(f"{path} is not a gaia checkpoint (no model_name in it); point --out_dir at a "
                            f"gaia run, or load Hugging Face weights with --init_from=DIRECTORY")
    ckpt["path"] = path
    return ckpt


def save_checkpoint(path, state):
    """Write to a temp file, then rename: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_weights(model, state, path):
    """state -> model; a checkpoint whose tensor names or shapes do not fit this model file is refused in one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # names missing or unexpected, or shapes that differ
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        resized = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
        detail = (f"missing {missing[:2]}, unexpected {unexpected[:2]}" if missing or unexpected
                  else ", ".join(resized[:2]) or first_line(e))
        raise TrainingError(f"{path} does not fit {type(model).__module__}.py's parameters ({detail}): it was written by "
                            f"another version of the model file. Resume it with the gaia version that wrote it, or start "
                            f"a new run in another --out_dir") from None


def stored_config(module, ckpt):
    """The model config a checkpoint was written with, as keyword arguments of this model file's Config."""
    unknown = set(ckpt["model_config"]) - {f.name for f in fields(module.Config)}
    if unknown:  # e.g. a key the model file has since renamed
        raise TrainingError(f"{ckpt['path']} was written by another version of {module.__name__}.py: its config has "
                            f"{', '.join(sorted(unknown)[:3])}, which this file does not. Resume it with the gaia version "
                            f"that wrote it, or start a new run in another --out_dir")
    return dict(ckpt["model_config"])


def model_from_checkpoint(ckpt, module, out_dir, load_sharded=True, **changes):
    """The checkpoint's model; changes (e.g. dropout) are how to train, never what the weights are. A sharded
    checkpoint's tensors are read now, or (load_sharded=False) after train.py has parallelized the model."""
    model = module.Model(build_config(module, {**stored_config(module, ckpt), **changes}))
    if not ckpt.get("sharded"):
        load_weights(model, ckpt["model_state"], ckpt["path"])
    elif load_sharded:
        distributed.load_sharded(out_dir, model)
    return model


def rng_states():
    return dict(python=random.getstate(), numpy=[torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in np.random.get_state()],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    np.random.set_state(tuple(a.numpy() if torch.is_tensor(a) else a for a in s["numpy"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------- device, precision, MFU

# Dense peak FLOP/s of the tensor cores by device name and dtype (vendor datasheets; float32 = TF32 matmuls,
# which train.py enables). MFU is reported only for devices listed here.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},  # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
}


def peak_flops(device, dtype):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    # the longest key the name contains: "NVIDIA L40S" is an L40S, not an L4; "H100 PCIe" is not the SXM H100
    key = max((k for k in PEAK_FLOPS if k in name), key=len, default=None)
    return PEAK_FLOPS[key].get(dtype) if key else None


def pick_device(device):
    """auto -> the best device here; an explicit one must exist, or one line says what this machine has."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    usable = "--device=cpu" + (" or --device=mps" if has_mps else "") + " (or auto)"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU here"
            raise ConfigError(f"device={device} but {why}; use {usable}")
        n, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(f"device={device} but this machine has {n} CUDA GPU{'s' * (n != 1)} (cuda:0"
                              f"{f' .. cuda:{n - 1}' if n > 1 else ''}); pick one of them")
    if device == "mps" and not has_mps:
        raise ConfigError(f"device=mps but Apple's Metal (MPS) is not available here; use {usable}")
    return device


def device_type(device):
    """'cuda:1' -> 'cuda', 'cpu' -> 'cpu': what autocast, GradScaler and DeviceMesh take."""
    return device.split(":")[0]


def pick_dtype(dtype, device):
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    return dtype


def keep_freed_memory():
    """CPU training frees and reallocates the same activations every step. glibc hands large freed blocks back
    to the OS and page-faults them in again the next step (a few % of a small model's step here); PyTorch's CPU
    tuning guide swaps in jemalloc/tcmalloc for this. Telling glibc to keep them gets the same, in-process."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): leave the allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    trim = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap instead of returning it
    # blocks above the mmap threshold bypass the heap (and fault in afresh each time); 32 MiB is glibc's cap
    heap = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(trim and heap)


def nvtx(name, device):
    """A named range for Nsight Systems on CUDA; nothing elsewhere."""
    return torch.cuda.nvtx.range(name) if device.startswith("cuda") else contextlib.nullcontext()


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def muon_parameters(model):
    """The names of the matrices Muon trains: the weight of every nn.Linear inside the blocks (a module path through
    an `h` list: transformer.h.0.attn.q_proj). Not the embeddings, not lm_head, not norms, biases or other tensors
    (Keller Jordan: Muon is for the hidden layers' matrices; the input and output layers keep AdamW)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "h" in name.split(".")}


def make_optimizer(model, cfg, fused=True):
    """AdamW; matrices (and embeddings) decay, biases and norm gains do not. Fused kernel where supported
    (not for sharded DTensor parameters: the foreach kernel is the one tested with them).
    optimizer=muon: torch.optim.Muon for muon_parameters (Nesterov momentum, then 5 Newton-Schulz steps that
    orthogonalise the update, scaled by sqrt(max(1, rows / cols))), AdamW for the rest, stepped as one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = muon_parameters(model) if cfg.optimizer == "muon" else set()
    params = [p for n, p in named if n not in hidden]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    adamw = None
    if fused:
        try:
            adamw = torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # this device or dtype has no fused AdamW
            pass
    adamw = adamw or torch.optim.AdamW(groups, **kwargs)
    if not hidden:
        return adamw
    # muon=True marks the group whose lr follows the schedule scaled to muon_lr (group_lr)
    muon = torch.optim.Muon([{"params": [p for n, p in named if n in hidden], "muon": True}], lr=cfg.muon_lr,
                            momentum=cfg.muon_momentum, nesterov=True, weight_decay=cfg.muon_weight_decay)
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW as one optimizer for the loop, GradScaler and checkpoints: param_groups
    lists both, step and zero_grad do both, state_dict holds both."""

    def __init__(self, muon, adamw):
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self):
        return [group for o in self.optimizers.values() for group in o.param_groups]

    def step(self):
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def group_lr(group, lr, cfg):
    """A param group's lr at the schedule's lr (lr_at, which runs from learning_rate): AdamW's groups take it as it
    is, Muon's the same curve scaled to peak at muon_lr."""
    return lr * cfg.muon_lr / cfg.learning_rate if group.get("muon") else lr


# ------------------------------------------------------------------------------------- metrics and dashboard

def to_loggable(value):
    if torch.is_tensor(value):
        return value.item() if value.dim() == 0 else value.detach().float().cpu().tolist()
    return value


class MetricsLog:
    """metrics.jsonl (one row per logged iteration and per eval), a dashboard PNG redrawn at each eval,
    and wandb / tensorboard when asked for."""

    def __init__(self, cfg, out_dir, resume_iter, run_config, enabled=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "dashboard.png")
        self.enabled = enabled  # under torchrun only rank 0 writes
        self.wandb = self.tb = None
        if not enabled:
            return
        if resume_iter is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):  # drop rows a crashed run wrote after its last checkpoint
            rows = [r for r in self.rows() if r["iter"] <= resume_iter]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if cfg.wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=run_config)
            except Exception as e:  # not installed, not logged in, no network: wandb raises many types
                raise ConfigError(f"wandb_log=True but wandb could not start ({first_line(e)}); run `wandb login`, "
                                  f"or log offline with WANDB_MODE=offline (then `wandb sync`), or drop --wandb_log") from None
        if cfg.tensorboard_log:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard_log=True needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def rows(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def log(self, row):
        if not self.enabled:
            return
        row = {k: to_loggable(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iter" and v is not None}
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["iter"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["iter"])

    def plot(self):
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.rows()
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_loss" in r]
        rate = next((k for k in ("tokens_per_s", "samples_per_s") if steps and k in steps[-1]), None)
        maps = {k: v for r in steps for k, v in r.items() if isinstance(v, list) and v and isinstance(v[0], list)}
        # the model's own scalars: metrics() beside the loss (expert_imbalance, target_std), evaluate() at each eval
        known = {"iter", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "tflops", "mfu", "train_loss", "val_loss"}
        step_scalars = sorted({k for r in steps for k, v in r.items() if k not in known and isinstance(v, (int, float))})
        eval_scalars = sorted({k for r in evals for k, v in r.items() if k not in known and isinstance(v, (int, float))})
        panels = [p for p in ("loss", "lr", rate) if p] + list(maps) + ["model metrics"] * bool(step_scalars) + \
            ["evaluation"] * bool(eval_scalars)
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        ax = dict(zip(panels, axes[0]))
        ax["loss"].plot([r["iter"] for r in steps], [r["loss"] for r in steps], label="train (per iter)", alpha=0.6)
        if evals:
            ax["loss"].plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
            ax["loss"].plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
        ax["loss"].set(title="loss", xlabel="iter")
        ax["loss"].legend()
        ax["lr"].plot([r["iter"] for r in steps], [r["lr"] for r in steps])
        ax["lr"].set(title="learning rate", xlabel="iter")
        if rate:
            ax[rate].plot([r["iter"] for r in steps], [r[rate] for r in steps])
            ax[rate].set(title=rate.replace("_per_s", "/s"), xlabel="iter")
        for name, grid in maps.items():  # e.g. expert_load: layers x experts
            im = ax[name].imshow(np.array(grid), aspect="auto", cmap="viridis")
            ax[name].set(title=f"{name} (last logged iter)", xlabel="expert" if "expert" in name else "column",
                         ylabel="layer" if "expert" in name else "row")
            fig.colorbar(im, ax=ax[name])
        for title, scalars, source in (("model metrics", step_scalars, steps), ("evaluation", eval_scalars, evals)):
            for k in scalars:
                points = [(r["iter"], r[k]) for r in source if isinstance(r.get(k), (int, float))]
                ax[title].plot(*zip(*points), "o-" if source is evals else "-", label=k)
            if scalars:
                ax[title].set(title=title, xlabel="iter")
                ax[title].legend()
        fig.tight_layout()
        fig.savefig(self.png + ".tmp.png", dpi=80)
        plt.close(fig)
        os.replace(self.png + ".tmp.png", self.png)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------- configuration

def configure(argv):
    """argv -> (TrainConfig, model module, model Config, checkpoint or None, explicit keys). Raises ConfigError."""
    files, overrides = configurator.split_args(argv)
    init_from = configurator.peek(files, overrides, "init_from", TrainConfig.init_from)
    out_dir = configurator.peek(files, overrides, "out_dir", TrainConfig.out_dir)
    name = configurator.peek(files, overrides, "model", None)  # None: not set by the user
    ckpt = None
    if init_from == "resume":
        ckpt = load_checkpoint(out_dir)
        if name is not None and name != ckpt["model_name"]:
            raise TrainingError(f"{out_dir}/ckpt.pt holds a {ckpt['model_name']} model, not {name}; "
                                f"use --model={ckpt['model_name']} or another --out_dir")
        name = ckpt["model_name"]
    name = name or TrainConfig.model
    module = load_model_module(name)
    train_keys = configurator.key_table(TrainConfig)
    for k, v in getattr(module, "TRAIN_DEFAULTS", {}).items():  # the model's own starting point, e.g. its batch size
        if k not in train_keys:
            raise ConfigError(f"{name}.py's TRAIN_DEFAULTS sets {k}, which is not a train.py key; see python train.py --help")
        train_keys[k] = (v, train_keys[k][1])
    model_keys = {k: v for k, v in configurator.key_table(module.Config).items() if k not in train_keys}
    if "help" in overrides:
        configurator.print_help("train.py", [("train.py keys", train_keys), (f"{name}.py model keys", model_keys)])
        sys.exit(0)
    values, explicit = configurator.resolve(files, overrides, {**train_keys, **model_keys})
    own_data = brings_own_data(module)
    if own_data:
        meaningless = sorted(explicit & set(TEXT_KEYS) - {f.name for f in fields(module.Config)})
        if meaningless:
            raise ConfigError(f"{meaningless[0]} means nothing for {name}: it trains on its own data ({name}.py's "
                              f"load_splits), not on tokenized text; drop --{meaningless[0]} (from the command line or "
                              f"config file)")
    if ckpt is not None:  # a resumed run continues the stored one, except for what the user sets now
        stored = {"optimizer": "adamw", **ckpt["train_config"], **ckpt["model_config"]}  # older checkpoints: AdamW
        # what the weights are, what the token ids mean, and whose state the optimizer holds cannot change mid-run
        for k in explicit & (set(ckpt["model_config"]) | {"tokenizer", "optimizer"}) - {"dropout", "block_size", "vocab_size"}:
            if values[k] != stored[k]:
                raise TrainingError(f"{out_dir}/ckpt.pt was trained with {k}={stored[k]!r}, not {values[k]!r}; "
                                    f"drop --{k} to resume it, or start a new run in another --out_dir")
        layout_keys = {"out_dir", "tp", "fsdp", "device", "compile"}  # how to run, not what: never restored
        values.update({k: v for k, v in stored.items() if k not in explicit and k in values and k not in layout_keys})
        values.update(init_from="resume", out_dir=out_dir)
    pretrained = values["init_from"] not in ("scratch", "resume")
    if pretrained and not own_data and "tokenizer" not in explicit and os.path.isfile(os.path.join(values["init_from"], "config.json")):
        values["tokenizer"] = hf_dir_tokenizer(values["init_from"])  # the token ids its weights were trained on
    cfg = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)})
    if ckpt is not None and ckpt["iter_num"] >= cfg.max_iters:
        raise TrainingError(f"{ckpt['path']} is at iter {ckpt['iter_num']}, and max_iters={cfg.max_iters}: nothing to "
                            f"train. Raise --max_iters (e.g. --max_iters={2 * ckpt['iter_num']}) to train further, "
                            f"or sample it: python sample.py --out_dir={out_dir}")
    # vocab_size=None (train.py's default: the tokenizer's) leaves the model's default until the tokenizer is known
    model_cfg = build_config(module, {f.name: values[f.name] for f in fields(module.Config)
                                      if f.name in values and not (f.name == "vocab_size" and values[f.name] is None)})
    return cfg, module, model_cfg, ckpt, explicit


def load_pretrained(module, path):
    """A local Hugging Face directory into the model file's Model; whatever goes wrong is one line naming it."""
    if not hasattr(module.Model, "from_pretrained"):
        raise ConfigError(f"{module.__name__}.py has no Hugging Face interop (no Model.from_pretrained), so "
                          f"init_from={path!r} cannot load; use scratch or resume")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"init_from={path!r} is neither scratch, resume, nor a Hugging Face model directory with a "
                          f"config.json")
    try:
        return module.Model.from_pretrained(path)
    except ValueError as e:  # another architecture, an unsupported option: the model file says which
        raise ConfigError(str(e)) from None
    except Exception as e:  # a truncated safetensors file, a broken config.json: whatever the readers raise
        raise ConfigError(f"{path} cannot be loaded ({first_line(e)}); check its config.json and safetensors files, "
                          f"e.g. download them again") from None


def hf_dir_tokenizer(path):
    """The tokenizer a Hugging Face model directory says it was trained with: its tokenizer.json, or the gaia
    tokenizer that export.py recorded in its config.json. Without either, one line asks for --tokenizer."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    try:
        with open(os.path.join(path, "config.json")) as f:
            recorded = json.load(f).get("gaia_tokenizer")
    except (OSError, ValueError):
        recorded = None  # load_pretrained names what is wrong with the directory
    if recorded:
        return recorded
    raise ConfigError(f"{path} has no tokenizer.json, so the token ids its weights expect are unknown; pass "
                      f"--tokenizer=gpt2, --tokenizer=byte or --tokenizer=PATH of its tokenizer.json")


def build_config(module, values):
    """The model's Config; its __post_init__ checks the ranges and raises ValueError, which becomes a ConfigError."""
    try:
        return module.Config(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg, module, model_cfg, ckpt, explicit, vocab_size):
    """The model to train: from scratch, from the checkpoint being resumed, or from a Hugging Face directory.
    vocab_size is the tokenizer's; None for a model that brings its own data (its Config sizes itself)."""
    if ckpt is not None:
        changes = {"dropout": model_cfg.dropout} if "dropout" in explicit and "dropout" in ckpt["model_config"] else {}
        model = model_from_checkpoint(ckpt, module, cfg.out_dir, load_sharded=False, **changes)
    elif cfg.init_from == "scratch":
        filled = {}
        if hasattr(model_cfg, "vocab_size") and vocab_size is not None:
            if "vocab_size" in explicit and cfg.vocab_size is not None:
                if cfg.vocab_size < vocab_size:
                    raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the {cfg.tokenizer} tokenizer's "
                                      f"{vocab_size}; drop --vocab_size or raise it")
                vocab_size = cfg.vocab_size  # e.g. 50304, a multiple of 64, is faster on GPUs
            filled["vocab_size"] = vocab_size
        if hasattr(model_cfg, "block_size") and vocab_size is not None:
            filled["block_size"] = cfg.block_size
        model = module.Model(build_config(module, {**asdict(model_cfg), **filled}))  # validated again, filled in
    else:
        model = load_pretrained(module, cfg.init_from)
        settable = {"dropout", *getattr(module, "LOSS_WEIGHTS", ())}  # how to train, not what the weights are
        changes = {}
        for k in explicit & {f.name for f in fields(model.config)} - {"block_size", "vocab_size"}:
            if k in settable:
                changes[k] = getattr(model_cfg, k)
            elif getattr(model.config, k) != getattr(model_cfg, k):
                raise ConfigError(f"{cfg.init_from} has {k}={getattr(model.config, k)!r}, not {getattr(model_cfg, k)!r}; "
                                  f"drop --{k} when fine-tuning a pretrained model")
        if changes:  # the modules were built from the config (nn.Dropout keeps its p): rebuild, then take the weights
            pretrained = model
            model = module.Model(replace(pretrained.config, **changes))
            model.load_state_dict(pretrained.state_dict())
    mc = model.config
    if vocab_size is None:  # a model that brings its own data: its Config sizes the vocabulary and context
        return model
    if getattr(mc, "vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"the model's vocab_size={mc.vocab_size} is smaller than the {cfg.tokenizer} tokenizer's "
                          f"{vocab_size}; use a model with a larger vocabulary"
                          + (" or --tokenizer=byte (256)" if cfg.tokenizer != "byte" and mc.vocab_size >= 256 else ""))
    if getattr(mc, "block_size", cfg.block_size) < cfg.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the model's maximum context {mc.block_size}; "
                          f"lower --block_size")
    return model


# ------------------------------------------------------------------------------------- the training loop

def prepare_out_dir(out_dir):
    """The run's folder must be writable before any training: a bad --out_dir fails now, not at the first checkpoint."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir!r} is a file, not a folder; point --out_dir at a folder (made if missing)")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir={out_dir!r} ({e.strerror}); point --out_dir at a writable folder") from None


def keep_best_checkpoint(cfg, layout):
    """With always_save_checkpoint=False, ckpt.pt is the best-val model: before a Ctrl-C checkpoint takes its place,
    move it to ckpt_best.pt. Returns that path, or None. (Sharded runs keep one checkpoint, the latest.)"""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.always_save_checkpoint or layout.sharded or not layout.master or not os.path.isfile(path):
        return None
    best = os.path.join(cfg.out_dir, "ckpt_best.pt")
    os.replace(path, best)
    return best


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to finish its step, save a checkpoint and stop; a second Ctrl-C quits
    at once. Under torchrun every rank must stop at the same step, so the ranks agree on it after each step."""

    def __init__(self, layout):
        self.layout, self.asked, self.previous = layout, False, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.asked and self.layout.master:
            print("\nstopping after this step to save a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        self.asked = True

    def requested(self):
        return distributed.any_rank(self.asked, self.layout)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def loss_only(model_class):
    """The keyword that asks a model's forward for its loss alone (text models: the LM head and the loss fused, no
    logits held); {} for a model without one."""
    return {"need_logits": False} if "need_logits" in inspect.signature(model_class.forward).parameters else {}


@torch.no_grad()
def estimate_loss(model, splits, make_batches, cfg, autocast, device, layout, forward_kwargs):
    """Mean loss over eval_iters batches of each split. The batches come from a generator seeded the
    same way every time, so evals are comparable and never disturb the training data order or RNG;
    data-parallel ranks each take their slice of every batch, so the result is the same at any world size."""
    model.eval()
    out = {}
    for name, split in splits.items():
        batches = make_batches(split, cfg.seed + 1000)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = to_device(batches.next(), device)
            with autocast:
                _, loss = model(x, y, **forward_kwargs)
            losses[k] = loss.item()
        out[name] = distributed.all_mean(losses.mean().item(), layout)
    model.train()
    return out


def train(argv):
    cfg, module, model_cfg, ckpt, explicit = configure(argv)
    layout = distributed.layout_from_env(cfg.tp, cfg.fsdp)
    device = pick_device(cfg.device)
    if device == "cuda" and layout.world > 1:
        device = f"cuda:{layout.local_rank}"
        torch.cuda.set_device(device)
    dtype = pick_dtype(cfg.dtype, device)
    dev_type = device_type(device)
    if cfg.kernels == "triton" and dev_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernels=triton runs Triton kernels, which need a CUDA device, and this run is on {device}; "
                          f"use --kernels=auto (Triton on GPUs, the torch path elsewhere) or --kernels=torch")
    kernels.set_backend(cfg.kernels)
    forward_kwargs = loss_only(module.Model)
    say = print if layout.master else (lambda *a, **k: None)
    if ckpt is not None and ckpt.get("sharded") is None and layout.sharded:
        raise TrainingError(f"{cfg.out_dir}/ckpt.pt is an unsharded checkpoint; resume it without --tp/--fsdp "
                            f"(one process or DDP), or start a new run")
    if layout.master:
        prepare_out_dir(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if dev_type == "cpu":
        keep_freed_memory()
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    own_data = brings_own_data(module)  # images, episodes, ...: the model file's load_splits and Batches
    tokenizer = None if own_data else get_tokenizer(cfg.tokenizer)
    model = build_model(cfg, module, model_cfg, ckpt, explicit, None if own_data else tokenizer.vocab_size)
    distributed.validate(model, layout)  # before any collective: a bad layout fails on every rank, none hangs
    cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gaia")
    if own_data:
        model_config = model.config
        train_split, val_split = load_own_splits(module, cfg.data, model_config, cache_dir)

        def make_batches(split, seed):
            return module.Batches(split, model_config, cfg.batch_size, seed, layout.dp_rank, layout.dp)
    else:
        train_split, val_split = load_splits(cfg.data, tokenizer, cache_dir, cfg.block_size)

        def make_batches(split, seed):
            return Batches(split, cfg.block_size, cfg.batch_size, seed, layout.dp_rank, layout.dp)
    distributed.init(layout, dev_type)
    raw_model = model.to(device)
    model = distributed.parallelize(raw_model, layout, device)
    optimizer = make_optimizer(raw_model, cfg, fused=not layout.sharded)
    scaler = torch.amp.GradScaler(dev_type, enabled=(dtype == "float16"))
    autocast = (torch.autocast(dev_type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())
    train_batches = make_batches(train_split, cfg.seed)
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        if ckpt.get("sharded"):
            distributed.load_sharded(cfg.out_dir, raw_model, optimizer)
        else:
            optimizer.load_state_dict(ckpt["optimizer_state"])
        scaler.load_state_dict(ckpt["scaler_state"])
        iter_num, best_val, evaluated = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("evaluated", True)
        train_batches.seek(ckpt["data_state"])  # redraws the batch the stopped run had fetched
        set_rng_states(ckpt["rng"])
        say(f"resuming {ckpt['model_name']} from {cfg.out_dir} at iter {iter_num}")
    ckpt_evaluated = ckpt is not None and evaluated  # the resumed run already evaluated its last iteration
    ckpt = None  # free its memory
    if cfg.compile:
        model = torch.compile(model)

    # throughput is counted in tokens for text, in examples (images, episodes' steps) for a model with its own data
    if own_data:
        unit, per_seq = "samples", 1
        flops_per_unit = getattr(raw_model, "flops_per_sample", lambda: None)()
    else:
        unit, per_seq, flops_per_unit = "tokens", cfg.block_size, raw_model.flops_per_token(cfg.block_size)
    units_per_iter = cfg.batch_size * per_seq * cfg.gradient_accumulation_steps * layout.dp
    flops_per_iter = flops_per_unit * units_per_iter if flops_per_unit else None
    peak = peak_flops(device, dtype)
    peak = peak * layout.world if peak else None
    n_params = sum(p.numel() for p in raw_model.parameters())  # a DTensor's numel is its global size
    say(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, {device}, {dtype}, {len(train_split):,} train {unit}")
    say(f"global batch: {cfg.batch_size} {'examples' if own_data else f'sequences x {cfg.block_size} tokens'} x "
        f"{cfg.gradient_accumulation_steps} accumulation steps x {layout.dp} data-parallel ranks = {units_per_iter:,} "
        f"{unit} per iteration"
        + (f" ({layout.world} processes: dp={layout.dp}, tp={layout.tp}, fsdp={layout.fsdp})" if layout.world > 1 else ""))
    run_config = {**asdict(cfg), **asdict(raw_model.config)}
    log = MetricsLog(cfg, cfg.out_dir, iter_num if cfg.init_from == "resume" else None, run_config, layout.master)
    after_step = getattr(raw_model, "after_optimizer_step", None)
    model_metrics = getattr(raw_model, "metrics", None)
    model_evaluation = getattr(module, "evaluate", None)  # named scores (probe accuracy, success rate) at each eval
    splits = {"train": train_split, "val": val_split}

    def checkpoint(val_loss, evaluated=True):
        """evaluated: whether iter_num's eval has run, so a resumed run neither repeats nor skips it."""
        meta = dict(model_name=cfg.model, model_config=asdict(raw_model.config), train_config=asdict(cfg),
                    scaler_state=scaler.state_dict(), iter_num=iter_num, best_val_loss=best_val, val_loss=val_loss,
                    rng=rng_states(), data_state=train_batches.position, tokenizer=None if own_data else cfg.tokenizer,
                    evaluated=evaluated)
        if layout.sharded:
            distributed.save_sharded(cfg.out_dir, raw_model, optimizer, meta, layout)
        elif layout.master:
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
                meta, model_state=raw_model.state_dict(), optimizer_state=optimizer.state_dict()))

    def evaluate():
        nonlocal best_val
        losses = estimate_loss(model, splits, make_batches, cfg, autocast, device, layout, forward_kwargs)
        scores = {}
        if model_evaluation is not None:  # every rank runs it (a sharded model's forward needs them all); rank 0 logs
            raw_model.eval()
            scores = {k: float(v) for k, v in model_evaluation(raw_model, train_split, val_split).items()}
            raw_model.train()
        say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + "".join(f", {k} {v:.4f}" for k, v in scores.items()))
        log.log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], **scores})
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        if (improved or cfg.always_save_checkpoint) and iter_num > 0:
            checkpoint(losses["val"])
        log.plot()

    profiler = None
    if cfg.profile:
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=4, warmup=1, active=5, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(os.path.join(cfg.out_dir, f"trace_rank{layout.rank}.json"
                                                                        if layout.world > 1 else "trace.json")))
        profiler.start()
    profile_start = iter_num + 5

    x, y = to_device(train_batches.next(), device)
    t0 = perf_counter()
    timed_iters, timed_s = 0, 0.0  # training time since the last log line (evals excluded)
    started = iter_num
    stop = StopRequest(layout)
    try:
        while iter_num < cfg.max_iters:
            if iter_num % cfg.eval_interval == 0 and not (iter_num == started and ckpt_evaluated):
                evaluate()
                t0 = perf_counter()  # eval time is not training time
            if cfg.profile and dev_type == "cuda" and iter_num in (profile_start, profile_start + 5):
                (torch.cuda.cudart().cudaProfilerStart if iter_num == profile_start else torch.cuda.cudart().cudaProfilerStop)()
            lr = lr_at(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group_lr(group, lr, cfg)
            for micro in range(cfg.gradient_accumulation_steps):
                last = micro == cfg.gradient_accumulation_steps - 1
                with distributed.no_grad_sync(model, last):
                    with nvtx("forward", device), autocast:
                        _, loss = model(x, y, **forward_kwargs)
                        loss = loss / cfg.gradient_accumulation_steps
                    with nvtx("data", device):
                        x, y = to_device(train_batches.next(), device)  # fetched while the device works on this step
                    with nvtx("backward", device):
                        scaler.scale(loss).backward()
            with nvtx("optimizer step", device):
                scaler.unscale_(optimizer)
                grad_norm = distributed.clip_grad_norm(list(raw_model.parameters()), cfg.grad_clip or float("inf"))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                # steps done, and the length of the run's schedule (the lr's): an EMA's momentum follows it too
                after_step(iter_num + 1, cfg.lr_decay_iters or cfg.max_iters)
            loss_value = loss.item() * cfg.gradient_accumulation_steps  # syncs with the device
            iter_num += 1
            t1 = perf_counter()
            timed_iters, timed_s, t0 = timed_iters + 1, timed_s + t1 - t0, t1
            if profiler is not None:
                profiler.step()
            if not math.isfinite(loss_value):
                kept = existing_checkpoint(cfg.out_dir)
                raise TrainingError(
                    f"loss is {loss_value} at iter {iter_num}; stopping. "
                    + (f"The last good checkpoint is kept at {kept}. " if kept else "")
                    + f"Try a lower --learning_rate (now {cfg.learning_rate:g})"
                    + (", or --dtype=float32" if dtype != "float32" else "")
                    + (", or a smaller --grad_clip" if cfg.grad_clip == 0 or cfg.grad_clip > 1 else ""))
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                loss_value = distributed.all_mean(loss_value, layout)  # the whole global batch's loss
                dt, timed_iters, timed_s = timed_s / timed_iters, 0, 0.0  # mean over the interval: one slow step moves it little
                rate = units_per_iter / dt
                achieved = flops_per_iter / dt if flops_per_iter else None
                speed = ("" if achieved is None else f", mfu {100 * achieved / peak:.2f}%" if peak
                         else f", {achieved / 1e12:.3f} TFLOP/s")
                say(f"iter {iter_num}: loss {loss_value:.4f}, time {dt * 1000:.2f}ms, {rate:,.0f} "
                    f"{'tok' if unit == 'tokens' else unit}/s{speed}")
                row = {"iter": iter_num, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), f"{unit}_per_s": rate,
                       "tflops": achieved / 1e12 if achieved else None, "mfu": achieved / peak if achieved and peak else None}
                if model_metrics is not None:
                    row.update(model_metrics())
                log.log(row)
            if iter_num < cfg.max_iters and stop.requested():  # the last step goes on to the final eval and sample
                kept = keep_best_checkpoint(cfg, layout)
                checkpoint(None, evaluated=False)
                log.close()  # wandb and tensorboard flush what they hold
                raise Stopped(f"stopped at iter {iter_num}; saved {existing_checkpoint(cfg.out_dir)}"
                              + (f" (the best-val checkpoint moved to {kept})" if kept else "")
                              + f". Continue with: python train.py --init_from=resume --out_dir={cfg.out_dir}"
                              if layout.master else "")
    finally:
        stop.restore()  # train() also runs inside tests and notebooks: leave their Ctrl-C alone
    if profiler is not None:
        profiler.stop()
    if iter_num > started or cfg.max_iters == 0:
        evaluate()
        if iter_num > 0 and existing_checkpoint(cfg.out_dir) is None:
            checkpoint(None)
    log.close()
    say(f"metrics: {log.path}, dashboard: {log.png}")
    if own_data:  # the model's picture in place of a text sample
        if getattr(module, "draw", None) is not None and layout.master and not layout.sharded:
            raw_model.eval()
            module.draw(raw_model, val_split, os.path.join(cfg.out_dir, "picture.png"))
            say(f"picture: {os.path.join(cfg.out_dir, 'picture.png')}")
    elif cfg.sample_tokens > 0 and layout.master and not layout.sharded:
        from sample import generate_text
        text = generate_text(raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.temperature,
                             cfg.top_k, cfg.top_p, device, autocast)
        say("sample:\n" + text)
    elif cfg.sample_tokens > 0 and layout.sharded:
        say(f"sample with: python sample.py --out_dir={cfg.out_dir}")
    if layout.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 may still be sampling: no rank tears gloo/NCCL down under another
        torch.distributed.destroy_process_group()
    return raw_model


def cli(run, argv=None):
    """A script's command line: every mistake the project can name ends in one `error:` line and exit code 1, and
    Ctrl-C in exit code 130 (the shell's code for it). train.py, sample.py and export.py all end here."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError, TrainingError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stopped as e:
        if str(e):  # rank 0's
            print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)  # before training, or a second Ctrl-C
        sys.exit(130)
    except BrokenPipeError:  # the output went into a pipe that closed (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        sys.exit(141)


def main(argv=None):
    cli(train, argv)


if __name__ == "__main__":
    main()
