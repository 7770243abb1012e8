"""
One MoE layer, forward + backward, gaia's moe.MoE against transformers' MixtralSparseMoeBlock holding the
same weights, on the same tokens, timed in the same run, on the CPU. The three layers take turns, step by
step, and each one's fastest step is reported: on a shared machine the minimum is the least disturbed
measure of the work itself (the median is printed too).
transformers is timed with both of its expert paths: "grouped_mm" (its default on this torch) and "eager"
(its per-expert loop). Outputs and gradients are checked equal before anything is timed.

    python bench.py moe                      # the default shapes below
    python bench.py moe --threads=1 --repeats=20
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe  # noqa: E402

# (label, n_embd, intermediate_size, n_experts, n_experts_per_tok, tokens)
SHAPES = [
    ("gaia default 128/256 8x2", 128, 256, 8, 2, 2048),     # moe.Config()'s layer
    ("Mixtral-like 512/1792 8x2", 512, 1792, 8, 2, 1024),   # Mixtral's 4096/14336, scaled down 8x
    ("Qwen3-like 256/128 64x8", 256, 128, 64, 8, 1024),     # fine-grained: Qwen3-30B-A3B is 2048/768, 128 top-8
]


def hf_block(n_embd, inter, n_experts, k, implementation):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=n_embd, intermediate_size=inter, num_local_experts=n_experts,
                           num_experts_per_tok=k)
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config)


def bench_moe(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; forward+backward of one MoE "
          f"layer, fastest (median) of {args.repeats} interleaved steps, ms")
    print(f"{'shape (C/I, experts x k)':<26} {'tokens':>6} {'gaia':>16} {'hf grouped_mm':>16} {'hf eager':>16} "
          f"{'vs grouped_mm':>14} {'vs eager':>9}")
    for label, C, I, E, k, N in SHAPES:
        ours = moe.MoE(moe.Config(n_embd=C, intermediate_size=I, n_experts=E, n_experts_per_tok=k))
        with torch.no_grad():
            ours.router.weight.normal_(0, 0.02 * 8)  # a router that is not uniform, so some experts get more
            for w in (ours.gate_proj, ours.up_proj, ours.down_proj):
                w.normal_(0, 0.02)
        theirs = {}
        for impl in ("grouped_mm", "eager"):
            block = hf_block(C, I, E, k, impl)
            with torch.no_grad():  # the same weights; transformers 5 keeps gate and up in one (E, 2I, C) tensor
                block.gate.weight.copy_(ours.router.weight)
                block.experts.gate_up_proj.copy_(torch.cat([ours.gate_proj, ours.up_proj], dim=1))
                block.experts.down_proj.copy_(ours.down_proj)
            theirs[impl] = block
        x = torch.randn(1, N, C)
        grad = torch.randn(1, N, C)

        def step(layer):
            xi = x.clone().requires_grad_()
            out = layer(xi)
            y = out[0] if isinstance(out, tuple) else out
            y.backward(grad)
            return y, xi.grad

        # same function: outputs and gradients agree before anything is timed
        y_ref, gx_ref = step(ours)
        for impl, block in theirs.items():
            y, gx = step(block)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
            gate_up_grad = torch.cat([ours.gate_proj.grad, ours.up_proj.grad], dim=1)
            torch.testing.assert_close(block.experts.gate_up_proj.grad, gate_up_grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(block.experts.down_proj.grad, ours.down_proj.grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(block.gate.weight.grad, ours.router.weight.grad, atol=1e-5, rtol=1e-4)

        layers = dict(gaia=ours, **theirs)
        times = {name: [] for name in layers}
        for _ in range(args.warmup):
            for layer in layers.values():
                step(layer)
        for _ in range(args.repeats):
            for name, layer in layers.items():  # interleaved: a busy machine slows all three alike
                for p in layer.parameters():
                    p.grad = None
                t0 = time.perf_counter()
                step(layer)
                times[name].append(time.perf_counter() - t0)
        best = {name: 1000 * min(t) for name, t in times.items()}
        cell = {name: f"{best[name]:.1f} ({1000 * statistics.median(t):.1f})" for name, t in times.items()}
        print(f"{label:<26} {N:>6} {cell['gaia']:>16} {cell['grouped_mm']:>16} {cell['eager']:>16} "
              f"{best['grouped_mm'] / best['gaia']:>13.2f}x {best['eager'] / best['gaia']:>8.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    bench_moe(parser.parse_args())
