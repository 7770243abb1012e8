"""
The architectures side by side: each text model trained by train.py on the same data, at the same non-embedding
parameter count (active parameters for a mixture of experts) and with the same budget of tokens or of training
time. Draws one PNG (val loss against tokens, training time and training FLOPs) and writes one markdown table.

    python bench.py compare                                          # 6 models at gpt2 4x128's size, 200k tokens each
    python bench.py compare --models=gpt2,mamba --budget=time:60     # 60 s of training each
    python bench.py compare --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --budget=tokens:50M \
        --data=corpus.txt --tokenizer=gpt2 --device=cuda             # GPT-2 124M's size; or under torchrun
    python bench.py compare --help                                   # every key

Sizing: the target is --params, or else gpt2's count at the size keys (--n_layer, --n_head, --n_embd). Every model
keeps those keys (n_embd aside) and its own defaults, and the search moves its width: the n_embd its Config accepts
whose count is nearest the target, then, where the Config has one and the user did not set it, intermediate_size
(the feed-forward width, in steps of 8) to close the rest. "Embedding" here is every vocabulary-sized table: token,
position and value embeddings and the LM head (tied or not), so the count is the same for every model.
Other train.py keys (--batch_size, --learning_rate, --device, ...) go to every run, model keys (--n_kv_head,
--variant, ...) to the models whose Config has them.
"""
import contextlib
import functools
import inspect
import json
import math
import os
import re
import sys
from argparse import Namespace
from dataclasses import dataclass, fields

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import configurator  # noqa: E402
import distributed  # noqa: E402
import kernels  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError  # noqa: E402
from data import get_tokenizer  # noqa: E402


@dataclass
class CompareConfig:
    models: str = "gpt2,llama,moe,mla,mamba,speedrun"  # text model files, comma-separated
    budget: str = "tokens:200k"  # per model: tokens:N (k, M, G suffixes) or time:SECONDS of training
    params: str = ""             # target non-embedding (active) parameters, e.g. 10M; "" = gpt2's at the size keys
    tolerance: float = 0.03      # each model's count must be within this fraction of the target
    evals: int = 10              # val loss points per run (train.py's eval_interval = iterations / evals)
    out_dir: str = "out/compare"


# train.py keys this script sets itself, and where the user says what they mean
SET_HERE = {"model": "--models", "max_iters": "--budget", "eval_interval": "--evals", "log_interval": None,
            "init_from": None}
# train.py defaults that differ here (the user's keys still win): every model gets the same batches (a model's
# TRAIN_DEFAULTS may not change them), half train.py's batch for twice the steps in a short budget, shorter evals
# (each model is scored on the same val batches, so the comparison is paired), no text sample at the end
TRAIN_DEFAULTS = {"batch_size": 8, "block_size": 128, "eval_iters": 5, "sample_tokens": 0}


