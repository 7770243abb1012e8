"""
Benchmark of kernels.py's fused ops at training shapes: per op, the eager torch path (the definition), torch.compile
of it and the Triton path (CUDA), forward and forward + backward: median ms, and the peak memory the op's
forward + backward adds on top of its inputs.

    python bench.py kernels                               # every op, both sizes, every variant this machine has
    python bench.py kernels --ops=linear_cross_entropy --sizes=small --memory --variants=eager,chunked   # CPU
    python bench.py kernels --sizes=small --tokens=256 --repeats=1 --memory      # smoke: every op and variant
    TRITON_INTERPRET=1 python bench.py kernels --sizes=small --tokens=64 --repeats=1 --variants=eager,triton
                                                          # Triton on the CPU, in its interpreter (slow; smoke only)

Shapes, --tokens = B*T = 8192 by default (T = 1024 or --tokens if less):
    small: GPT-2 124M's: C = 768, 12 heads x 64, vocab 50257, MLP hidden 3072
    large: Llama-7B/8B-like: C = 4096, 32 heads x 128 with 8 KV heads, vocab 128256, hidden 11008
    attention: q (B, H, T, D), causal; rope: q (B, T, H, D), k (B, T, Hk, D), cos/sin (T, 1, D)
    linear_scan: Mamba-1's (B, T, d_inner = 2C, 1, N = 16), always fp32 (mamba.py scans in fp32); large on the
        CPU at 2048 tokens (at 8192, fp32 a and b alone take 8.6 GB, fwd+bwd ~30 GB)
Variants: eager (for linear_cross_entropy the unfused F.cross_entropy(F.linear(x, W).float(), targets)), chunked
(linear_cross_entropy_torch, the chunked torch path), compile (torch.compile of the torch path; for
linear_cross_entropy of the chunked one, what a compiled model runs), triton (CUDA with triton, or TRITON_INTERPRET=1).
fwd runs under torch.no_grad; fwd+bwd is the forward with grads, then autograd.grad of every float input.
Peak MB (fwd+bwd): on CUDA max_memory_allocated minus what was allocated before (inputs, output grads); on the CPU
(--memory) one fresh process per row: after building the inputs and one warm-up call, the peak RSS of one more call
(VmHWM, reset first) minus the RSS before it. Not ru_maxrss: a child's starts at its parent's peak (exec carries it).
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import train  # noqa: E402

OPS = ("rms_norm", "layer_norm", "rope", "swiglu", "gelu_tanh", "attention", "linear_cross_entropy", "linear_scan")
VARIANTS = ("eager", "chunked", "compile", "triton")
SIZES = {"small": dict(C=768, H=12, Hk=12, D=64, V=50257, hidden=3072),
         "large": dict(C=4096, H=32, Hk=8, D=128, V=128256, hidden=11008)}


def make_inputs(op, size, tokens, device, dtype, meta=False):
    """(args, indices of the args that get grads, indices of the args shaped as the outputs: () = a scalar loss);
    with meta, shapes only."""
    s = SIZES[size]
    C, H, Hk, D = s["C"], s["H"], s["Hk"], s["D"]
    if (op, size, device) == ("linear_scan", "large", "cpu"):
        tokens = min(tokens, 2048)
    T = min(1024, tokens)
    B = tokens // T
    device = "meta" if meta else device

    def r(*shape, scale=1.0, dt=dtype):
        return torch.randn(shape, device=device, dtype=dt).mul_(scale)
    if op == "rms_norm":
        return (r(B, T, C), r(C), 1e-5), (0, 1), (0,)
    if op == "layer_norm":
        return (r(B, T, C), r(C), r(C), 1e-5), (0, 1, 2), (0,)
    if op == "rope":
        inv_freq = 10000.0 ** -(torch.arange(0, D, 2, device=device).float() / D)
        angles = torch.outer(torch.arange(T, device=device).float(), inv_freq).repeat(1, 2)[:, None]  # (T, 1, D)
        return (r(B, T, H, D), r(B, T, Hk, D), angles.cos(), angles.sin()), (0, 1), (0, 1)
    if op == "swiglu":
        return (r(B, T, s["hidden"]), r(B, T, s["hidden"])), (0, 1), (0,)
    if op == "gelu_tanh":
        return (r(B, T, s["hidden"]),), (0,), (0,)
    if op == "attention":
        return (r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), True), (0, 1, 2), (0,)
    if op == "linear_cross_entropy":
        targets = torch.randint(0, s["V"], (B * T,), device=device)
        return (r(B * T, C), r(s["V"], C, scale=C ** -0.5), targets), (0, 1), ()
    if op == "linear_scan":  # decays a in (0, 1), as exp(dt A) with dt > 0, A < 0
        a = torch.rand(B, T, 2 * C, 1, 16, device=device)
        return (a, r(B, T, 2 * C, 1, 16, dt=torch.float32)), (0, 1), (1,)
    raise ValueError(op)


def variant_fn(op, variant, device):
    """The function a row times, or a string saying why the row cannot run here."""
    torch_fn = getattr(kernels, f"{op}_torch")
    if variant == "eager" and op == "linear_cross_entropy":
        return lambda x, weight, targets: F.cross_entropy(F.linear(x, weight).float(), targets)
    if variant in ("eager", "chunked"):  # chunked: linear_cross_entropy's own torch path
        return torch_fn
    if variant == "compile":
        torch._dynamo.reset()
        return torch.compile(torch_fn, dynamic=False)
    if not kernels.HAS_TRITON:
        return "n/a: triton is not installed"
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "n/a: needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
    return getattr(kernels, f"{op}_triton")


def steps(fn, args, grad_idx, out_idx):
    """fwd() and fwd_bwd() of fn on args; the output grads are built here, with the inputs."""
    wrt = [args[i].requires_grad_() for i in grad_idx]
    grads = [torch.randn_like(args[i]) for i in out_idx] or None  # None: a scalar loss, d/d(loss) = 1

    def fwd():
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd():
        out = fn(*args)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), wrt, grads)
    return fwd, fwd_bwd


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup, repeats):
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def proc_status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def cpu_peak_mb(args):
    """In the child process: one op and variant's fwd+bwd peak RSS over the RSS after building its inputs and one
    warm-up call (which compiles, and loads what a first call loads). glibc is told to mmap every block of 64 KiB
    or more and so hand it back when freed: the RSS then follows what is live, and the warm-up leaves no freed heap
    behind for the measured call to reuse unseen."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD, fixed (glibc stops raising it)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    op, variant = args.child.split(":")
    inputs, grad_idx, out_idx = make_inputs(op, args.sizes, args.tokens, "cpu", getattr(torch, args.dtype))
    fwd_bwd = steps(variant_fn(op, variant, "cpu"), inputs, grad_idx, out_idx)[1]
    fwd_bwd()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = proc_status_mb("VmRSS")
    fwd_bwd()
    print(f"peak_mb {proc_status_mb('VmHWM') - base:.1f}")


