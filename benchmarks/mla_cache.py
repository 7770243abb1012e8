"""
Benchmark of mla.py's decoding cache: bytes per token of MLA's latent cache vs the per-head K/V cache MHA
with the same heads would hold, and decode tokens/s of three ways to decode the same model:
  absorbed  caches [c_KV | k_R]; W_UK folded into the query, W_UV into the output (mla.py's generate)
  expanded  caches [c_KV | k_R] but re-expands every head's K and V over the whole prefix at each step
            (what transformers' DeepseekV3 does)
  kv        caches every head's K and V (MHA-sized cache), computed once per token

  python bench.py mla                      # defaults below, CPU
  python bench.py mla --contexts=128,1024 --new_tokens=32 --batch=1
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mla  # noqa: E402


def cache_bytes_rows(config, dtype):
    """(name, bytes per token) measured from the tensors each cache allocates (one token of room)."""
    c = config
    latent = mla.LatentCache(c.n_layer, 1, 1, c.kv_lora_rank + c.qk_rope_head_dim, "cpu", dtype)
    kv = mla.KVCache(c.n_layer, 1, c.n_head, 1, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, "cpu", dtype)
    return latent.bytes_per_token(), kv.bytes_per_token()


@torch.no_grad()
def decode_tokens_per_s(model, kinds, context, new_tokens, batch, repeats):
    """Prefill `context` random tokens into each kind of cache (not timed), then time `new_tokens` single-token
    greedy steps; repeats rewind the cache to `context` and alternate the kinds, so load drift hits all alike."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, context))
    caches = {k: model.make_cache(batch, context + new_tokens, k) for k in kinds}
    first = {k: model(prompt, cache=caches[k])[0][:, -1:].argmax(-1) for k in kinds}
    times = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            cache, token = caches[k], first[k]
            cache.pos = context
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, cache=cache)[0][:, -1:].argmax(-1)
            times[k].append(time.perf_counter() - t0)
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
                    v_head_dim=128, first_k_dense_replace=3, n_routed_experts=256, n_group=8, topk_group=4,
                    num_experts_per_tok=8)
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
