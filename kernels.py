"""
The fused ops gaia's model files call, each written twice: a plain-torch function that defines it (the math to
read, and what runs on the CPU but for one op) and Triton kernels, forward and backward, that compute the same on a
GPU in fewer passes over memory. RMSNorm is also written in CUDA C++ (built on first use with load_inline), and
GPT-2's GELU in C for the CPU (built on first use with the machine's C compiler: the end of this file).

    op                      torch path (the definition)          Triton path                     model files
    rms_norm                x / rms(x) * weight, fp32 stats      one row per program             llama moe mla mamba
    layer_norm              (x - mean) / std * weight + bias     one row per program             gpt2
    rope                    x cos + rotate_half(x) sin           q and k in one launch           llama moe mla speedrun
    swiglu                  silu(gate) * up                      elementwise                     llama moe mla
    gelu_tanh               GPT-2's tanh GELU                    elementwise                     gpt2
    attention               softmax(q k^T / sqrt(d)) v (SDPA)    flash attention, GQA            gpt2 llama moe mla speedrun
    linear_cross_entropy    the LM head + loss, chunked          the softmax/CE of each chunk    gpt2 llama moe mla mamba
    linear_scan             h_t = a_t h_{t-1} + b_t              one sequential loop per lane    mamba (Mamba-1)

Which path runs is one setting, `set_backend(name)`, set by train.py's `--kernels` key or by the environment
variable GAIA_KERNELS:
    auto    Triton on CUDA tensors when triton imports, the torch path otherwise (the default); on the CPU,
            gelu_tanh's C loop for fp32 where it builds
    triton  Triton always: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the tests do that; slow)
    torch   the torch path always (e.g. to compare, or where torch.compile should see plain ops)
    cuda    as auto, with rms_norm in CUDA C++
The torch path always runs for DTensors (tensor parallel shards: the sharding plan works on plain ops) and while
torch.compile traces (it writes its own fused kernels from the plain ops).
"""
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only machine without triton: the torch paths run
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch", "cuda")
_backend = "auto"


def set_backend(name):
    """Pick which path the ops take (module docstring); returns the previous setting."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r} is not one of {', '.join(BACKENDS)}; e.g. --kernels=auto")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("kernels=triton needs the triton package (pip install triton, Linux); or use --kernels=auto")
    previous, _backend = _backend, name
    return previous


def backend():
    return _backend


def use_triton(*tensors):
    """Whether the ops take the Triton path for these tensors."""
    if _backend == "torch" or not HAS_TRITON:
        return False
    on_gpu = all(t.is_cuda for t in tensors)
    if not on_gpu and _backend != "triton":  # CPU tensors under auto: the CPU's training step asks this per op
        return False
    if torch.compiler.is_compiling() or any(isinstance(t, DTensor) for t in tensors):
        return False
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels=triton runs Triton kernels, which need CUDA tensors; on the CPU use --kernels=auto "
                           "(or set TRITON_INTERPRET=1 before starting Python to run them in Triton's interpreter, slowly)")
    return True


set_backend(os.environ.get("GAIA_KERNELS", "auto"))


# ------------------------------------------------------------------------------------- the ops the models call

def rms_norm(x, weight, eps):
    """x (..., C) / sqrt(mean(x^2) + eps) * weight (C,), statistics in fp32 whatever x's dtype."""
    if _backend == "cuda" and x.is_cuda and not isinstance(x, DTensor) and not torch.compiler.is_compiling():
        return rms_norm_cuda(x, weight, eps)
    return rms_norm_triton(x, weight, eps) if use_triton(x, weight) else rms_norm_torch(x, weight, eps)


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; bias may be None."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return layer_norm_triton(x, weight, bias, eps) if use_triton(*tensors) else layer_norm_torch(x, weight, bias, eps)


def rope(q, k, cos, sin):
    """q (B, T, H, D) and k (B, T, Hk, D) rotated by position: cos, sin (T, 1, D) from the model's buffers."""
    return rope_triton(q, k, cos, sin) if use_triton(q, k) else rope_torch(q, k, cos, sin)


def swiglu(gate, up):
    """silu(gate) * up, SwiGLU's gated hidden layer (Shazeer 2020)."""
    return swiglu_triton(gate, up) if use_triton(gate, up) else swiglu_torch(gate, up)


def gelu_tanh(x):
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if use_triton(x):
        return gelu_tanh_triton(x)
    return gelu_tanh_c(x) if use_c(x) else gelu_tanh_torch(x)


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """softmax(q k^T * scale [+ causal mask]) v, scale = 1/sqrt(D) by default, for q (B, H, T, D), k and v
    (B, Hk, S, D), H a multiple of Hk (grouped-query attention: query head h reads k/v head h // (H / Hk), without
    repeating k and v). The Triton path (flash attention) takes no dropout and one head width D <= 256 for q, k and
    v in fp32, fp16 or bf16; otherwise the torch path runs."""
    if (dropout_p == 0.0 and q.shape[-1] == v.shape[-1] <= 256 and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and use_triton(q, k, v)):
        return attention_triton(q, k, v, causal, scale)
    return attention_torch(q, k, v, causal, dropout_p, scale)


def linear_cross_entropy(x, head, targets, ignore_index=-1):
    """The mean over counted tokens of -log softmax(head(x))[target]: the LM head (an nn.Linear without bias,
    weight (V, C), tied or not) and its loss in one, for x (..., C) and targets (...), ignore_index not counted.
    Computed a chunk of tokens at a time, so the (tokens, V) logits are never held whole. A head with forward hooks
    (a tensor-parallel plan's, FSDP's) or a DTensor weight runs as the module and the plain loss, so they apply."""
    weight = head.weight
    if isinstance(weight, DTensor) or head.bias is not None or head._forward_pre_hooks or head._forward_hooks:
        logits = head(x).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
    if use_triton(x, weight):
        return linear_cross_entropy_triton(x, weight, targets, ignore_index)
    return linear_cross_entropy_torch(x, weight, targets, ignore_index)


