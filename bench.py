"""
Benchmarks: numbers come from here, never from timed tests. Each prints the command that reproduces it.

    python bench.py train  --model=gpt2 [--n_layer=12 ...]   # training tokens/s and MFU on random tokens
    torchrun --standalone --nproc_per_node=2 bench.py train  # tokens/s per rank and scaling efficiency
    python bench.py decode --model=llama                     # decode tokens/s with and without a KV cache
    python bench.py decode --model=llama --sweep=n_kv_head=8,2,1 --n_head=8 --n_embd=256   # MHA vs GQA vs MQA
    python bench.py cpu-anchor --anchor=PATH/nanogpt_cpu_bench.sh --data=tinyshakespeare.txt   # vs nanoGPT, same shapes
    python bench.py time-to-loss --anchor=PATH/nanogpt_cpu_bench.sh --data=tinyshakespeare.txt [--ablate]
                                                             # wall time to nanoGPT's val loss: the speedrun recipe
    python bench.py moe | mamba | mla | gelu [--help]        # a model's own benchmark (benchmarks/*.py), e.g.
                                                             # one layer against transformers' with the same weights
    python bench.py kernels [--ops=rms_norm,attention ...]   # kernels.py's ops: eager vs torch.compile vs Triton
    python bench.py compare [--models=gpt2,mamba --budget=time:60 ...]   # train the text models at one size, one
                                                             # budget: val loss vs tokens, time, FLOPs; a table
    python bench.py ... --help                               # the options of a benchmark

Model keys (--n_layer=12, --n_kv_head=2, ...) are the model's Config fields, checked like train.py's.
"""
import argparse
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import configurator
import distributed
import kernels
import train

ROOT = os.path.dirname(os.path.abspath(__file__))


