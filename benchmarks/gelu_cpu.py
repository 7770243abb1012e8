"""
Benchmark of GPT-2's tanh GELU on the CPU: ATen's F.gelu(approximate="tanh"), kernels.py's GELUTanhCPU (the same
function as x * sigmoid(u), backward written out), kernels.py's C loop (GELUTanhC, what kernels=auto runs where
it builds) and, for scale, ATen's erf GELU (nanoGPT's), forward and backward on one MLP activation of the
cpu-anchor shapes (B=16, T=128, 4 * n_embd = 512), fp32.

  python bench.py gelu                     # defaults below
  python bench.py gelu --shape=16,128,512 --repeats=200
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,128,512")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train.keep_freed_memory()  # as train.py does on the CPU
    x = torch.randn(*map(int, args.shape.split(",")), requires_grad=True)
    grad = torch.randn_like(x)
    kinds = {"aten tanh": lambda t: F.gelu(t, approximate="tanh"), "gaia tanh": kernels.GELUTanhCPU.apply,
             "aten erf": F.gelu}
    if kernels._c_library() is not None:
        kinds["gaia C"] = kernels.GELUTanhC.apply
    else:
        print(f"(gaia's C loop is not built here: {kernels.c_unavailable})")
    times = {k: {"forward": [], "backward": []} for k in kinds}
    for i in range(args.repeats + 5):  # alternate the kinds, so load drift on the machine hits all alike
        for name, fn in kinds.items():
            t0 = time.perf_counter()
            y = fn(x)
            t1 = time.perf_counter()
            torch.autograd.grad(y, x, grad)
            t2 = time.perf_counter()
            if i >= 5:
                times[name]["forward"].append(t1 - t0)
                times[name]["backward"].append(t2 - t1)
    print(f"shape {tuple(x.shape)}, fp32, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, t in times.items():
        fwd, bwd = (1000 * statistics.median(t[k]) for k in ("forward", "backward"))
        print(f"  {name:10s} forward {fwd:6.3f} ms   backward {bwd:6.3f} ms   total {fwd + bwd:6.3f} ms")


if __name__ == "__main__":
    main()