def linear_scan(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1 (h_{-1} = 0), for b (batch, T, ...) and a of b's shape or broadcast to it."""
    return linear_scan_triton(a, b) if use_triton(a, b) else linear_scan_torch(a, b)


# === plain torch: the definitions (and the CPU path) ===

def rms_norm_torch(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, the statistics in fp32 (the mean of squares of bf16
    activations loses too much). x (..., C), weight (C,); out dtype promote(weight, x), as the models' RMSNorm."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def layer_norm_torch(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (var biased, i.e. divided by C); bias may be
    None. ATen's fused layer_norm: fast on the CPU, and fp32 statistics for bf16/fp16 inputs."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(q, k, cos, sin):
    """q (B, T, H, D) and k (B, T, Hk, D) rotated by position, Hugging Face's layout: the pair (i, i + D/2) turns
    by the angle whose cos and sin are cos[t, 0, i] = cos[t, 0, i + D/2], sin likewise; cos, sin (T, 1, D) float32,
    cast to q's dtype first, as the models do."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu_torch(gate, up):
    """silu(gate) * up, the gated MLP's hidden activation (Shazeer 2020); silu(g) = g sigmoid(g)."""
    return F.silu(gate) * up


def gelu_tanh_torch(x):
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). fp32 on the CPU: GELUTanhCPU below.
    Elsewhere (GPUs, bf16/fp16, torch.compile) ATen's tanh GELU: one fused kernel on GPUs, what torch.compile
    fuses best, and float32 math inside for bf16/fp16 inputs."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return GELUTanhCPU.apply(x)
    return F.gelu(x, approximate="tanh")


class GELUTanhCPU(torch.autograd.Function):
    """GPT-2's GELU written with a sigmoid: since 0.5 (1 + tanh(z)) = sigmoid(2z), it is x * sigmoid(u) with
    u = 2 sqrt(2/pi) (x + 0.044715 x^3). Same function (to float rounding), but on the CPU ATen's tanh costs
    ~4x its sigmoid, which made F.gelu(tanh) ~2x slower than the erf GELU (benchmarks/gelu_cpu.py). The
    derivative, written out: d/dx [x s(u)] = s + x s (1 - s) u'."""
    A, C = 2 * math.sqrt(2 / math.pi), 0.044715

    @staticmethod
    def forward(ctx, x):
        A, C = GELUTanhCPU.A, GELUTanhCPU.C
        a = torch.tensor(A, dtype=x.dtype)
        s = torch.addcmul(a, x, x, value=A * C).mul_(x).sigmoid_()  # s = sigmoid(x (A + A C x^2)), in place
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        A, C = GELUTanhCPU.A, GELUTanhCPU.C
        x, s = ctx.saved_tensors
        # u' = A (1 + 3 C x^2), capped at |x| = 20: beyond it s (1 - s) is 0 in float32 anyway, and a finite u'
        # keeps that product 0 for huge x, never inf * 0 = nan
        d = torch.addcmul(torch.tensor(A, dtype=x.dtype), x, x, value=3 * A * C).clamp_(max=A * (1 + 3 * C * 400))
        torch.ops.aten.sigmoid_backward(d, s, grad_input=d)  # u' s (1 - s), one fused pass
        return d.mul_(x).add_(s).mul_(grad)  # (s + x u' s (1 - s)) grad


def attention_torch(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """softmax(q k^T * scale [+ causal mask j <= i]) v, scale = 1/sqrt(D) unless given: q (B, H, T, D), k and v
    (B, Hk, S, D). SDPA does the grouping of query heads onto k/v heads itself (enable_gqa), nothing repeated."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------ linear + cross-entropy

LCE_CHUNK_BYTES = 64 * 2**20  # the fp32 logits one chunk may take


def lce_chunk_size(n_tokens, vocab_size):
    """Rows per chunk when chunk_size is None: as many as keep one chunk's fp32 logits near LCE_CHUNK_BYTES (64 MiB),
    rounded down to a multiple of 64 (so the chunk's matmuls stay tensor-core sized): 320 rows at GPT-2's V = 50257,
    128 at Llama 3's 128256, at least 64, at most n_tokens. A fixed budget, unlike Liger's tokens // ceil(V / C),
    bounds the extra memory whatever the batch, while each chunk's three matmuls stay large enough
    (~25 GFLOP each at V = 50257, C = 768) to run at full speed."""
    rows = max(64, LCE_CHUNK_BYTES // (4 * vocab_size) // 64 * 64)
    return max(1, min(n_tokens, rows))


def _cross_entropy_rows_torch(logits, targets, ignore_index, scale, need_grad):
    """The loss of each row of logits (n, V) (0 where targets == ignore_index), as (n,) fp32. With need_grad, logits
    is turned IN PLACE into d(loss)/d(logits) = (softmax - onehot(target)) * scale, zero rows where ignored: in place
    so that a chunk never holds more than its one (n, V) buffer."""
    counted = targets != ignore_index                          # (n,)
    t = torch.where(counted, targets, 0).unsqueeze(1)          # (n, 1), ignored rows read column 0, then drop it
    target_logit = logits.gather(1, t).squeeze(1)              # (n,)
    m = logits.amax(1, keepdim=True)                           # (n, 1), subtracted so that exp cannot overflow
    logits.sub_(m).exp_()                                      # exp(z - m)
    s = logits.sum(1, keepdim=True)                            # (n, 1)
    loss = torch.where(counted, (m + s.log()).squeeze(1) - target_logit, 0.0)  # logsumexp(z) - z[target]
    if need_grad:
        logits.div_(s)                                         # softmax
        logits.scatter_add_(1, t, torch.full_like(m, -1.0))    # - onehot(target)
        logits.mul_(torch.where(counted, scale, 0.0).unsqueeze(1))
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss AND both gradients chunk by chunk (module docstring); backward scales them.
    ce_rows(logits, targets, ignore_index, scale, need_grad) is the per-chunk softmax/CE step: torch or Triton."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size, dtype, need_x, need_w, ce_rows):
        V, C = weight.shape
        x2, t = x.reshape(-1, C), targets.reshape(-1)          # (N, C), (N,)
        N = x2.size(0)
        chunk = chunk_size or lce_chunk_size(N, V)
        with torch.autocast(x.device.type, enabled=False):    # dtype already says what autocast would pick
            xc, wc = x2.to(dtype), weight.to(dtype)            # the matmuls run in dtype, as F.linear would
            logits_dtype = torch.promote_types(dtype, torch.float32)  # fp32 (fp64 stays fp64)
            n = (t != ignore_index).sum()                      # counted tokens, a tensor: no host sync
            scale = 1.0 / n.clamp(min=1).to(logits_dtype)      # d(mean)/d(term); no count -> zero grads, NaN loss
            loss_sum = torch.zeros((), dtype=logits_dtype, device=x.device)
            grad_x = torch.empty_like(x2) if need_x else None  # each row written once: x's dtype
            grad_w = torch.zeros(V, C, dtype=torch.promote_types(weight.dtype, torch.float32),
                                 device=weight.device) if need_w else None  # summed over chunks: fp32
            for s in range(0, N, chunk):
                logits = (xc[s:s + chunk] @ wc.t()).to(logits_dtype)          # (rows, V), a fresh buffer
                loss_sum += ce_rows(logits, t[s:s + chunk], ignore_index, scale, need_x or need_w).sum()
                if not (need_x or need_w):
                    continue
                dlogits = logits.to(dtype)                     # now d(loss)/d(logits); in dtype, as autograd's would be
                if need_x:
                    grad_x[s:s + chunk] = dlogits @ wc         # (rows, C)
                if need_w:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(dlogits.t(), xc[s:s + chunk])            # (V, C), no temporary
                    else:
                        grad_w += dlogits.t() @ xc[s:s + chunk]                # product in dtype, sum in fp32
        ctx.x_shape = x.shape
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if need_w else None)
        return loss_sum / n                                    # 0 / 0 = NaN with no counted token, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # the stored grads are constants: no double backward
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = None if grad_x is None else (grad_x * grad_loss).view(ctx.x_shape)  # out of place: a second
        grad_w = None if grad_w is None else grad_w * grad_loss                       # backward must see them intact
        return grad_x, grad_w, None, None, None, None, None, None, None


def _linear_cross_entropy(x, weight, targets, ignore_index, chunk_size, ce_rows):
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (rows of logits per chunk), or None for the default")
    dev = x.device.type
    # the dtype F.linear would compute in: autocast's when it is on, otherwise the inputs' (promoted)
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else torch.promote_types(x.dtype, weight.dtype))
    need_x = torch.is_grad_enabled() and x.requires_grad       # skip the grad matmuls nobody will read
    need_w = torch.is_grad_enabled() and weight.requires_grad
    return LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk_size, dtype, need_x, need_w, ce_rows)


def linear_cross_entropy_torch(x, weight, targets, ignore_index=-1, chunk_size=None):
    """F.cross_entropy(F.linear(x, weight).float().view(-1, V), targets.view(-1), ignore_index=ignore_index), for
    x (..., C) in any float dtype, weight (V, C) (tied or not), targets (...) int64: the mean over tokens whose target
    is not ignore_index (NaN when there is none), from fp32 logits, computed chunk_size tokens at a time (default
    lce_chunk_size: ~64 MiB of logits per chunk). Under autocast the matmuls run in autocast's dtype, as F.linear's."""
    return _linear_cross_entropy(x, weight, targets, ignore_index, chunk_size, _cross_entropy_rows_torch)


# ------------------------------------------------------------------- the linear recurrence (Mamba-1's scan)

def scan_(a, b):
    """Every h_t = a_t h_{t-1} + b_t (along dim 1, h_{-1} = 0) in log2(T) vectorised rounds, in place: b becomes h.
    Odd-even reduction: pairing steps 2i and 2i+1 gives the same recurrence, half as long, over the odd steps,
        h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}),
    and once it is solved each even step is one ordinary step from the odd step before it. O(T) work in all, and
    it only ever multiplies decays in (0, 1]: no division and no logarithm, so it is exact and stable however
    strongly Δ resets the state. a may have size-1 dims where b has more (broadcast)."""
    T = b.shape[1]
    if T == 1:
        return
    pairs = T // 2
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    b_odd.addcmul_(a_odd, b_even[:, :pairs])                         # each pair as one step
    scan_(a_odd * a_even[:, :pairs], b_odd)                          # b_odd = h at the odd steps
    b_even[:, 1:].addcmul_(a_even[:, 1:], b_odd[:, :(T - 1) // 2])  # h_2i = a_2i h_2i-1 + b_2i


class LinearRecurrence(torch.autograd.Function):
    """h = scan of (a, b), with the backward written out: the gradient of a linear recurrence is the same recurrence
    run backwards in time. The gradient reaching h_t, g_t = dL/dh_t + a_{t+1} g_{t+1}, gives dL/db_t = g_t and
    dL/da_t = g_t h_{t-1}. Saves only a and h."""

    @staticmethod
    def forward(ctx, a, b):
        h = b.clone()
        scan_(a, h)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        g = grad_h.flip(1)  # time reversed: g_t = a_{t+1} g_{t+1} + grad_t becomes an ordinary forward scan
        scan_(torch.cat((torch.ones_like(a[:, :1]), a[:, 1:].flip(1)), dim=1), g)
        g = g.flip(1)
        grad_a = torch.cat((torch.zeros_like(h[:, :1]), g[:, 1:] * h[:, :-1]), dim=1)
        return grad_a.sum_to_size(a.shape), g


def linear_scan_torch(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1 (h_{-1} = 0). b: (batch, T, *rest); a: as many dims as b, each b's size
    or 1 (broadcast). Returns h with b's shape and dtype. Math in the inputs' dtype."""
    return LinearRecurrence.apply(a, b)


# === Triton: the same math, fused, forward and backward ===

if HAS_TRITON:

    def _row_config(C):
        """One program per row, the whole row in registers: the smallest power-of-two block that holds C, and
        more warps for wider rows (Triton's layer-norm tutorial)."""
        BLOCK = triton.next_power_of_2(C)
        return BLOCK, min(max(BLOCK // 256, 1), 8)

    def _n_programs(x, rows):
        """Programs of a norm's backward: each loops over a stride of rows and keeps its own fp32 partial sum of
        the weight (and bias) grads, so a few per SM, not one per row (that would be a (rows, C) buffer)."""
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2  # interpreter
        return max(1, min(rows, 4 * sms))

    @triton.jit
    def _sigmoid(x):
        return 1 / (1 + tl.exp(-x))

    # --- RMSNorm ---

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64 offsets: row * C may pass 2^31 elements
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
        xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded to x's dtype: the torch path's type_as
        tl.store(Y + row * C + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(X, W, DY, RSTD, DX, DW, n_rows, C, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, n_rows, tl.num_programs(0)):
            offs = tl.cast(row, tl.int64) * C + cols
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            dxhat = dy * w
            # y = w xhat, xhat = x rstd(x): dx = rstd (dxhat - xhat mean(dxhat xhat)), rstd's share the 2nd term
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / C))
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        tl.store(DW + pid * C + cols, dw, mask=mask)

    class RMSNormTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            C = x.shape[-1]
            x2 = x.reshape(-1, C).contiguous()  # (rows, C)
            y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            BLOCK, warps = _row_config(C)
            _rms_norm_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, C, eps, BLOCK=BLOCK, num_warps=warps)
            ctx.save_for_backward(x2, weight, rstd)
            return y.view(x.shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            rows, C = x2.shape
            dx = torch.empty_like(x2)
            G = _n_programs(x2, rows)
            dw = torch.empty(G, C, dtype=torch.float32, device=x2.device)  # per-program partial sums
            BLOCK, warps = _row_config(C)
            _rms_norm_bwd[(G,)](x2, weight.contiguous(), dy.reshape(-1, C).contiguous(), rstd, dx, dw, rows, C,
                                BLOCK=BLOCK, num_warps=warps)
            return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None

    def rms_norm_triton(x, weight, eps):
        """rms_norm_torch in two kernels: the forward (saving 1/rms per row) and the backward (dx, and dweight as
        per-program partial sums added up by torch)."""
        return RMSNormTriton.apply(x, weight, eps)

    # --- LayerNorm ---

    @triton.jit
    def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, C, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)  # padding would add mean^2 to the variance
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _layer_norm_bwd(X, W, DY, MEAN, RSTD, DX, DW, DB, n_rows, C, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, n_rows, tl.num_programs(0)):
            offs = tl.cast(row, tl.int64) * C + cols
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
            dxhat = dy * w
            # through xhat = (x - mean) rstd: subtract dxhat's mean (the mean's share) and its projection on xhat
            # (rstd's share)
            mean_dxhat = tl.sum(dxhat, axis=0) / C
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=0) / C
            dx = tl.load(RSTD + row) * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(DW + pid * C + cols, dw, mask=mask)
        tl.store(DB + pid * C + cols, db, mask=mask)

    class LayerNormTriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, eps):
            C = x.shape[-1]
            x2 = x.reshape(-1, C).contiguous()  # (rows, C)
            y = torch.empty_like(x2)
            mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            rstd = torch.empty_like(mean)
            BLOCK, warps = _row_config(C)
            b = bias.contiguous() if bias is not None else weight  # a placeholder pointer, never read
            _layer_norm_fwd[(x2.shape[0],)](x2, weight.contiguous(), b, y, mean, rstd, C, eps,
                                            HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=warps)
            ctx.save_for_backward(x2, weight, mean, rstd)
            ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
            return y.view(x.shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, mean, rstd = ctx.saved_tensors
            rows, C = x2.shape
            dx = torch.empty_like(x2)
            G = _n_programs(x2, rows)
            dw = torch.empty(G, C, dtype=torch.float32, device=x2.device)  # per-program partial sums
            db = torch.empty_like(dw)
            BLOCK, warps = _row_config(C)
            _layer_norm_bwd[(G,)](x2, weight.contiguous(), dy.reshape(-1, C).contiguous(), mean, rstd, dx, dw, db,
                                  rows, C, BLOCK=BLOCK, num_warps=warps)
            db = db.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
            return dx.view(dy.shape), dw.sum(0).to(weight.dtype), db, None

    def layer_norm_triton(x, weight, bias, eps):
        """layer_norm_torch in two kernels, as rms_norm_triton (mean and 1/std saved per row); out dtype x's."""
        return LayerNormTriton.apply(x, weight, bias, eps)

    # --- RoPE ---

    @triton.jit
    def _rope_rotate(X, Y, bt, H, D2, cos, sin, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rotates the H heads of X at (batch, position) bt: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
        which is x cos + rotate_half(x) sin with x1, x2 the two halves of each head."""
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D2)
        offs = bt.to(tl.int64) * H * 2 * D2 + h * 2 * D2 + d  # (BLOCK_H, BLOCK_D) into the first halves
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + D2, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + offs + D2, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(Q, K, COS, SIN, QO, KO, T, H, HK, D2, BACKWARD: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
        bt = tl.program_id(0)  # b * T + t: all the heads of q and k at one position share its cos and sin
        d = tl.arange(0, BLOCK_D)
        # the first half of the (T, D) row suffices (HF layout: both halves equal); rounded to q's dtype first,
        # as the torch path does
        cos = tl.load(COS + (bt % T) * 2 * D2 + d, mask=d < D2, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
        sin = tl.load(SIN + (bt % T) * 2 * D2 + d, mask=d < D2, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
        if BACKWARD:  # a rotation's transpose is the rotation by minus the angle
            sin = -sin
        _rope_rotate(Q, QO, bt, H, D2, cos[None, :], sin[None, :], BLOCK_H, BLOCK_D)
        _rope_rotate(K, KO, bt, HK, D2, cos[None, :], sin[None, :], BLOCK_HK, BLOCK_D)

    def _rope_launch(q, k, cos, sin, backward):
        (B, T, H, D), Hk = q.shape, k.shape[2]
        q, k = q.contiguous(), k.contiguous()
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        p2 = triton.next_power_of_2
        _rope[(B * T,)](q, k, cos, sin, qo, ko, T, H, Hk, D // 2, BACKWARD=backward,
                        BLOCK_H=p2(H), BLOCK_HK=p2(Hk), BLOCK_D=p2(D // 2), num_warps=4)
        return qo, ko

    class RoPETriton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, cos, sin):
            B, T, H, D = q.shape
            assert D % 2 == 0 and k.shape[:2] == (B, T) and k.shape[3] == D, "q (B, T, H, D), k (B, T, Hk, D), D even"
            cos = cos.reshape(T, D).float().contiguous()  # (T, D)
            sin = sin.reshape(T, D).float().contiguous()
            ctx.save_for_backward(cos, sin)
            return _rope_launch(q, k, cos, sin, backward=False)

        @staticmethod
        def backward(ctx, dq, dk):
            cos, sin = ctx.saved_tensors
            dq, dk = _rope_launch(dq, dk, cos, sin, backward=True)
            return dq, dk, None, None

    def rope_triton(q, k, cos, sin):
        """rope_torch, q and k in one launch each way. Reads only the first half of each cos/sin row, so it
        assumes their Hugging Face layout (both halves equal), which rope_torch's results also rely on."""
        return RoPETriton.apply(q, k, cos, sin)

    # --- SwiGLU ---

    @triton.jit
    def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(g)  # recomputed: cheaper than saving silu(g) and reading it back
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
        # silu'(g) = s + g s (1 - s)
        tl.store(DG + offs, (dy * u * s * (1 + g * (1 - s))).to(DG.dtype.element_ty), mask=mask)

    class SwiGLUTriton(torch.autograd.Function):
        BLOCK = 1024

        @staticmethod
        def forward(ctx, gate, up):
            assert gate.shape == up.shape, "gate and up: the same shape"
            gate, up = gate.contiguous(), up.contiguous()
            y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
            n, BLOCK = gate.numel(), SwiGLUTriton.BLOCK
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
            ctx.save_for_backward(gate, up)
            return y

        @staticmethod
        def backward(ctx, dy):
            gate, up = ctx.saved_tensors
            dgate, dup = torch.empty_like(gate), torch.empty_like(up)
            n, BLOCK = gate.numel(), SwiGLUTriton.BLOCK
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](gate, up, dy.contiguous(), dgate, dup, n, BLOCK=BLOCK, num_warps=4)
            return dgate, dup

    def swiglu_triton(gate, up):
        """swiglu_torch in one pass each way; the backward recomputes sigmoid(gate)."""
        return SwiGLUTriton.apply(gate, up)

    # --- GPT-2's GELU ---

    @triton.jit
    def _gelu_tanh_fwd(X, Y, n, A: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        # 0.5 (1 + tanh(z)) = sigmoid(2z): x sigmoid(u), u = 2 sqrt(2/pi) (x + 0.044715 x^3), as GELUTanhCPU
        tl.store(Y + offs, (x * _sigmoid(x * (A + A * C * x * x))).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_tanh_bwd(X, DY, DX, n, A: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(x * (A + A * C * x * x))
        # u' = A (1 + 3 C x^2) capped at |x| = 20, as GELUTanhCPU: s (1 - s) is 0 there, and inf * 0 would be nan
        du = tl.minimum(A + 3 * A * C * x * x, A * (1 + 3 * C * 400))
        tl.store(DX + offs, (dy * (s + x * s * (1 - s) * du)).to(DX.dtype.element_ty), mask=mask)

    class GELUTanhTriton(torch.autograd.Function):
        BLOCK = 1024

        @staticmethod
        def forward(ctx, x):
            x = x.contiguous()
            y = torch.empty_like(x)
            n, BLOCK = x.numel(), GELUTanhTriton.BLOCK
            _gelu_tanh_fwd[(triton.cdiv(n, BLOCK),)](x, y, n, A=GELUTanhCPU.A, C=GELUTanhCPU.C, BLOCK=BLOCK,
                                                     num_warps=4)
            ctx.save_for_backward(x)
            return y

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            dx = torch.empty_like(x)
            n, BLOCK = x.numel(), GELUTanhTriton.BLOCK
            _gelu_tanh_bwd[(triton.cdiv(n, BLOCK),)](x, dy.contiguous(), dx, n, A=GELUTanhCPU.A, C=GELUTanhCPU.C,
                                                     BLOCK=BLOCK, num_warps=4)
            return dx

    def gelu_tanh_triton(x):
        """gelu_tanh_torch (GELUTanhCPU's sigmoid form) in one pass each way."""
        return GELUTanhTriton.apply(x)


if HAS_TRITON:
    _LOG2E = 1.4426950408889634  # the kernels use exp2 (one instruction on GPUs): e^x = 2^(x log2 e)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE,
                         s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd,
                         s_vb, s_vh, s_vt, s_vd, s_ob, s_oh, s_ot, s_od,
                         H, T, S, D, N_REP, qk_scale,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_T: tl.constexpr, PRECISION: tl.constexpr):
        # one program: BLOCK_M queries of one (batch, head) against all its keys, softmax kept online
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), pid_bh % H
        hk = h // N_REP  # GQA: the k/v head this query head reads
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qt + offs_d[None, :] * s_qd,
                    mask=(rows[:, None] < T) & mask_d[None, :], other=0.0).to(DOT_T)
        K += b * s_kb + hk * s_kh
        V += b * s_vb + hk * s_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, in log2 units
        l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of 2^(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:  # key blocks past the block's last query are fully masked: never visited
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        else:
            hi = S
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols[:, None] < S) & mask_d[None, :]
            k = tl.load(K + cols[:, None] * s_kt + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0).to(DOT_T)
            v = tl.load(V + cols[:, None] * s_vt + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            valid = cols[None, :] < S
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
            alpha = tl.exp2(m_i - m_new)           # rescales what was summed under the old max
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(DOT_T), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        row_ok = rows < T
        tl.store(LSE + pid_bh * T + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)  # natural log
        tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_ot + offs_d[None, :] * s_od,
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, s_ob, s_oh, s_ot, s_od, s_gb, s_gh, s_gt, s_gd, H, T, D,
                                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term, once per row
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < T) & (offs_d[None, :] < D)
        o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_ot + offs_d[None, :] * s_od, mask=mask, other=0.0)
        do = tl.load(DO + b * s_gb + h * s_gh + rows[:, None] * s_gt + offs_d[None, :] * s_gd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh * T + rows, delta, mask=rows < T)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                              s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                              s_gb, s_gh, s_gt, s_gd, s_dkb, s_dkh, s_dkt, s_dkd, s_dvb, s_dvh, s_dvt, s_dvd,
                              H, Hk, T, S, D, N_REP, qk_scale, sm_scale,
                              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr):
        # one program: BLOCK_N keys of one (batch, kv head); sums over every query of the N_REP query heads that
        # share them, so dK and dV stay in registers (no atomics, K and V never repeated). Works transposed
        # (keys on rows): P^T = 2^(K Q^T * scale - lse), as P = softmax(Q K^T * scale) row-wise.
        pid_n, pid_bhk = tl.program_id(0), tl.program_id(1)
        b, hk = (pid_bhk // Hk).to(tl.int64), pid_bhk % Hk
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        kv_mask = (cols[:, None] < S) & mask_d[None, :]
        k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_kt + offs_d[None, :] * s_kd,
                    mask=kv_mask, other=0.0).to(DOT_T)
        v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vt + offs_d[None, :] * s_vd,
                    mask=kv_mask, other=0.0).to(DOT_T)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if CAUSAL:  # queries before the block's first key see none of it: start at the block holding that key
            lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        else:
            lo = 0
        for r in range(0, N_REP):
            h = hk * N_REP + r
            Qh = Q + b * s_qb + h * s_qh
            DOh = DO + b * s_gb + h * s_gh
            row0 = (b * H + h) * T  # LSE and DELTA are (B, H, T) contiguous
            for start_m in range(lo, T, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < T
                q_mask = row_ok[:, None] & mask_d[None, :]
                q = tl.load(Qh + rows[:, None] * s_qt + offs_d[None, :] * s_qd, mask=q_mask, other=0.0).to(DOT_T)
                do = tl.load(DOh + rows[:, None] * s_gt + offs_d[None, :] * s_gd, mask=q_mask, other=0.0).to(DOT_T)
                lse = tl.load(LSE + row0 + rows, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + row0 + rows, mask=row_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
                p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
                valid = row_ok[None, :]
                if CAUSAL:
                    valid = valid & (cols[:, None] <= rows[None, :])
                p_t = tl.where(valid, p_t, 0.0)
                dv = tl.dot(p_t.to(DOT_T), do, dv, input_precision=PRECISION)        # dV = P^T dO
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)            # dP^T = V dO^T
                ds_t = p_t * (dp_t - delta[None, :])                                 # dS = P (dP - delta)
                dk = tl.dot(ds_t.to(DOT_T), q, dk, input_precision=PRECISION)       # dK = dS^T Q (* scale)
        tl.store(DK + b * s_dkb + hk * s_dkh + cols[:, None] * s_dkt + offs_d[None, :] * s_dkd,
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * s_dvb + hk * s_dvh + cols[:, None] * s_dvt + offs_d[None, :] * s_dvd,
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                            s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                            s_gb, s_gh, s_gt, s_gd, s_dqb, s_dqh, s_dqt, s_dqd,
                            H, T, S, D, N_REP, qk_scale, sm_scale,
                            CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr):
        # one program: dQ of BLOCK_M queries of one (batch, head), over the keys they see
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), pid_bh % H
        hk = h // N_REP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        row_ok = rows < T
        q_mask = row_ok[:, None] & mask_d[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qt + offs_d[None, :] * s_qd,
                    mask=q_mask, other=0.0).to(DOT_T)
        do = tl.load(DO + b * s_gb + h * s_gh + rows[:, None] * s_gt + offs_d[None, :] * s_gd,
                     mask=q_mask, other=0.0).to(DOT_T)
        lse = tl.load(LSE + pid_bh * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * T + rows, mask=row_ok, other=0.0)
        K += b * s_kb + hk * s_kh
        V += b * s_vb + hk * s_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        else:
            hi = S
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols[:, None] < S) & mask_d[None, :]
            k = tl.load(K + cols[:, None] * s_kt + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0).to(DOT_T)
            v = tl.load(V + cols[:, None] * s_vt + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
            valid = cols[None, :] < S
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            p = tl.where(valid, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(DOT_T), k, dq, input_precision=PRECISION)  # dQ = dS K (* scale)
        tl.store(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqt + offs_d[None, :] * s_dqd,
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)

    _TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    def _attn_config(D, dtype, block_m=None, block_n=None):
        """Launch settings: BLOCK_D covers D (masked past it); 64 x 64 tiles, halved at D > 128 so tiles fit."""
        if D > 256:
            raise ValueError(f"attention_triton supports head_dim D <= 256, got D={D}; use attention_torch")
        if dtype not in _TL_DTYPE:
            raise ValueError(f"attention_triton takes float32, float16 or bfloat16, got {dtype}")
        block_d = max(16, triton.next_power_of_2(D))
        block = 64 if block_d <= 128 else 32
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        # the interpreter computes bf16 dot products wrong (NaN/garbage): feed it fp32; GPUs take bf16 directly
        dot_t = tl.float32 if interpret and dtype == torch.bfloat16 else _TL_DTYPE[dtype]
        # fp32 dots follow torch's setting: exact ("ieee") unless torch allows TF32 for fp32 matmuls; fp16/bf16
        # dots ignore it (tensor cores, fp32 accumulation)
        exact = dot_t == tl.float32 and torch.get_float32_matmul_precision() == "highest"
        precision = "ieee" if exact else "tf32"
        return dict(BLOCK_M=block_m or block, BLOCK_N=block_n or block, BLOCK_D=block_d, DOT_T=dot_t,
                    PRECISION=precision, num_warps=4 if block_d <= 64 else 8, num_stages=3 if block_d <= 64 else 2)

    class FlashAttention(torch.autograd.Function):
        """Flash attention (FlashAttention-2): forward saves only O and the fp32 log-sum-exp per row; backward
        recomputes the probabilities from it, block by block, so no (T, S) matrix is ever held."""

        @staticmethod
        def forward(ctx, q, k, v, causal, scale, block_m=None, block_n=None):
            B, H, T, D = q.shape
            Hk, S = k.shape[1], k.shape[2]
            cfg = _attn_config(D, q.dtype, block_m, block_n)
            o = torch.empty_like(q)  # q's memory layout: a (B, T, H, D) buffer makes the caller's transpose free
            lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
            grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
            _attn_fwd_kernel[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                                   H, T, S, D, H // Hk, _LOG2E * scale, CAUSAL=causal, **cfg)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_m, block_n)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            B, H, T, D = q.shape
            Hk, S = k.shape[1], k.shape[2]
            cfg = _attn_config(D, q.dtype, *ctx.blocks)
            delta = torch.empty_like(lse)
            _attn_bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
                o, do, delta, *o.stride(), *do.stride(), H, T, D, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            scales = (H // Hk, _LOG2E * ctx.scale, ctx.scale)
            _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * Hk)](
                q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dk.stride(), *dv.stride(), H, Hk, T, S, D, *scales, CAUSAL=ctx.causal, **cfg)
            _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
                q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                H, T, S, D, *scales, CAUSAL=ctx.causal, **cfg)
            return dq, dk, dv, None, None, None, None

    def attention_triton(q, k, v, causal=True, scale=None):
        """softmax(q k^T * scale [+ causal mask j <= i]) v (scale 1/sqrt(D) unless given) for q (B, H, T, D), k and
        v (B, Hk, S, D), Hk | H;
        query head h reads k/v head h // (H // Hk). D <= 256. Output (B, H, T, D) in q's dtype."""
        B, H, T, D = q.shape
        if k.shape[-1] != D or v.shape[-1] != D:
            raise ValueError(f"attention_triton needs one head_dim for q, k and v, got {D}, {k.shape[-1]}, "
                             f"{v.shape[-1]}")
        if H % k.shape[1] or k.shape != v.shape or k.shape[0] != B:
            raise ValueError(f"attention_triton needs k, v of one shape (B, Hk, S, D) with Hk dividing H={H}, "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if D > 256:
            raise ValueError(f"attention_triton supports head_dim D <= 256, got D={D}; use attention_torch")
        k, v = k.to(q.dtype), v.to(q.dtype)  # one dtype in the kernels (a no-op when they already match)
        return FlashAttention.apply(q, k, v, causal, 1.0 / math.sqrt(D) if scale is None else scale)


if HAS_TRITON:
    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                                   NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        # one program per row: loss[row] = logsumexp(z) - z[target], then z -> (softmax(z) - onehot) * scale in place
        row = tl.program_id(0).to(tl.int64)
        z_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        counted = target != ignore_index
        # pass 1: running max m and sum d of exp(z - m) over V in blocks (online softmax), in fp32
        m = float("-inf")
        d = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        z_target = tl.load(z_ptr + tl.where(counted, target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(counted, lse - z_target, 0.0))
        if NEED_GRAD:
            # pass 2: the gradient over the same blocks; ignored rows get zeros (they count for nothing)
            w = tl.where(counted, tl.load(scale_ptr).to(tl.float32), 0.0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(z_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * w
                tl.store(z_ptr + cols, g, mask=cols < V)


def _cross_entropy_rows_triton(logits, targets, ignore_index, scale, need_grad, block_v=None):
    """_cross_entropy_rows_torch with one Triton program per row (online over V in blocks of block_v columns)."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along V (the kernel overwrites them in place)")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block_v = block_v or min(4096, triton.next_power_of_2(V))
    _cross_entropy_rows_kernel[(n,)](logits, logits.stride(0), targets.contiguous(), loss, scale.reshape(1), V,
                                     ignore_index, NEED_GRAD=need_grad, BLOCK_V=block_v,
                                     num_warps=8 if block_v >= 2048 else 4)
    return loss


def linear_cross_entropy_triton(x, weight, targets, ignore_index=-1, chunk_size=None):
    """linear_cross_entropy_torch with each chunk's softmax/CE and logits -> gradient step in one Triton kernel
    (two passes over the chunk's logits instead of ~8); the matmuls stay in torch (cuBLAS). fp64 logits are
    computed in fp32 by the kernel."""
    return _linear_cross_entropy(x, weight, targets, ignore_index, chunk_size, _cross_entropy_rows_triton)


if HAS_TRITON:

    @triton.jit
    def _linear_scan_fwd_kernel(a_ptr, b_ptr, h_ptr, a_off_ptr, R, T,
                                stride_a_batch, stride_a_t, stride_b_batch, stride_b_t,
                                BLOCK: tl.constexpr):
        # one program: BLOCK of the R flattened channels of one batch element, sequential over T
        pid_r, pid_b = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK + tl.arange(0, BLOCK)
        mask = r < R
        # a is read through its own (possibly zero, i.e. broadcast) strides: a_off[r] is channel r's offset
        a_ptrs = a_ptr + pid_b.to(tl.int64) * stride_a_batch + tl.load(a_off_ptr + r, mask=mask, other=0)
        b_ptrs = b_ptr + pid_b.to(tl.int64) * stride_b_batch + r
        h_ptrs = h_ptr + pid_b.to(tl.int64) * stride_b_batch + r  # h is laid out like (contiguous) b
        h = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(T):
            a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
            h = a * h + x
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)
            a_ptrs += stride_a_t  # pointer increments stay 64-bit however large T * stride gets
            b_ptrs += stride_b_t
            h_ptrs += stride_b_t

    @triton.jit
    def _linear_scan_bwd_kernel(a_ptr, h_ptr, dh_ptr, db_ptr, da_ptr, a_off_ptr, R, T,
                                stride_a_batch, stride_a_t, stride_b_batch, stride_b_t,
                                BLOCK: tl.constexpr):
        # g_t = dh_t + a_{t+1} g_{t+1}, backwards in time; db_t = g_t, da_t = g_t h_{t-1} (da_0 = 0).
        # h, dh, db and da (fp32) all share b's contiguous layout.
        pid_r, pid_b = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK + tl.arange(0, BLOCK)
        mask = r < R
        last = tl.cast(T - 1, tl.int64)  # T may arrive as constexpr 1, hence tl.cast over .to
        a_ptrs = a_ptr + pid_b.to(tl.int64) * stride_a_batch + tl.load(a_off_ptr + r, mask=mask, other=0) \
            + last * stride_a_t
        offs = pid_b.to(tl.int64) * stride_b_batch + last * stride_b_t + r
        h_ptrs, dh_ptrs, db_ptrs, da_ptrs = h_ptr + offs, dh_ptr + offs, db_ptr + offs, da_ptr + offs
        g = tl.zeros([BLOCK], dtype=tl.float32)
        a_next = tl.zeros([BLOCK], dtype=tl.float32)  # a_T: nothing comes after the last step
        for _ in range(T - 1):  # steps T-1 .. 1; step 0 has no h_{-1} and is done below
            g = tl.load(dh_ptrs, mask=mask, other=0.0).to(tl.float32) + a_next * g
            h_prev = tl.load(h_ptrs - stride_b_t, mask=mask, other=0.0).to(tl.float32)
            tl.store(db_ptrs, g.to(db_ptr.dtype.element_ty), mask=mask)
            tl.store(da_ptrs, g * h_prev, mask=mask)
            a_next = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
            a_ptrs -= stride_a_t
            h_ptrs -= stride_b_t
            dh_ptrs -= stride_b_t
            db_ptrs -= stride_b_t
            da_ptrs -= stride_b_t
        g = tl.load(dh_ptrs, mask=mask, other=0.0).to(tl.float32) + a_next * g
        tl.store(db_ptrs, g.to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptrs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)

    def _scan_launch_params(b):
        batch, R = b.shape[0], math.prod(b.shape[2:])
        BLOCK = min(128, triton.next_power_of_2(R))  # small blocks: many programs hide the per-step load latency
        return (triton.cdiv(R, BLOCK), batch), BLOCK, max(1, min(4, BLOCK // 32))

    def _channel_offsets(a, b):
        """Offset of a's element for each of b's R flattened channels (b[:, :, *rest]), through a.expand(b.shape)'s
        strides, zero where a broadcasts: R int64s instead of a materialised copy of a."""
        off = torch.zeros((), dtype=torch.int64, device=b.device)
        for size, stride in zip(b.shape[2:], a.expand(b.shape).stride()[2:]):
            off = off[..., None] + torch.arange(size, device=b.device) * stride
        return off.reshape(-1)  # (R,)

    class LinearScanTriton(torch.autograd.Function):
        """linear_scan_torch with a Triton forward and backward: fp32 math and state in registers, one pass over
        time each way. Saves a (as given) and h."""

        @staticmethod
        def forward(ctx, a, b):
            b = b.contiguous()
            a_full = a.expand(b.shape)  # strides only (zero where broadcast), no copy
            a_off = _channel_offsets(a, b)
            h = torch.empty_like(b)
            grid, BLOCK, num_warps = _scan_launch_params(b)
            _linear_scan_fwd_kernel[grid](a_full, b, h, a_off, a_off.numel(), b.shape[1],
                                          a_full.stride(0), a_full.stride(1), b.stride(0), b.stride(1),
                                          BLOCK=BLOCK, num_warps=num_warps)
            ctx.save_for_backward(a, h, a_off)
            return h

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_h):
            a, h, a_off = ctx.saved_tensors
            grad_h = grad_h.contiguous()  # may arrive expanded (e.g. only h[:, -1] was used)
            a_full = a.expand(h.shape)
            grad_b = torch.empty_like(h)
            grad_a = torch.empty(h.shape, dtype=torch.float32, device=h.device)  # fp32 until reduced below
            grid, BLOCK, num_warps = _scan_launch_params(h)
            _linear_scan_bwd_kernel[grid](a_full, h, grad_h, grad_b, grad_a, a_off, a_off.numel(), h.shape[1],
                                          a_full.stride(0), a_full.stride(1), h.stride(0), h.stride(1),
                                          BLOCK=BLOCK, num_warps=num_warps)
            return grad_a.sum_to_size(a.shape).to(a.dtype), grad_b

    def linear_scan_triton(a, b):
        """linear_scan_torch with Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1). fp32/fp16/bf16
        inputs, fp32 math, output in b's dtype."""
        return LinearScanTriton.apply(a, b)


# === CUDA C++: RMSNorm, built on first use ===

_RMS_NORM_CPP = """
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps);
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& rstd);
"""

_RMS_NORM_CUDA = r"""
#include <vector>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over the block, returned to every thread; blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? warp_sums[lane] : 0.f;  // every warp adds up the partials: no second broadcast
  v = warp_sum(v);
  __syncthreads();  // all have read warp_sums before the next call writes it
  return v;
}

// One block per row. y = w * x_t(x * rstd): the normalised x is rounded to x's dtype before the weight multiplies it,
// as the torch path's .type_as(x) does; w is already in the output dtype o_t.
template <typename x_t, typename o_t>
__global__ void rms_norm_fwd_kernel(const x_t* __restrict__ x, const o_t* __restrict__ w, o_t* __restrict__ y,
                                    float* __restrict__ rstd, int64_t C, float eps) {
  const int64_t row = blockIdx.x;
  x += row * C;
  y += row * C;
  float sum_sq = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float v = static_cast<float>(x[j]);
    sum_sq += v * v;
  }
  const float r = rsqrtf(block_sum(sum_sq) / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const x_t n = static_cast<x_t>(static_cast<float>(x[j]) * r);
    y[j] = static_cast<o_t>(static_cast<float>(n) * static_cast<float>(w[j]));
  }
}

// Blocks stride over rows. With n = x * r, r = (mean(x^2) + eps)^-1/2 and dn = dy * w:
//   dx = r * dn - r^3 * x * mean(dn * x),   dw = sum over rows of dy * n.
// Each block adds its rows' dy * n into its own row of dw_part (thread j owns columns j, j + blockDim.x, ...: no
// races, no atomics, deterministic); the host sums dw_part over blocks.
template <typename x_t, typename o_t>
__global__ void rms_norm_bwd_kernel(const o_t* __restrict__ dy, const x_t* __restrict__ x, const o_t* __restrict__ w,
                                    const float* __restrict__ rstd, x_t* __restrict__ dx, float* __restrict__ dw_part,
                                    int64_t N, int64_t C) {
  float* dwp = dw_part + static_cast<int64_t>(blockIdx.x) * C;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const o_t* dyr = dy + row * C;
    const x_t* xr = x + row * C;
    x_t* dxr = dx + row * C;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float xv = static_cast<float>(xr[j]), g = static_cast<float>(dyr[j]);
      // rounded as autograd rounds it: dy * w in the output dtype, then to x's dtype (the .type_as backward)
      const float dn = static_cast<float>(static_cast<x_t>(static_cast<o_t>(g * static_cast<float>(w[j]))));
      dot += dn * xv;
      dwp[j] += g * static_cast<float>(static_cast<x_t>(xv * r));
    }
    const float c = block_sum(dot) * r * r / static_cast<float>(C);  // r^2 * mean(dn * x)
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const float xv = static_cast<float>(xr[j]), g = static_cast<float>(dyr[j]);
      const float dn = static_cast<float>(static_cast<x_t>(static_cast<o_t>(g * static_cast<float>(w[j]))));
      dxr[j] = static_cast<x_t>(r * (dn - xv * c));
    }
  }
}

int threads_for(int64_t C) {  // ~4 columns per thread, 32 .. 1024 threads
  int threads = 32;
  while (threads < 1024 && threads * 4 < C) threads *= 2;
  return threads;
}

// Calls f(x_t{}, o_t{}) for the supported (x dtype, output dtype) pairs: the output is x's dtype or fp32.
template <typename F>
void dispatch_types(at::ScalarType xt, at::ScalarType ot, const F& f) {
  if (xt == at::kFloat && ot == at::kFloat) f(float{}, float{});
  else if (xt == at::kHalf && ot == at::kHalf) f(at::Half{}, at::Half{});
  else if (xt == at::kHalf && ot == at::kFloat) f(at::Half{}, float{});
  else if (xt == at::kBFloat16 && ot == at::kBFloat16) f(at::BFloat16{}, at::BFloat16{});
  else if (xt == at::kBFloat16 && ot == at::kFloat) f(at::BFloat16{}, float{});
  else TORCH_CHECK(false, "rms_norm_cuda: unsupported dtypes x=", xt, ", output=", ot);
}

void check_inputs(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "rms_norm_cuda: x must be a contiguous (N, C) CUDA tensor");
  TORCH_CHECK(w.is_cuda() && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1),
              "rms_norm_cuda: weight must be a contiguous (C,) CUDA tensor");
  TORCH_CHECK(x.device() == w.device(), "rms_norm_cuda: x and weight on different devices");
}

}  // namespace

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_inputs(x, w);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  auto y = at::empty({N, C}, x.options().dtype(w.scalar_type()));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0 || C == 0) return {y, rstd};
  TORCH_CHECK(N <= 2147483647, "rms_norm_cuda: more than 2^31 - 1 rows");
  const int threads = threads_for(C);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), w.scalar_type(), [&](auto x_tag, auto o_tag) {
    using x_t = decltype(x_tag);
    using o_t = decltype(o_tag);
    rms_norm_fwd_kernel<x_t, o_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        x.data_ptr<x_t>(), w.data_ptr<o_t>(), y.data_ptr<o_t>(), rstd.data_ptr<float>(), C, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& rstd) {
  check_inputs(x, w);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == w.scalar_type(),
              "rms_norm_cuda: grad_output must be contiguous, shaped as x, in the output dtype");
  TORCH_CHECK(rstd.is_contiguous() && rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0),
              "rms_norm_cuda: rstd must be (N,) fp32");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  if (N == 0 || C == 0) return {dx, at::zeros({C}, x.options().dtype(at::kFloat))};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::min<int64_t>(N, 4 * static_cast<int64_t>(sms));  // dw_part stays (4 * SMs, C)
  auto dw_part = at::zeros({blocks, C}, x.options().dtype(at::kFloat));
  const int threads = threads_for(C);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), w.scalar_type(), [&](auto x_tag, auto o_tag) {
    using x_t = decltype(x_tag);
    using o_t = decltype(o_tag);
    rms_norm_bwd_kernel<x_t, o_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        dy.data_ptr<o_t>(), x.data_ptr<x_t>(), w.data_ptr<o_t>(), rstd.data_ptr<float>(), dx.data_ptr<x_t>(),
        dw_part.data_ptr<float>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw_part.sum(0)};
}
"""


@functools.cache
def _rms_norm_extension():
    """Compiles the CUDA source once per process (load_inline reuses its build under TORCH_EXTENSIONS_DIR,
    by default ~/.cache/torch_extensions, across processes)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError(f"kernels=cuda needs a CUDA GPU and a CUDA build of torch (this is torch {torch.__version__}"
                           f", CUDA {'not built in' if torch.version.cuda is None else 'available: no GPU found'}); "
                           f"use --kernels=auto")
    from torch.utils.cpp_extension import load_inline
    return load_inline(name="gaia_rms_norm", cpp_sources=_RMS_NORM_CPP, cuda_sources=_RMS_NORM_CUDA,
                       functions=["rms_norm_fwd", "rms_norm_bwd"], extra_cuda_cflags=["-O3"])


class RMSNormCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ext = _rms_norm_extension()
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"rms_norm_cuda takes fp32, fp16 or bf16 x, not {x.dtype}")
        out_dtype = torch.promote_types(x.dtype, weight.dtype)  # (x, out) is then one of the pairs the kernels take
        x2 = x.reshape(-1, x.shape[-1]).contiguous()                # (N, C)
        w = weight.to(out_dtype).contiguous()                       # exact: a float type promoted to a wider one
        y, rstd = ext.rms_norm_fwd(x2, w, float(eps))
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, w, rstd = ctx.saved_tensors
        dy = grad_y.reshape(x2.shape).to(w.dtype).contiguous()
        dx, dw = _rms_norm_extension().rms_norm_bwd(dy, x2, w, rstd)
        return dx.view(ctx.x_shape), dw.to(ctx.weight_dtype), None


def rms_norm_cuda(x, weight, eps):
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).type_as(x) for x (..., C) fp32/fp16/bf16 on a CUDA GPU, weight (C,);
    output dtype promote_types(weight.dtype, x.dtype); grads for x and weight from the CUDA backward."""
    return RMSNormCUDA.apply(x, weight, eps)


# === C for the CPU: GPT-2's GELU, built on first use ===
# ATen has no fast CPU kernel for the tanh GELU, and GELUTanhCPU, though faster than it, makes ten passes over
# memory forward and sixteen backward where one loop makes two and three. This loop, compiled with the machine's
# C compiler (cc, or $CC) on first use, runs gelu_tanh for fp32 CPU tensors under kernels=auto; where there is no
# compiler, or glibc's vector math library (libmvec) is missing so expf would not vectorize, GELUTanhCPU runs.

_GELU_TANH_C = r"""
#include <math.h>
#include <stdint.h>
#define A %(A)rf  /* 2 sqrt(2/pi): 0.5 (1 + tanh(z)) = sigmoid(2z) */
#define C %(C)rf

/* glibc's libmvec has expf for 4, 8 and 16 lanes (_ZGV*_expf): declared so, gcc calls them in the loops below */
#pragma omp declare simd notinbranch
float expf(float);

/* sigmoid(u), u = A (x + C x^3); 0 below u = -80 (where it is < 2e-35), so expf(-u) never overflows and
   x sigmoid(u) is exactly 0 for large negative x, as the formula's tanh gives */
static inline float sigmoid_u(float x) {
    float u = x * (A + A * C * x * x);
    u = u > 80.0f ? 80.0f : u;
    return u < -80.0f ? 0.0f : 1.0f / (1.0f + expf(-u));
}

void gelu_tanh_forward(const float *restrict x, float *restrict y, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * sigmoid_u(x[i]);
}

/* d/dx [x s(u)] = s + x s (1 - s) u', u' = A (1 + 3 C x^2) with x capped at |x| = 20 (s (1 - s) is 0 there) */
void gelu_tanh_backward(const float *restrict x, const float *restrict dy, float *restrict dx, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float s = sigmoid_u(x[i]), w = x[i] > 20.0f ? 20.0f : (x[i] < -20.0f ? -20.0f : x[i]);
        dx[i] = dy[i] * (s + x[i] * s * (1.0f - s) * (A + 3.0f * A * C * w * w));
    }
}
"""
# no -ffast-math: its reassociation turns x s (1 - s) into x s - x s s, garbage for large x, and a shared library
# linked with it flushes denormals to zero in the whole process, torch included
C_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
C_GRAIN = 1 << 16  # elements per thread: smaller tensors run in one thread
c_unavailable = None  # why the C loop is not used on this machine (a line), once _c_library has looked


@functools.cache
def _c_library():
    """The compiled loop (ctypes), built once per machine and source into $GAIA_CACHE_DIR (default ~/.cache/gaia),
    keyed by a hash of the source, the flags and the CPU's features (-march=native); None where it cannot be built."""
    global c_unavailable
    import ctypes
    import hashlib
    import platform
    import shutil
    import subprocess
    import tempfile
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        c_unavailable = f"no C compiler ({cc!r} not found; set CC)"
        return None
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    source = _GELU_TANH_C % dict(A=GELUTanhCPU.A, C=GELUTanhCPU.C)  # the torch path's constants
    key = hashlib.sha256("\0".join([source, cc, *C_FLAGS, cpu]).encode()).hexdigest()[:16]
    cache = os.environ.get("GAIA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gaia")
    path = os.path.join(cache, f"gelu_tanh_{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, lib = os.path.join(tmp, "gelu.c"), os.path.join(tmp, "gelu.so")
                with open(src, "w") as f:
                    f.write(source)
                subprocess.run([cc, *C_FLAGS, src, "-o", lib, "-lmvec", "-lm"], check=True, capture_output=True,
                               timeout=120)
                with open(lib, "rb") as f:
                    if b"_ZGV" not in f.read():  # libmvec's vector function names: without them expf ran scalar
                        c_unavailable = f"{cc} did not vectorize expf (no libmvec calls); the torch path is faster"
                        return None
                os.replace(lib, path)  # atomic: processes building at once each put a whole file in place
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            c_unavailable = f"building the C GELU failed: {e} {err.decode(errors='replace').strip()[:300]}"
            return None
    lib = ctypes.CDLL(path)
    ptr, n = ctypes.c_void_p, ctypes.c_int64
    lib.gelu_tanh_forward.argtypes = [ptr, ptr, n]
    lib.gelu_tanh_backward.argtypes = [ptr, ptr, ptr, n]
    return lib


@functools.cache
def _c_threads(n):
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(n, thread_name_prefix="gaia-c")


def _c_run(fn, tensors, n):
    """fn(pointers..., count) over n elements of contiguous fp32 tensors, split across torch's thread count: ctypes
    lets go of the GIL during the call, so Python threads run the pieces side by side."""
    threads = max(1, min(torch.get_num_threads(), n // C_GRAIN))
    step = math.ceil(n / threads / 16) * 16 if threads > 1 else max(n, 1)  # whole 64-byte lines per piece
    jobs = [_c_threads(threads).submit(fn, *(t.data_ptr() + 4 * i for t in tensors), min(step, n - i))
            for i in range(step, n, step)]  # every piece but the first to the pool; this thread takes the first
    fn(*(t.data_ptr() for t in tensors), min(step, n))
    for job in jobs:
        job.result()


class GELUTanhC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        _c_run(_c_library().gelu_tanh_forward, (x, y), x.numel())
        ctx.save_for_backward(x)  # only x: the backward recomputes sigmoid(u) in its one pass
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        dx = torch.empty_like(x)
        _c_run(_c_library().gelu_tanh_backward, (x, dy, dx), x.numel())
        return dx


def use_c(x):
    """Whether gelu_tanh takes the C loop: kernels=auto (or cuda) and an fp32 tensor on the CPU that is not a DTensor
    and not being traced by torch.compile, on a machine where the loop builds."""
    return (_backend in ("auto", "cuda") and x.device.type == "cpu" and x.dtype == torch.float32
            and not isinstance(x, DTensor) and not torch.compiler.is_compiling() and _c_library() is not None)


def gelu_tanh_c(x):
    """gelu_tanh_torch for an fp32 CPU tensor, one pass forward and one backward (the C loop above)."""
    return GELUTanhC.apply(x)