def parse_count(key, text):
    """'300k' -> 300000, '2.5M', '1e6', '60' -> a positive number."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)([kMG]?)", str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{key}={text!r} is not a positive number; e.g. --{key}=300k (k, M, G suffixes)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def parse_budget(text):
    """'tokens:300k' -> ('tokens', 300000.0); 'time:60' -> ('time', 60.0)."""
    kind, _, amount = text.partition(":")
    if kind not in ("tokens", "time") or not amount:
        raise ConfigError(f"budget={text!r} is neither tokens:N nor time:SECONDS; e.g. --budget=tokens:300k "
                          f"or --budget=time:60")
    return kind, parse_count("budget", amount)


def text_model(name):
    """The model file, which must read text: a model that brings its own data has no tokens to match."""
    module = train.load_model_module(name)
    if train.brings_own_data(module):
        raise ConfigError(f"compare trains text models on the same tokens; {name} brings its own data "
                          f"({name}.py's load_splits); the text models here are: "
                          f"{', '.join(m for m in train.model_files() if not train.brings_own_data(train.load_model_module(m)))}")
    return module


def counts(model):
    """(parameters, non-embedding, active). Embeddings are the vocabulary-sized tables: every nn.Embedding and the
    LM head (a tied head is one tensor). Active leaves out the routed experts a token does not use: the model's own
    num_params(active=True), where it has that keyword."""
    total = sum(p.numel() for p in model.parameters())
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)] + [model.lm_head]
    embedding = sum(p.numel() for p in {id(p): p for m in tables for p in m.parameters()}.values())
    num_params = getattr(model, "num_params", None)
    inactive = (num_params() - num_params(active=True)
                if num_params is not None and "active" in inspect.signature(num_params).parameters else 0)
    return total, total - embedding, total - embedding - inactive


def active_params(module, config):
    """The active count of module.Model(config), from shapes alone: meta tensors hold no memory, and the model's
    _init_weights (one per model, the contract says) is skipped, so a search builds dozens of models in seconds."""
    shapes = type("Model", (module.Model,), {"_init_weights": lambda self, *args: None})
    with torch.device("meta"):
        return counts(shapes(config))[2]


# Config fields that are widths: they keep their default's ratio to n_embd (per head: to n_embd / n_head) as the
# search moves n_embd, unless the user sets them, so a model sized up is its default shape, larger. State sizes
# (d_state) and Mamba-2's head_dim (P, which the paper keeps across sizes) stay as they are.
WIDTHS = ("intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank")
HEAD_WIDTHS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def size(module, values, target, tolerance, fixed=()):
    """values: the model's Config keys. Returns the keys to set (n_embd, the WIDTHS it has) with the active count
    nearest the target, or raises if it is not within tolerance. n_embd is a multiple of 8 (whole tiles for a GPU's
    matmuls) where that comes within the tolerance, else any width the Config accepts."""
    default = {f.name: f.default for f in fields(module.Config)}
    follow = [k for k in WIDTHS + HEAD_WIDTHS if isinstance(default.get(k), int) and k not in fixed]

    def shape(w):  # the default's proportions at width w, each width even
        scale = {k: w / default["n_embd"] * (default["n_head"] / values["n_head"] if k in HEAD_WIDTHS else 1)
                 for k in follow}
        return {"n_embd": w, **{k: max(2, round(default[k] * scale[k] / 2) * 2) for k in follow}}

    def config(**change):
        try:
            return module.Config(**{**values, **change})
        except ValueError:  # a width the model refuses (heads not whole, RoPE's odd head_dim)
            return None

    @functools.lru_cache(maxsize=None)
    def count(w, ff=None):
        return active_params(module, config(**{**shape(w), **({} if ff is None else {"intermediate_size": ff})}))

    def accepted(w, step, q):  # the nearest multiple of q from w, upwards (step 1) or down (-1), the Config accepts
        w = -(-w // q) * q if step > 0 else w // q * q
        for w in range(w, w + 1024 * q * step, q * step):
            if w < 1:
                return None
            if config(**shape(w)) is not None:
                return w
        return None

    def nearest(q):
        lo, hi = 1, values["n_embd"]
        while count(accepted(hi, 1, q)) < target:  # the count grows with the width: double, then bisect
            lo, hi = hi, 2 * hi
            if hi > 1 << 17:
                raise ConfigError(f"{module.__name__}: no width up to n_embd={hi} reaches {target:,.0f} parameters")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if count(accepted(mid, 1, q)) >= target else (mid + 1, hi)
        up = accepted(hi, 1, q)
        w = min((w for w in (up, accepted(up - 1, -1, q)) if w is not None), key=lambda w: abs(count(w) - target))
        sized = shape(w)
        ff = getattr(config(**sized), "intermediate_size", None)
        if isinstance(ff, int) and "intermediate_size" not in fixed:
            # the count is affine in the feed-forward width: one more point gives the slope, then the step of 8 nearest
            c0, c1 = count(w, ff), count(w, ff + 8)
            sized["intermediate_size"] = max(8, round((ff + 8 * (target - c0) / (c1 - c0)) / 8) * 8)
        return sized, count(w, sized.get("intermediate_size"))

    if accepted(values["n_embd"], 1, 1) is None:  # no width suits the user's other keys: the model says why
        train.build_config(module, values)
    for q in (8, 1):
        sized, n = nearest(q)
        if abs(n - target) <= tolerance * target:
            return sized
    raise ConfigError(f"{module.__name__} comes no nearer than {n:,} parameters to the target {target:,.0f} "
                      f"(n_embd={sized['n_embd']}, off by {abs(n - target) / target:.1%} > tolerance={tolerance}); "
                      f"raise --params or --tolerance, or change --n_head")


def parse(argv):
    """argv -> (CompareConfig, {model: (module, train.py argv without the budget)}, target). Raises ConfigError."""
    files, overrides = configurator.split_args(argv)
    if files:
        raise ConfigError(f"compare takes --key=value arguments, not config files ({files[0]})")
    own = configurator.key_table(CompareConfig)
    train_keys = {k: (TRAIN_DEFAULTS.get(k, default), tp) for k, (default, tp)
                  in configurator.key_table(train.TrainConfig).items() if k not in own and k not in SET_HERE}
    names = [n for n in configurator.peek([], overrides, "models", CompareConfig.models).split(",") if n]
    if not names:
        raise ConfigError("models='' names no model; e.g. --models=gpt2,llama")
    modules = {name: text_model(name) for name in names}
    model_keys = {}
    for module in modules.values():
        model_keys.update({k: v for k, v in configurator.key_table(module.Config).items() if k not in train_keys})
    if "help" in overrides:
        configurator.print_help("bench.py compare", [("compare keys", own), ("train.py keys (every run)", train_keys),
                                                      ("model keys (the models that have them)", model_keys)])
        sys.exit(0)
    for key in overrides:
        if key in SET_HERE:
            raise ConfigError(f"{key} is set by compare for every run" + (f"; use {SET_HERE[key]}=" if SET_HERE[key] else ""))
        if key not in own and key not in train_keys and key not in model_keys:
            raise configurator.unknown_key_error(key, {**own, **train_keys, **model_keys}, "on the command line")
    cc = CompareConfig(**configurator.resolve([], {k: v for k, v in overrides.items() if k in own}, own)[0])
    parse_budget(cc.budget)
    if not 0 < cc.tolerance < 1 or cc.evals < 1:
        raise ConfigError(f"tolerance={cc.tolerance} must be in (0, 1) and evals={cc.evals} >= 1")

    def model_values(module, exclude=()):  # the user's keys that this model's Config has, checked by its Config
        table = configurator.key_table(module.Config)
        user = {k: v for k, v in overrides.items() if k in table and k not in exclude}
        return user, configurator.resolve([], user, table)[0]

    if cc.params:
        target = parse_count("params", cc.params)
    else:  # gpt2 at the size keys is the reference
        gpt2 = train.load_model_module("gpt2")
        target = active_params(gpt2, train.build_config(gpt2, model_values(gpt2)[1]))
    runs = {}
    for name, module in modules.items():
        user, values = model_values(module, exclude=("n_embd",))
        sized = size(module, values, target, cc.tolerance, fixed=user)
        argv = [f"--model={name}", f"--out_dir={os.path.join(cc.out_dir, name)}", "--log_interval=1",
                *[f"--{k}={v}" for k, v in {**TRAIN_DEFAULTS, **overrides}.items() if k in train_keys],
                *[f"--{k}={v}" for k, v in {**user, **sized}.items()]]
        runs[name] = (module, argv)
    return cc, runs, target


def seconds_per_iter(argv):
    """A time budget becomes iterations: a few training steps of the model on random tokens (bench.py train's
    timing, one micro-batch: forward, backward, clip, AdamW), times the accumulation steps. Under torchrun this leaves
    out the gradient all-reduce, so the runs take longer than the budget: the table says by how much."""
    cfg, module, model_cfg, _, explicit = train.configure(argv)
    device = train.pick_device(cfg.device)
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)  # as train.py does: NCCL's all-reduce in agree() uses the current device
    kernels.set_backend(cfg.kernels)
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, module, model_cfg, None, explicit, get_tokenizer(cfg.tokenizer).vocab_size).to(device)
    timing = Namespace(batch_size=cfg.batch_size, block_size=cfg.block_size, warmup=2, iters=5, compile=cfg.compile,
                       fsdp=False, tp=1)
    return bench.time_training(model, model.config, timing, device, train.pick_dtype(cfg.dtype, device)) * \
        cfg.gradient_accumulation_steps


def agree(value, layout, device):
    """Under torchrun every rank must run the same iterations: the mean of the ranks' measurements."""
    if layout.world == 1:
        return value
    distributed.init(layout, train.device_type(train.pick_device(device)))  # train.train ends the group: join again
    return distributed.all_mean(value, layout)


