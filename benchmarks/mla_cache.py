"""
Benchmark of mla.py's decoding cache: bytes per token of MLA's latent cache vs the per-head K/V cache MHA
with the same heads would hold, and decode tokens/s of three ways to decode the same model:
  absorbed  caches [c_KV | k_R]; W_UK folded into the query, W_UV into the output (mla.py's generate)
  expanded  caches [c_KV | k_R] but re-expands every head's K and V over the whole prefix at each step
            (what transformers' DeepseekV3 does): ExpandedAttention below
  kv        caches every head's K and V (MHA-sized cache), computed once per token: KVAttention below
The two baselines are decoding paths of the same weights, kept here rather than in mla.py (benchmark only).

  python bench.py mla                      # defaults below, CPU
  python bench.py mla --contexts=128,1024 --new_tokens=32 --batch=1
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mla  # noqa: E402


class ExpandedAttention(mla.MultiHeadLatentAttention):
    """Caches the latents [c_KV | k_R] as mla.py does, but re-expands every head's keys and values over the
    whole prefix at every decoding step (what transformers' DeepseekV3 does)."""

    def forward(self, x, cos, sin, cache=None, layer=0):
        if cache is None:  # no cache: mla.py's own path
            return super().forward(x, cos, sin)
        q_c, q_r, c_kv, k_r = self.project(x, cos, sin)
        latent, mask = cache.update(layer, torch.cat((c_kv, k_r[:, :, 0]), dim=-1))
        r = self.kv_lora_rank
        return self.expanded(q_c, q_r, latent[..., :r], latent[:, :, None, r:], mask)


class KVAttention(mla.MultiHeadLatentAttention):
    """Caches every head's keys [k_C | k_R] and values, computed once per token: the cache MHA with the same
    heads would hold."""

    def forward(self, x, cos, sin, cache=None, layer=0):
        if cache is None:  # no cache: mla.py's own path
            return super().forward(x, cos, sin)
        q_c, q_r, c_kv, k_r = self.project(x, cos, sin)
        B, T, H, dn = q_c.shape
        k = torch.cat((self.w_uk(c_kv).view(B, T, H, dn), k_r.expand(-1, -1, H, -1)), dim=-1).transpose(1, 2)
        v = self.w_uv(c_kv).view(B, T, H, self.v_dim).transpose(1, 2)
        k, v, mask = cache.update(layer, k, v)  # (B, H, pos + T, d_h + d_h^R), (B, H, pos + T, d_v)
        q = torch.cat((q_c, q_r), dim=-1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self.w_o(y.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """Every layer's per-head keys and values (as gpt2.py's cache), for KVAttention."""

    def __init__(self, n_layer, batch, n_head, max_len, k_dim, v_dim, device, dtype):
        self.k = torch.empty(n_layer, batch, n_head, max_len, k_dim, device=device, dtype=dtype)
        self.v = torch.empty(n_layer, batch, n_head, max_len, v_dim, device=device, dtype=dtype)
        self.pos = 0

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos) if T > 1 else None
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask


ATTENTION = {"absorbed": mla.MultiHeadLatentAttention, "expanded": ExpandedAttention, "kv": KVAttention}


def decode_with(model, kind):
    """Switch model's attention layers to decode the `kind` way (same weights); returns the matching
    make_cache(batch, max_len)."""
    for block in model.transformer.h:
        block.attn.__class__ = ATTENTION[kind]
    c, p = model.config, model.lm_head.weight
    if kind == "kv":
        dims = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim)
        return lambda batch, max_len: KVCache(c.n_layer, batch, c.n_head, max_len, *dims, p.device, p.dtype)
    return model.make_cache


def cache_bytes_rows(config, dtype):
    """(MLA's latent cache, MHA's cache with the same heads): bytes per token, from the tensors each allocates."""
    c = config
    latent = mla.LatentCache(c.n_layer, 1, 1, c.kv_lora_rank + c.qk_rope_head_dim, "cpu", dtype)
    kv = KVCache(c.n_layer, 1, c.n_head, 1, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, "cpu", dtype)
    return latent.nbytes, kv.nbytes  # one token of room: bytes per token


@torch.no_grad()
def decode_tokens_per_s(model, kinds, context, new_tokens, batch, repeats):
    """Prefill `context` random tokens into each kind of cache (not timed), then time `new_tokens` single-token
    greedy steps; repeats rewind the cache to `context` and alternate the kinds, so load drift hits all alike."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, context))
    caches, first = {}, {}
    for k in kinds:
        caches[k] = decode_with(model, k)(batch, context + new_tokens)
        first[k] = model(prompt, cache=caches[k])[0][:, -1:].argmax(-1)
    times = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            decode_with(model, k)
            cache, token = caches[k], first[k]
            cache.pos = context
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, cache=cache)[0][:, -1:].argmax(-1)
            times[k].append(time.perf_counter() - t0)
    decode_with(model, "absorbed")
    return {k: batch * new_tokens / statistics.median(times[k]) for k in kinds}


def bench_mla(args):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    config = mla.Config(vocab_size=args.vocab_size, block_size=max(contexts) + args.new_tokens, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd, q_lora_rank=args.q_lora_rank,
                        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
                        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim)
    model = mla.Model(config).eval()
    c = config
    print(f"model: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} kv_lora_rank={c.kv_lora_rank} "
          f"qk_nope/rope/v_head_dim={c.qk_nope_head_dim}/{c.qk_rope_head_dim}/{c.v_head_dim} vocab={c.vocab_size} "
          f"| torch {torch.__version__}, {torch.get_num_threads()} threads, batch={args.batch}")

    print("\ncache bytes per token (measured from the allocated cache tensors)")
    print(f"{'config':<34}{'dtype':<10}{'MLA latent':>12}{'MHA same heads':>16}{'ratio':>8}")
    v3 = mla.Config(n_layer=61, n_head=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, first_k_dense_replace=3, n_experts=256, n_group=8, topk_group=4,
                    n_experts_per_tok=8)
    for name, cfg, dtype in (("this model", config, torch.float32), ("this model", config, torch.bfloat16),
                             ("DeepSeek-V3 shapes (61 layers)", v3, torch.bfloat16)):
        mla_b, mha_b = cache_bytes_rows(cfg, dtype)
        print(f"{name:<34}{str(dtype).removeprefix('torch.'):<10}{mla_b:>12,.0f}{mha_b:>16,.0f}{mha_b / mla_b:>7.1f}x")

    print(f"\ndecode tokens/s (median of {args.repeats}, {args.new_tokens} new tokens after a prefill of `context`)")
    kinds = ("absorbed", "expanded", "kv")
    print(f"{'context':>8}" + "".join(f"{k:>12}" for k in kinds) + f"{'absorbed/expanded':>19}{'absorbed/kv':>13}")
    for context in contexts:
        tps = decode_tokens_per_s(model, kinds, context, args.new_tokens, args.batch, args.repeats)
        print(f"{context:>8}" + "".join(f"{tps[k]:>12.1f}" for k in kinds)
              + f"{tps['absorbed'] / tps['expanded']:>18.2f}x{tps['absorbed'] / tps['kv']:>12.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="128,1024,4096", help="prefix lengths to decode after, comma-separated")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--q_lora_rank", type=int, default=96)
    p.add_argument("--kv_lora_rank", type=int, default=64)
    p.add_argument("--qk_nope_head_dim", type=int, default=32)
    p.add_argument("--qk_rope_head_dim", type=int, default=16)
    p.add_argument("--v_head_dim", type=int, default=32)
    bench_mla(p.parse_args())