def build(args, extra):
    """The model named by --model, with its Config fields overridden by --key=value arguments."""
    module = train.load_model_module(args.model)
    if train.brings_own_data(module):  # train and decode feed random token ids
        raise configurator.ConfigError(f"bench.py times text models on random tokens; {args.model} brings its own data: "
                                       f"time it with python train.py --model={args.model} --max_iters=50 (its log line's "
                                       f"samples/s)")
    files, overrides = configurator.split_args(extra)
    values, _ = configurator.resolve(files, overrides, configurator.key_table(module.Config))
    if "block_size" in values and "block_size" not in overrides:
        # room for the prompt and every new token: past block_size, generation re-encodes its window each step
        decode_len = getattr(args, "context", 0) + getattr(args, "new_tokens", 0) + 1
        values["block_size"] = max(values["block_size"], getattr(args, "block_size", 0), decode_len)
    return module.Model(train.build_config(module, values))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_training(model, params, args, device, dtype):
    """Median seconds per training iteration (forward, backward, clip, AdamW) on fixed random tokens."""
    optimizer = train.make_optimizer(model, train.TrainConfig(learning_rate=1e-4), fused=not args.fsdp and args.tp == 1)
    step_model = torch.compile(model) if args.compile else model
    device_type = train.device_type(device)
    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    vocab = params.vocab_size
    x = torch.randint(0, vocab, (args.batch_size, args.block_size), device=device)
    y = torch.randint(0, vocab, (args.batch_size, args.block_size), device=device)
    times = []
    for i in range(args.warmup + args.iters):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            _, loss = step_model(x, y, **train.loss_only(type(model)))
        loss.backward()
        distributed.clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(args, extra):
    """One process: tokens/s, TFLOP/s and MFU. Under torchrun: rank 0 first times the model alone, then every
    rank times the parallel model (DDP, or --tp / --fsdp); per-rank tokens/s over the solo figure is the
    scaling efficiency."""
    layout = distributed.layout_from_env(args.tp, args.fsdp)
    device = train.pick_device(args.device)
    if device == "cuda" and layout.world > 1:
        device = f"cuda:{layout.local_rank}"
        torch.cuda.set_device(device)
    dtype = train.pick_dtype(args.dtype, device)
    kernels.set_backend(args.kernels)
    if device == "cpu":
        train.keep_freed_memory()  # as train.py does
    torch.manual_seed(0)
    model = build(args, extra)
    distributed.validate(model, layout)
    device_type = train.device_type(device)
    distributed.init(layout, device_type)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token(args.block_size)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    peak = train.peak_flops(device, dtype)
    tokens = args.batch_size * args.block_size  # per rank and iteration

    def report(label, dt, ranks_per_batch=1):
        flops = flops_per_token * tokens / dt / ranks_per_batch
        print(f"{label}: {args.model} ({n_params / 1e6:.1f}M params) on {name}, {dtype}, compile={args.compile}, "
              f"B={args.batch_size} T={args.block_size}: median {dt * 1000:.1f} ms/iter over {args.iters} iters, "
              f"{tokens / dt / ranks_per_batch:,.0f} tokens/s, {flops / 1e12:.2f} TFLOP/s"
              + (f", MFU {100 * flops / peak:.1f}%" if peak else ""))

    if layout.world == 1:
        report("1 process", time_training(model, model.config, args, device, dtype))
        return
    import copy
    import torch.distributed as dist
    solo = None
    if layout.master:  # the baseline: the same model, alone, while the other ranks wait
        solo = time_training(copy.deepcopy(model), model.config, argparse.Namespace(**{**vars(args), "tp": 1, "fsdp": False}),
                             device, dtype)
        report("1 process (rank 0 alone)", solo)
    dist.barrier()
    dt = time_training(distributed.parallelize(model, layout, device), model.config, args, device, dtype)
    if layout.master:
        # tp ranks share one batch: per rank, a tp group's tokens are divided among its tp ranks
        report(f"{layout.world} processes (dp={layout.dp}, tp={layout.tp}, fsdp={layout.fsdp}), per rank", dt, layout.tp)
        print(f"scaling efficiency: {solo / (dt * layout.tp):.2f} (per-rank tokens/s over the solo run's; "
              f"total {tokens * layout.dp / dt:,.0f} tokens/s)")
    dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def bench_decode(args, extra):
    """Greedy decode tokens/s with the model's cache and without one (a full forward over the whole sequence
    for every new token). --sweep=n_kv_head=8,2,1 builds one model per value (e.g. MHA vs GQA vs MQA of the
    same size) and alternates them over --repeats rounds, keeping each one's best: load elsewhere on the
    machine then hits every model alike."""
    device = train.pick_device(args.device)
    key, _, values = (args.sweep or "=").partition("=")
    variants = [[f"--{key}={v}"] for v in values.split(",")] if key else [[]]
    models = []
    for variant in variants:
        torch.manual_seed(0)
        models.append(build(args, extra + variant).to(device).eval())
    prompt = torch.randint(0, models[0].config.vocab_size, (args.batch_size, args.context), device=device)

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def recompute(model, n):  # no cache: every new token runs the model over the whole sequence so far
        idx = prompt
        for _ in range(n):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)

    best = [[float("inf"), float("inf"), float("inf")] for _ in models]  # cached, no cache, prefill
    for _ in range(args.repeats):
        for i, model in enumerate(models):
            model.generate(prompt, 2, temperature=0)  # warm-up
            # decode time alone: the best prefill (with the first token) is taken from the best whole run
            best[i][0] = min(best[i][0], timed(lambda: model.generate(prompt, 1 + args.new_tokens, temperature=0)))
            best[i][2] = min(best[i][2], timed(lambda: model.generate(prompt, 1, temperature=0)))
            if args.no_cache_tokens:
                best[i][1] = min(best[i][1], timed(lambda: recompute(model, args.no_cache_tokens)))
    print(f"{args.model} decode on {device}, batch {args.batch_size}, prompt {args.context} tokens, "
          f"{args.new_tokens} new tokens after the prefill with the cache ({args.no_cache_tokens} without), best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'variant':<22} {'params':>11} {'cache B/token':>13} {'tok/s cached':>13} {'tok/s no cache':>15}")
    for variant, model, (whole, uncached, prefill) in zip(variants, models, best):
        cached = whole - prefill  # <= 0 when the machine's noise outweighs a few decode steps: no figure then
        per_token = f"{model.make_cache(1, 1).bytes_per_token:,}"  # 0 for a fixed-size state (Mamba)
        no_cache = f"{args.batch_size * args.no_cache_tokens / uncached:,.1f}" if args.no_cache_tokens else "-"
        cached_rate = f"{args.batch_size * args.new_tokens / cached:,.1f}" if cached > 0 else "- (noise)"
        print(f"  {(variant[0][2:] if variant else 'default'):<22} {sum(p.numel() for p in model.parameters()):>11,} "
              f"{per_token:>13} {cached_rate:>13} {no_cache:>15}")


# a training step's line, nanoGPT's format and train.py's: `iter N: loss L, time Tms, ...`
STEP_TIME = re.compile(r"^iter (\d+): .*?time ([\d.]+)ms", re.M)