def measure_cpu_memory(op, variant, args, size):
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={op}:{variant}", f"--sizes={size}",
           f"--tokens={args.tokens}", f"--dtype={args.dtype}", f"--threads={torch.get_num_threads()}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("peak_mb ")]
    if p.returncode or not lines:
        return "failed: " + ((p.stderr.strip().splitlines() or ["no output"])[-1])[:90]
    return float(lines[-1].split()[1])


def bench_row(op, variant, size, device, dtype, args):
    """{fwd, fwd+bwd, peak} for one row, or a string: why it did not run."""
    fn = variant_fn(op, variant, device)
    if isinstance(fn, str):
        return fn
    inputs, grad_idx, out_idx = make_inputs(op, size, args.tokens, device, dtype)
    fwd, fwd_bwd = steps(fn, inputs, grad_idx, out_idx)
    try:
        row = {"fwd": median_ms(fwd, device, args.warmup, args.repeats),
               "fwd+bwd": median_ms(fwd_bwd, device, args.warmup, args.repeats), "peak": None}
    except Exception as e:  # e.g. torch.compile without a working C++ compiler: say why, go on
        return f"failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:110]
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        sync(device)
        row["peak"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def shapes_line(op, size, tokens, device, dtype):
    inputs = make_inputs(op, size, tokens, device, dtype, meta=True)[0]
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype)[6:]}" for t in inputs if isinstance(t, torch.Tensor))


def print_table(op, size, rows, shapes):
    print(f"\n{op}, {size}: {shapes}")
    print(f"  {'variant':<9} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MB':>9}   "
          f"vs eager: speedup fwd, fwd+bwd; peak / eager's")
    eager = rows.get("eager")
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"  {name:<9} {row}")
            continue
        peak = row["peak"]
        vs = "-"
        if isinstance(eager, dict) and name != "eager":
            mem = (f"{peak / eager['peak']:.3f}" if isinstance(peak, float) and isinstance(eager["peak"], float)
                   and eager["peak"] > 0 else "-")
            vs = f"{eager['fwd'] / row['fwd']:.3g}x, {eager['fwd+bwd'] / row['fwd+bwd']:.3g}x; {mem}"
        peak_s = f"{peak:9.1f}" if isinstance(peak, float) else f"{'-':>9}"
        print(f"  {name:<9} {row['fwd']:8.2f} {row['fwd+bwd']:11.2f} {peak_s}   {vs}")
        if isinstance(peak, str):
            print(f"  {'':<9} peak: {peak}")


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {torch.get_num_threads()} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=8192, help="B*T; T = 1024 (or fewer), B = tokens // T")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", help="auto: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--memory", action="store_true", help="CPU: peak RSS, one process per row (CUDA: always)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # OP:VARIANT, the CPU memory subprocess
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return cpu_peak_mb(args)
    try:
        device = train.pick_device(args.device)
    except Exception as e:  # configurator.ConfigError: one line says what this machine has
        sys.exit(f"error: {e}")
    args.dtype = train.pick_dtype(args.dtype, device)
    if device == "cpu":
        train.keep_freed_memory()  # as train.py does on the CPU
    ops, variants = args.ops.split(","), args.variants.split(",")
    for name, known in (("ops", OPS), ("variants", VARIANTS), ("sizes", SIZES)):
        bad = set(getattr(args, name).split(",")) - set(known)
        if bad:
            sys.exit(f"error: --{name}: unknown {', '.join(sorted(bad))}; choose from {', '.join(known)}")
    if args.tokens > 1024 and args.tokens % 1024:
        sys.exit(f"error: --tokens={args.tokens}: more than 1024 tokens must be a multiple of T = 1024")
    dtype = getattr(torch, args.dtype)
    print("command: python benchmarks/kernel_ops.py " + " ".join(sys.argv[1:]))
    print(f"{device_name(device)}, torch {torch.__version__}, {args.dtype}, {datetime.date.today()}, "
          f"median of {args.repeats} after {args.warmup} warm-up calls")
    for size in args.sizes.split(","):
        for op in ops:
            rows = {}
            for variant in variants:
                if variant == "chunked" and op != "linear_cross_entropy":
                    continue
                row = bench_row(op, variant, size, device, dtype, args)
                if isinstance(row, dict) and device == "cpu":
                    row["peak"] = measure_cpu_memory(op, variant, args, size) if args.memory else None
                rows[variant] = row
            print_table(op, size, rows, shapes_line(op, size, args.tokens, device, dtype))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
