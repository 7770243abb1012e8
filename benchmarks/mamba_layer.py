"""Benchmark of mamba.py: forward + backward of one mixer layer at T=1024 against transformers' own PyTorch path
(MambaMixer / Mamba2Mixer without the CUDA kernels) holding the same weights, on the CPU, in the same run; and the
time per generated token at context 64 vs 2048, which a recurrent state keeps flat.

    python bench.py mamba                       # both variants
    python bench.py mamba --variant=mamba2 --threads=1
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mamba  # noqa: E402


def best_time(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_mixer(config):
    """transformers' mixer for the same shapes, and its forward as used in training (no cache)."""
    import transformers
    transformers.logging.set_verbosity_error()  # "falling back to the PyTorch implementation": that is the point
    common = dict(hidden_size=config.n_embd, state_size=config.d_state, num_hidden_layers=1, expand=config.expand,
                  conv_kernel=config.d_conv, use_bias=config.bias, use_conv_bias=config.conv_bias)
    if config.variant == "mamba1":
        from transformers.models.mamba.modeling_mamba import MambaMixer
        return MambaMixer(transformers.MambaConfig(**common, time_step_rank=config.dt_rank), 0)
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    heads = config.expand * config.n_embd // config.head_dim
    return Mamba2Mixer(transformers.Mamba2Config(**common, num_heads=heads, head_dim=config.head_dim,
                                                 n_groups=config.n_groups, chunk_size=config.chunk_size), 0)


def bench_layer(config, batch, seq_len, reps, hf_reps):
    torch.manual_seed(0)
    ours = mamba.Model(config).transformer.h[0].mixer.train()
    theirs = hf_mixer(config).train()
    theirs.load_state_dict(ours.state_dict())  # the same names and shapes: strict loading checks both
    x = torch.randn(batch, seq_len, config.n_embd)
    grad = torch.randn(batch, seq_len, config.n_embd)

    def step(mixer):
        xi = x.clone().requires_grad_()
        y = mixer(xi)
        y.backward(grad)
        return y.detach(), xi.grad

    y_ours, g_ours = step(ours)  # also the warm-up
    t_ours = best_time(lambda: step(ours), reps)
    t0 = time.perf_counter()
    y_hf, g_hf = step(theirs)  # timed too: transformers' Mamba-1 path takes seconds, a warm-up changes nothing
    t_hf = time.perf_counter() - t0
    if hf_reps > 1:
        t_hf = best_time(lambda: step(theirs), hf_reps - 1)  # after the warm-up
    diff = max((y_ours - y_hf).abs().max().item(), (g_ours - g_hf).abs().max().item())
    return t_ours, t_hf, diff


@torch.no_grad()
def bench_decode(config, contexts, new_tokens):
    torch.manual_seed(0)
    model = mamba.Model(config).eval()
    rows = []
    for ctx in contexts:
        cache = model.make_cache(1, ctx + new_tokens + 1)
        logits, _ = model(torch.randint(0, config.vocab_size, (1, ctx)), cache=cache)  # prefill, parallel path
        token = logits[:, -1:].argmax(-1)
        model(token, cache=cache)  # warm-up step
        times = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            logits, _ = model(token, cache=cache)
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
        per_token = sorted(times)[len(times) // 2]  # the median: a shared machine's hiccups do not move it
        rows.append((ctx, per_token, cache.nbytes))
    return rows


def bench_mamba(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for variant in (["mamba1", "mamba2"] if args.variant == "both" else [args.variant]):
        config = mamba.Config(variant=variant, vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                              d_state=args.d_state or (16 if variant == "mamba1" else 64), head_dim=args.head_dim,
                              n_groups=args.n_groups, chunk_size=args.chunk_size)
        shape = f"n_embd={config.n_embd} d_state={config.d_state}" + \
            (f" head_dim={config.head_dim} n_groups={config.n_groups} chunk={config.chunk_size}" if variant == "mamba2" else "")
        print(f"\n{variant} ({shape})")
        hf_reps = args.hf_reps or (1 if variant == "mamba1" else args.reps + 1)
        t_ours, t_hf, diff = bench_layer(config, args.batch, args.seq_len, args.reps, hf_reps)
        print(f"  one layer fwd+bwd, B={args.batch} T={args.seq_len}:  gaia {t_ours * 1e3:9.1f} ms   "
              f"transformers (PyTorch path) {t_hf * 1e3:9.1f} ms   speed-up {t_hf / t_ours:6.1f}x   "
              f"max |diff| {diff:.1e}")
        for ctx, per_token, state_bytes in bench_decode(config, args.contexts, args.new_tokens):
            print(f"  decode ({config.n_layer} layers, B=1) at context {ctx:5d}: {per_token * 1e3:6.2f} ms/token (median), "
                  f"state {state_bytes / 1024:.0f} KiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="both", choices=["both", "mamba1", "mamba2"])
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--d_state", type=int, default=0, help="0: 16 for mamba1, 64 for mamba2")
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--n_groups", type=int, default=1)
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=4, help="layers of the decoding model")
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5, help="timed runs of gaia's layer (the best counts)")
    p.add_argument("--hf_reps", type=int, default=0,
                   help="runs of transformers' layer; 0: one for mamba1 (it takes seconds), else a warm-up + reps")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    p.add_argument("--new_tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bench_mamba(p.parse_args())