def curve(path, tokens_per_iter, flops_per_token):
    """metrics.jsonl -> the evals as (tokens, training seconds, FLOPs, val loss), and the total training seconds.
    Training time is the sum of train.py's per-iteration times (log_interval=1: each row's tokens/s is one step),
    so evals, checkpoints and the dashboard are left out."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    seconds, elapsed = {0: 0.0}, 0.0
    for r in rows:
        if "tokens_per_s" in r:
            elapsed += tokens_per_iter / r["tokens_per_s"]
            seconds[r["iter"]] = elapsed
    points = [(r["iter"] * tokens_per_iter, seconds[r["iter"]], r["iter"] * tokens_per_iter * flops_per_token,
               r["val_loss"]) for r in rows if "val_loss" in r]
    return points, elapsed


def compare(argv):
    cc, runs, target = parse(argv)
    kind, amount = parse_budget(cc.budget)
    results = {}
    for name, (module, argv) in runs.items():
        cfg = train.configure([*argv, "--max_iters=1"])[0]  # the run's train.py keys, the model's TRAIN_DEFAULTS in
        layout = distributed.layout_from_env(cfg.tp, cfg.fsdp)
        tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * layout.dp
        if kind == "tokens":
            iters = math.ceil(amount / tokens_per_iter)
        else:
            iters = max(1, round(amount / agree(seconds_per_iter([*argv, "--max_iters=1"]), layout, cfg.device)))
        argv = [*argv, f"--max_iters={iters}", f"--eval_interval={max(1, math.ceil(iters / cc.evals))}"]
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
            model = train.train(argv)
        if not layout.master:
            continue
        points, seconds = curve(os.path.join(cfg.out_dir, "metrics.jsonl"), tokens_per_iter,
                                model.flops_per_token(cfg.block_size))
        shape = f"{model.config.n_layer}x{model.config.n_embd}" + (
            f", ff {model.config.intermediate_size}" if "intermediate_size" in {f.name for f in fields(model.config)} else "")
        results[name] = dict(points=points, seconds=seconds, counts=counts(model), shape=shape,
                             tokens_per_s=iters * tokens_per_iter / seconds,
                             cache=model.make_cache(1, cfg.block_size).bytes_per_token)
        print(f"{name} ({shape}): {iters} iterations of {tokens_per_iter:,} tokens, {seconds:.1f} s of training, "
              f"val loss {points[-1][3]:.4f}", flush=True)
    if results:
        report(cc, results, target, kind, amount, cfg, layout.dp)


def report(cc, results, target, kind, amount, cfg, dp):
    """The markdown table (printed and written beside the PNG) and the PNG's three panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    budget = f"{amount:,.0f} tokens" if kind == "tokens" else f"{amount:g} s of training"
    lines = [f"Each model: {budget}, steps of {cfg.batch_size} x {cfg.block_size} tokens"
             f"{f' x {cfg.gradient_accumulation_steps} accumulation steps' if cfg.gradient_accumulation_steps > 1 else ''}"
             f"{f' x {dp} data-parallel ranks' if dp > 1 else ''}, target {target / 1e6:.3g}M "
             f"non-embedding (active) parameters within {cc.tolerance:.0%}; {train.pick_device(cfg.device)}, "
             f"{torch.get_num_threads()} thread(s).", "",
             "| model | shape | parameters | non-embedding | active | tokens/s | training time | val loss | "
             "KV cache B/token |", "|" + " --- |" * 9]
    for name, r in results.items():
        total, non_embedding, active = r["counts"]
        lines.append(f"| {name} | {r['shape']} | {total:,} | {non_embedding:,} | {active:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['seconds']:.1f} s | {r['points'][-1][3]:.4f} | {r['cache']:,} |")
    table = "\n".join(lines)
    png = os.path.join(cc.out_dir, "compare.png")
    with open(os.path.join(cc.out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for name, r in results.items():
        for i, ax in enumerate(axes):
            ax.plot([p[i] for p in r["points"]], [p[3] for p in r["points"]], "o-", ms=3, label=name)
    for ax, xlabel in zip(axes, ("tokens", "training time (s), evals left out", "training FLOPs (flops_per_token)")):
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
        if ax is not axes[1]:
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 200k tokens, 1 T FLOPs
    # the first eval (every model near ln(vocab) at iteration 0) stays above the frame, so the differences show
    later = [p[3] for r in results.values() for p in r["points"][1:]]
    if later:
        pad = 0.05 * (max(later) - min(later)) or 0.05
        axes[0].set_ylim(min(later) - pad, max(later) + pad)
    axes[0].set(ylabel="val loss")
    axes[0].legend()
    fig.suptitle(f"{target / 1e6:.3g}M non-embedding (active) parameters, {budget} each")
    fig.tight_layout()
    fig.savefig(png, dpi=70)
    plt.close(fig)
    print(table)
    print(f"table: {os.path.join(cc.out_dir, 'compare.md')}, plot: {png}")


if __name__ == "__main__":
    train.cli(compare)