def median_ms(log):
    """Median ms/iter of the step lines in log, skipping the first 5."""
    ms = [float(t) for i, t in STEP_TIME.findall(log) if int(i) >= 5]
    return statistics.median(ms)


# nanoGPT's CPU anchor (nanogpt_cpu_bench.sh): byte vocab, 4 layers, 128 wide, T=128, B=16, fp32, eager, AdamW 1e-3
# with 10 warm-up steps and a cosine to 1e-4. nanoGPT's train.py and gaia's take these keys under the same names.
ANCHOR_SHAPES = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=128", "--batch_size=16", "--bias=True",
                 "--dropout=0.0", "--device=cpu", "--dtype=float32", "--compile=False", "--gradient_accumulation_steps=1",
                 "--warmup_iters=10", "--learning_rate=1e-3", "--min_lr=1e-4", "--grad_clip=1.0"]


def check_anchor_files(args):
    for key in ("anchor", "data"):
        if not os.path.isfile(getattr(args, key)):
            raise configurator.ConfigError(f"--{key}={getattr(args, key)} is not a file; pass the path of " + (
                "nanogpt_cpu_bench.sh (the pinned nanoGPT speed script)" if key == "anchor" else "a text file"))


def bench_cpu_anchor(args, extra):
    """The pinned nanoGPT and gaia's train.py, same shapes (ANCHOR_SHAPES), alternated `rounds` times on this
    machine; the ratio is what to compare across machines."""
    shapes = ["--model=gpt2", "--tokenizer=byte", *ANCHOR_SHAPES, "--eval_interval=100000", "--eval_iters=1",
              "--log_interval=1", "--sample_tokens=0", f"--max_iters={args.iters}", f"--lr_decay_iters={args.iters}",
              f"--data={args.data}"]
    check_anchor_files(args)
    results = {"nanoGPT": [], "gaia": []}
    for _ in range(args.rounds):
        out = subprocess.run(["bash", args.anchor, args.data, str(args.iters)], capture_output=True, text=True, check=True).stdout
        results["nanoGPT"].append(float(re.search(r"median ([\d.]+) ms/iter", out).group(1)))
        out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *shapes, "--out_dir=/tmp/gaia_cpu_anchor"],
                             capture_output=True, text=True, check=True).stdout
        results["gaia"].append(round(median_ms(out), 1))
    nano, gaia = statistics.median(results["nanoGPT"]), statistics.median(results["gaia"])
    # each round's two runs are back to back, so a slow spell of a shared machine hits both: the median of the
    # per-round ratios is the steadier figure
    paired = statistics.median(n / g for n, g in zip(results["nanoGPT"], results["gaia"]))
    tok = 16 * 128
    print(f"nanoGPT: {nano:.1f} ms/iter ({tok / nano * 1000:,.0f} tokens/s), runs {results['nanoGPT']}")
    print(f"gaia:    {gaia:.1f} ms/iter ({tok / gaia * 1000:,.0f} tokens/s), runs {results['gaia']}")
    rounds = ", ".join(f"{n / g:.2f}" for n, g in zip(results["nanoGPT"], results["gaia"]))
    print(f"gaia / nanoGPT tokens/s per round: {rounds}")
    print(f"gaia / nanoGPT tokens/s: {nano / gaia:.2f}x (ratio of medians), {paired:.2f}x (median of per-round ratios)")


def train_until(command, cwd, target=None):
    """Runs a training command (nanoGPT's train.py or gaia's: both print `iter k: loss L, time Tms` after each step
    and `step k: train loss A, val loss V` at each eval, k steps done) and returns (seconds of each step in order,
    [(k, val loss)]); stops it at the first eval at or under `target`."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    steps, evals, lines = [], [], []
    for line in proc.stdout:
        lines.append(line)
        if m := STEP_TIME.match(line):
            steps.append(float(m[2]) / 1000)
        elif m := re.match(r"step (\d+): .*val loss ([\d.]+)", line):
            evals.append((int(m[1]), float(m[2])))
            if target is not None and evals[-1][0] > 0 and evals[-1][1] <= target:  # trained to it, not born there
                proc.kill()
                break
    if proc.wait() != 0 and not (evals and target is not None and evals[-1][1] <= target):
        raise RuntimeError(f"{' '.join(command)} failed:\n" + "".join(lines[-20:]))
    return steps, evals


def training_seconds(steps, k):
    """Wall time of the first k steps, evals excluded. The first step's time is replaced by the second's: nanoGPT's
    includes its first eval, and both pay one-off warm-up there."""
    return sum([steps[1], *steps[1:k]]) if k > 1 else steps[0] * k


# gaia's runs against nanoGPT: the recipe, and (--ablate) the recipe with one piece removed or added. RoPE is not
# ablated: speedrun.py has no other position signal to fall back on.
RECIPE = ["config/speedrun.py"]
ABLATIONS = {"- Muon (AdamW 3e-3 for every weight)": ["--optimizer=adamw", "--learning_rate=3e-3", "--min_lr=3e-4"],
             "- QK-norm": ["--qk_norm=False"], "- ReLU² (tanh GELU)": ["--relu2=False"],
             "- zero-init projections and head": ["--zero_init=False"], "- logit soft-cap": ["--softcap=0"],
             "+ value embeddings (2 tables)": ["--value_embeds=2"], "+ U-net skips": ["--unet=True"]}


def bench_time_to_loss(args, extra):
    """Each round: the pinned nanoGPT trains --nano_iters steps at its anchor shapes; its val loss then is the
    round's target and its training time (evals excluded) the time to reach it. Then gaia's gpt2 at the same
    shapes and schedule, and the speedrun recipe (config/speedrun.py with a --speedrun_iters schedule; --ablate:
    each piece removed in turn) train with an eval every --eval_every steps until one is at or under the target.
    Rounds alternate, so a slow spell of the machine hits every run of a round; the median of the per-round ratios
    (nanoGPT's time over the run's) is the figure."""
    check_anchor_files(args)
    work = tempfile.mkdtemp(prefix="gaia_time_to_loss_")
    nano = os.path.join(work, "nanogpt")
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(args.anchor)), "nanogpt"), nano)
    os.makedirs(os.path.join(nano, "data", "bytes"))
    raw = np.fromfile(args.data, dtype=np.uint8).astype(np.uint16)  # nanogpt_cpu_bench.sh's byte dataset
    n = int(0.9 * len(raw))
    raw[:n].tofile(os.path.join(nano, "data", "bytes", "train.bin"))
    raw[n:].tofile(os.path.join(nano, "data", "bytes", "val.bin"))
    with open(os.path.join(nano, "data", "bytes", "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 256}, f)
    iters = args.nano_iters
    nano_cmd = [sys.executable, "train.py", "--dataset=bytes", "--out_dir=out", *ANCHOR_SHAPES, f"--max_iters={iters}",
                f"--lr_decay_iters={iters}", f"--eval_interval={iters}", f"--eval_iters={args.nano_eval_iters}",
                "--log_interval=1", "--always_save_checkpoint=False", "--wandb_log=False"]
    gaia = [sys.executable, os.path.join(ROOT, "train.py")]
    evals = [f"--eval_interval={args.eval_every}", f"--eval_iters={args.eval_iters}", "--log_interval=1",
             "--sample_tokens=0", f"--data={args.data}", f"--out_dir={os.path.join(work, 'gaia')}",
             "--always_save_checkpoint=False"]
    # gaia's gpt2 at nanoGPT's shapes and schedule, evaluated once at the end as nanoGPT is: its time for the same
    # steps, and its loss there
    same = ["--model=gpt2", "--tokenizer=byte", *ANCHOR_SHAPES, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            f"--eval_interval={iters}"]
    runs = {"gaia gpt2, nanoGPT's shapes and steps": same}
    recipe = [*RECIPE, f"--max_iters={args.speedrun_iters}", f"--lr_decay_iters={args.speedrun_iters}"]
    runs["speedrun recipe (config/speedrun.py)"] = recipe
    if args.ablate:
        runs.update({name: recipe + keys for name, keys in ABLATIONS.items()})
    table = {name: [] for name in ["nanoGPT", *runs]}  # per round: (seconds, steps, val loss) or None
    for r in range(args.rounds):
        steps, nano_evals = train_until(nano_cmd, nano)
        k, target = nano_evals[-1]
        table["nanoGPT"].append((training_seconds(steps, k), k, target))
        print(f"round {r + 1}: nanoGPT {k} steps in {table['nanoGPT'][-1][0]:.1f} s, val loss {target:.4f} (the target)",
              flush=True)
        for name, keys in runs.items():
            steps, got = train_until([*gaia, *evals, *keys, *extra], ROOT, None if keys is same else target)
            k, val = got[-1]
            reached = (k > 0 and val <= target) or keys is same  # the same steps as nanoGPT: timed whatever its loss
            table[name].append((training_seconds(steps, k), k, val) if reached else None)
            print(f"  {name}: " + (f"{k} steps, {table[name][-1][0]:.1f} s, val loss {val:.4f}" if reached
                                   else f"not at {target:.4f} in {k} steps (best {min(v for _, v in got):.4f})"),
                  flush=True)
    print(f"\ntime to nanoGPT's val loss after {iters} steps, {args.rounds} rounds, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); ratio = nanoGPT's time / the run's, per round")
    print("| run | steps | val loss | seconds per round | median ratio (per round) |\n| --- | --- | --- | --- | --- |")
    nano_s = [s for s, _, _ in table["nanoGPT"]]
    for name, results in table.items():
        ratios = [n / res[0] for n, res in zip(nano_s, results) if res is not None]
        steps = sorted({res[1] for res in results if res is not None})
        seconds = ", ".join("-" if res is None else f"{res[0]:.1f}" for res in results)
        losses = ", ".join("-" if res is None else f"{res[2]:.3f}" for res in results)
        ratio = "-" if not ratios else f"**{statistics.median(ratios):.2f}x** ({', '.join(f'{x:.2f}' for x in ratios)})"
        print(f"| {name} | {'/'.join(map(str, steps)) or 'not reached'} | {losses} | {seconds} | {ratio} |")
    shutil.rmtree(work, ignore_errors=True)


MODEL_BENCHMARKS = {"moe": "moe_layer.py", "mamba": "mamba_layer.py", "mla": "mla_cache.py", "gelu": "gelu_cpu.py",
                    "kernels": "kernel_ops.py", "compare": "compare.py"}


def main():
    if len(sys.argv) > 1 and sys.argv[1] in MODEL_BENCHMARKS:  # a model's own benchmark script, with its own options
        import runpy
        path = os.path.join(ROOT, "benchmarks", MODEL_BENCHMARKS[sys.argv[1]])
        if int(os.environ.get("RANK", 0)) == 0:  # compare runs under torchrun too
            print("command: python bench.py " + " ".join(sys.argv[1:]))
        sys.argv = [path, *sys.argv[2:]]
        runpy.run_path(path, run_name="__main__")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("train", help="training tokens/s and MFU on random tokens")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kernels", default="auto", choices=kernels.BACKENDS, help="kernels.py's path (train.py's key)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (under torchrun)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (under torchrun)")
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("decode", help="decode tokens/s with and without the KV cache")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--context", type=int, default=64, help="prompt length")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--no_cache_tokens", type=int, default=16, help="tokens decoded without the cache (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", default="", help="KEY=V1,V2,...: one model per value of a model key")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=bench_decode)
    p = sub.add_parser("cpu-anchor", help="gaia vs the pinned nanoGPT on the CPU, same shapes")
    p.add_argument("--anchor", required=True, help="path of nanogpt_cpu_bench.sh, the pinned nanoGPT's speed script")
    p.add_argument("--data", required=True, help="a text file both train on, e.g. tinyshakespeare.txt")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(fn=bench_cpu_anchor)
    p = sub.add_parser("time-to-loss", help="wall time to nanoGPT's val loss: nanoGPT, gaia's gpt2, the speedrun recipe")
    p.add_argument("--anchor", required=True, help="path of nanogpt_cpu_bench.sh (its nanogpt/ folder is trained)")
    p.add_argument("--data", required=True, help="a text file all runs train on, e.g. tinyshakespeare.txt")
    p.add_argument("--nano_iters", type=int, default=300, help="nanoGPT's steps; its val loss then is the target")
    p.add_argument("--nano_eval_iters", type=int, default=200, help="batches in nanoGPT's val loss (its default)")
    p.add_argument("--speedrun_iters", type=int, default=150, help="the recipe's schedule length (lr decay)")
    p.add_argument("--eval_every", type=int, default=5, help="gaia's runs: steps between evals")
    p.add_argument("--eval_iters", type=int, default=20, help="gaia's runs: batches per eval")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ablate", action="store_true", help="also the recipe with each piece removed (or added) in turn")
    p.set_defaults(fn=bench_time_to_loss)
    args, extra = parser.parse_known_args()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if int(os.environ.get("RANK", 0)) == 0:
        print("command: python bench.py " + " ".join(sys.argv[1:]))
    try:
        args.fn(args, extra)
    except configurator.ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
