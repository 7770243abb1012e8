"""
Every gaia test. `python test_all.py` runs them (pytest underneath); extra arguments go to pytest,
e.g. `python test_all.py -k llama -x`.

Each test checks behaviour against an independent reference: Hugging Face transformers holding the
same weights, a slow loop written here, or a formula; never against gaia's own output.
"""
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import configurator  # noqa: E402  (the project's modules, from ROOT)
import data  # noqa: E402
import gpt2  # noqa: E402
import jepa  # noqa: E402
import kernels  # noqa: E402
import llama  # noqa: E402
import mamba  # noqa: E402
import mla  # noqa: E402
import moe  # noqa: E402
import speedrun  # noqa: E402
import train  # noqa: E402
import vla  # noqa: E402
import vlm  # noqa: E402
from export import main as export_main  # noqa: E402
from sample import main as sample_main  # noqa: E402

MODELS = train.model_files()


# ------------------------------------------------------------------------------------- shared helpers

def randomize_constant_params(model):
    """transformers initialises every norm gain to 1 and every bias to 0: a swapped norm, or q and v biases
    loaded in the wrong order, would then change nothing. Give each such tensor random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 0.6 - 0.3)
    return model


def hf_roundtrip(module, hf_model, tmp_path, vocab_size, seq_len=24, atol=1e-4, max_shard_size=None):
    """The reference model (random init, transformers, constant tensors randomized) saved with save_pretrained
    must load into gaia's `module.Model` with logits within atol in fp32; gaia's save_pretrained must load
    back into transformers with the same logits. max_shard_size (e.g. "20KB") saves the reference as
    several safetensors files with a model.safetensors.index.json, as large checkpoints ship. Returns gaia's model."""
    torch.manual_seed(0)
    hf_model = randomize_constant_params(hf_model.float().eval())
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "gaia"
    if max_shard_size is None:
        hf_model.save_pretrained(hf_dir)
    else:
        hf_model.save_pretrained(hf_dir, max_shard_size=max_shard_size)
        assert (hf_dir / "model.safetensors.index.json").exists() and not (hf_dir / "model.safetensors").exists()
    model = module.Model.from_pretrained(str(hf_dir)).float().eval()
    idx = torch.randint(0, vocab_size, (2, seq_len))
    with torch.no_grad():
        ref = hf_model(idx).logits
        ours, _ = model(idx)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    model.save_pretrained(str(back_dir))
    reloaded = type(hf_model).from_pretrained(back_dir).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ref, atol=atol, rtol=0)
    return model


def check_cached_decode(model, vocab_size, prompt_len=5, new_tokens=32, atol=1e-5):
    """Greedy decoding with the model's cache must pick the tokens, and see the logits, that a full
    forward over the whole sequence gives at every position (the cache-free definition)."""
    torch.manual_seed(0)
    model.eval()
    prompt = torch.randint(0, vocab_size, (2, prompt_len))
    with torch.no_grad():
        out, step_logits = model.generate(prompt, new_tokens, temperature=0, return_logits=True)
        full, _ = model(out[:, :-1])
    assert out.shape == (2, prompt_len + new_tokens)
    ref = full[:, prompt_len - 1:]  # logits that predicted each generated token
    torch.testing.assert_close(step_logits, ref, atol=atol, rtol=0)
    assert torch.equal(out[:, prompt_len:], ref.argmax(-1))





def config_keys(model):
    """The Config field names of a model file."""
    return {f.name for f in train.fields(train.load_model_module(model).Config)}
TINY_RUN = ["--tokenizer=byte", "--block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
            "--sample_tokens=0", "--learning_rate=3e-3", "--warmup_iters=2"]


def run_train(*args, out_dir, cache_dir=None, base=TINY_RUN):
    """train.py in this process (fast) with base (a tiny text run's keys) then args; returns the rows of its metrics.jsonl."""
    args = [*base, f"--out_dir={out_dir}", f"--cache_dir={cache_dir or os.path.join(out_dir, 'cache')}", *args]
    train.train(list(args))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_main(capsys, *args, main=train.main):
    """train.py's (or another script's) main() in this process, as the command line calls it: returns (exit code,
    output)."""
    capsys.readouterr()  # only this call's output
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def run_cli(*args, script="train.py", env=None):
    """A script as a user runs it: returns (exit code, stdout + stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    return p.returncode, p.stdout + p.stderr


# ------------------------------------------------------------------------------------- configurator

def table():
    return configurator.key_table(train.TrainConfig, gpt2.Config)


def test_configurator_parses_and_checks_types():
    cfg, explicit = configurator.resolve([], {"learning_rate": "3", "compile": "true", "wandb_log": "1", "bias": "False",
                                              "out_dir": "123", "top_k": "None", "n_layer": "6"}, table())
    assert cfg["learning_rate"] == 3.0 and isinstance(cfg["learning_rate"], float)  # int -> float allowed
    assert cfg["compile"] is True and cfg["wandb_log"] is True and cfg["bias"] is False
    assert cfg["out_dir"] == "123" and cfg["top_k"] is None and cfg["n_layer"] == 6
    assert explicit == {"learning_rate", "compile", "wandb_log", "bias", "out_dir", "top_k", "n_layer"}
    for key, bad in (("n_layer", "4.5"), ("n_layer", "four"), ("compile", "yes"), ("learning_rate", "fast")):
        with pytest.raises(configurator.ConfigError, match=f"{key}=.*not a valid"):
            configurator.resolve([], {key: bad}, table())


def test_configurator_unknown_key_suggests_the_closest():
    with pytest.raises(configurator.ConfigError, match="unknown key n_layers.*did you mean n_layer"):
        configurator.resolve([], {"n_layers": "4"}, table())
    with pytest.raises(configurator.ConfigError, match="unknown key zzz.*--help"):
        configurator.resolve([], {"zzz": "4"}, table())
    with pytest.raises(configurator.ConfigError, match="no value"):
        configurator.split_args(["--n_layer"])


def test_configurator_file_then_command_line(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nn_layer = 7\nlearning_rate = 2e-4\n_private = 1\n")
    files, overrides = configurator.split_args([str(f), "--learning_rate=5e-4"])
    cfg, _ = configurator.resolve(files, overrides, table())
    assert cfg["n_layer"] == 7 and cfg["learning_rate"] == 5e-4  # the command line wins over the file
    (tmp_path / "bad.py").write_text("n_layers = 7\n")
    with pytest.raises(configurator.ConfigError, match="n_layers.*bad.py.*did you mean n_layer"):
        configurator.resolve([str(tmp_path / "bad.py")], {}, table())
    with pytest.raises(configurator.ConfigError, match="does not exist"):
        configurator.split_args(["missing_config.py"])


def test_help_lists_every_key_with_default_and_type():
    code, out = run_cli("--model=gpt2", "--help")
    assert code == 0
    for key in [f.name for f in train.fields(train.TrainConfig)] + ["n_layer", "n_head", "n_embd", "bias", "dropout"]:
        assert f"--{key} " in out, key
    assert re.search(r"^  --learning_rate +float +default 0.002$", out, re.M), out  # the key, its type, its default


# ------------------------------------------------------------------------------------- data

def test_data_cache_is_reused_and_round_trips(tmp_path, monkeypatch):
    text = "héllo wörld\n" * 50
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    tok = data.ByteTokenizer()
    path, n = data.tokenize_to_cache(data.read_corpus(str(tmp_path / "a.txt")), tok, str(tmp_path / "cache"))
    assert n == len(text.encode("utf-8"))
    assert tok.decode(np.fromfile(path, dtype=np.uint16)) == text
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("a cached corpus was tokenized again"))
    path2, n2 = data.tokenize_to_cache(data.read_corpus(str(tmp_path / "a.txt")), tok, str(tmp_path / "cache"))
    assert (path2, n2) == (path, n)
    (tmp_path / "a.txt").write_text(text + "more", encoding="utf-8")  # new content, new cache entry
    monkeypatch.undo()
    path3, _ = data.tokenize_to_cache(data.read_corpus(str(tmp_path / "a.txt")), tok, str(tmp_path / "cache"))
    assert path3 != path


def test_gpt2_tokenizer_folder_corpus(tmp_path):
    try:
        tok = data.get_tokenizer("gpt2")
    except data.DataError as e:
        pytest.skip(str(e))  # no network and no TIKTOKEN_CACHE_DIR: the byte tokenizer covers the rest
    import tiktoken
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("Hello world.\n")
    (tmp_path / "d" / "2.txt").write_text("Goodbye, moon!\n")
    path, n = data.tokenize_to_cache(data.read_corpus(str(tmp_path / "d")), tok, str(tmp_path / "c"))
    enc = tiktoken.get_encoding("gpt2")
    expected = enc.encode("Hello world.\n") + [50256] + enc.encode("Goodbye, moon!\n") + [50256]
    assert np.fromfile(path, dtype=np.uint16).tolist() == expected


# ------------------------------------------------------------------------------------- gpt2.py
# Tests of gpt2.py. References: transformers' GPT2LMHeadModel holding the same weights, the cache-free full
# forward, GPT-2's tanh GELU formula in float64, and formulas for the parameter, FLOP and cache-byte counts.

def tiny_gpt2(**overrides):
    """A small random gpt2.Model for the tests: 2 layers, vocab 96, block_size 64."""
    torch.manual_seed(0)
    return gpt2.Model(gpt2.Config(**{**dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=32), **overrides}))


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one-file", "sharded"])
def test_gpt2_matches_transformers_and_round_trips(tmp_path, max_shard_size):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                    layer_norm_epsilon=1e-4))
    model = hf_roundtrip(gpt2, hf, tmp_path, vocab_size=101, max_shard_size=max_shard_size)
    assert (model.config.block_size, model.config.n_layer, model.config.norm_eps) == (48, 3, 1e-4)


def test_gpt2_without_bias_saves_a_transformers_model(tmp_path):
    from transformers import GPT2LMHeadModel
    model = tiny_gpt2(vocab_size=50, block_size=16, n_head=2, bias=False).eval()
    model.save_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_gpt2_rejects_unsupported_checkpoints(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"model_type": "qwen3_moe"}, "holds a 'qwen3_moe' model, not gpt2; use --model=moe"),
                            ({"model_type": "bert"}, "holds a 'bert' model, not gpt2; no gaia model file loads it"),
                            ({"activation_function": "relu"}, "activation_function='relu'"),
                            ({"n_inner": 64}, "n_inner=64 is not 4 \\* n_embd")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            gpt2.Model.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    ({"n_head": 0}, "n_head=0 must be >= 1"),
    ({"n_layer": -1}, "n_layer=-1 must be >= 1"),
    ({"n_embd": -8}, "n_embd=-8 must be >= 1"),
    ({"block_size": 0}, "block_size=0 must be >= 1"),
    ({"vocab_size": 0}, "vocab_size=0 must be >= 1"),
    ({"n_embd": 1000, "n_head": 3}, "n_embd=1000 is not divisible by n_head=3; choose n_embd as a multiple of n_head "
                                    "\\(e.g. --n_embd=999 or --n_head=4\\)"),
    ({"n_embd": 2, "n_head": 4}, "n_embd=2 is not divisible by n_head=4.*--n_embd=4 or --n_head=2"),
    ({"dropout": 2}, "dropout=2 must be in \\[0, 1\\); e.g. --dropout=0.1"),
    ({"dropout": -0.1}, "dropout=-0.1 must be in \\[0, 1\\)"),
    ({"norm_eps": 0.0}, "norm_eps=0.0 must be > 0"),
])
def test_gpt2_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        gpt2.Config(**overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_kv_cache_bytes(dtype):
    """bytes_per_token = 2 (k and v) * n_layer * n_head * head_dim * dtype size, per token of one sequence; the cache
    that generate() really allocates holds exactly that many bytes per token of each sequence."""
    n_layer, n_head, n_embd, batch, prompt, new = 3, 4, 64, 2, 5, 4
    model = tiny_gpt2(n_layer=n_layer, n_head=n_head, n_embd=n_embd).to(dtype).eval()
    caches = []
    make_cache = model.make_cache
    model.make_cache = lambda *a: caches.append(make_cache(*a)) or caches[-1]
    model.generate(torch.randint(0, 96, (batch, prompt)), new, temperature=0)
    (cache,) = caches
    per_token = 2 * n_layer * n_head * (n_embd // n_head) * torch.finfo(dtype).bits // 8
    assert isinstance(cache.bytes_per_token, int) and cache.bytes_per_token == per_token
    stored = sum(t.untyped_storage().nbytes() for t in (cache.k, cache.v))
    assert cache.nbytes == stored == per_token * batch * (prompt + new)


def test_gpt2_flops_per_token_formula():
    c = gpt2.Config(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)
    m = gpt2.Model(c)
    # parameters by hand: wte, per layer 2 LayerNorms + 4 attention Linears + 2 MLP Linears (with biases), ln_f
    per_layer = 2 * 2 * 32 + 4 * (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    n = 100 * 32 + 2 * per_layer + 2 * 32
    assert m.num_params() == n
    assert m.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


# ------------------------------------------------------------------ gpt2.py's GELU (kernels.gelu_tanh) against the formula

def gelu_tanh_reference(x):
    """GPT-2's gelu_new, as written in the paper's code."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


GELU_POINTS = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, 30, -30, 1e4, -1e4])])


def test_gpt2_cpu_gelu_is_the_tanh_formula():
    """The CPU fp32 branch (GELUTanhCPU, x * sigmoid(u) with a hand-written backward): values and gradients."""
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.GELUTanhCPU.apply, (x,))  # backward against finite differences
    torch.testing.assert_close(kernels.GELUTanhCPU.apply(x), gelu_tanh_reference(x), rtol=0, atol=1e-14)
    # float32, the path training takes, over the whole range: values and gradients against the formula's autograd
    x = torch.cat([GELU_POINTS, torch.tensor([1e30, -1e30])]).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = kernels.gelu_tanh_torch(x)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = gelu_tanh_reference(x64)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert y.grad_fn.name() == "GELUTanhCPUBackward"  # the dispatch took this branch
    torch.testing.assert_close(y.double(), y64.nan_to_num(), rtol=1e-6, atol=1e-6)  # 1e30^3 overflows the formula
    torch.testing.assert_close(dx.double(), dx64.nan_to_num(), rtol=1e-5, atol=1e-5)


def c_gelu_or_skip():
    if kernels._c_library() is None:
        pytest.skip(f"the C GELU does not build here: {kernels.c_unavailable}")


@pytest.mark.parametrize("threads, n", [(1, 13), (1, 3 * 2 ** 16 + 21), (3, 3 * 2 ** 16 + 21)])
def test_gpt2_c_gelu_is_the_tanh_formula(kernels_backend, threads, n):
    """The C loop kernels=auto runs for fp32 CPU tensors: values and gradients against the formula in float64 over
    the whole range (huge, tiny and denormal inputs included), on a transposed (non-contiguous) tensor: 13 elements
    (fewer than a vector: the compiler's scalar tail loop) or 3 * C_GRAIN + 21, which 3 threads cut into three
    pieces (the last one shorter, not a multiple of 16). Under kernels=torch GELUTanhCPU runs instead."""
    c_gelu_or_skip()
    kernels_backend("auto")
    assert kernels.C_GRAIN == 2 ** 16
    points = torch.cat([torch.tensor([1e30, -1e30, 1e-40, -1e4, 3.0]), GELU_POINTS])
    x = points.repeat(n // len(points) + 1)[:n]
    x = x.view(-1, 1 if n < 100 else 3).t().contiguous().t().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernels.gelu_tanh(x)
        (dx,) = torch.autograd.grad(y, x, g)
    finally:
        torch.set_num_threads(previous)
    assert y.grad_fn.name() == "GELUTanhCBackward"
    x64 = x.detach().double().requires_grad_()
    y64 = gelu_tanh_reference(x64)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    torch.testing.assert_close(y.double(), y64.nan_to_num(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64.nan_to_num(), rtol=1e-5, atol=1e-5)
    empty = torch.empty(0, 5, requires_grad=True)
    assert kernels.gelu_tanh(empty).grad_fn.name() == "GELUTanhCBackward" and kernels.gelu_tanh(empty).shape == (0, 5)
    kernels_backend("torch")
    assert kernels.gelu_tanh(x).grad_fn.name() == "GELUTanhCPUBackward"
    assert kernels.gelu_tanh(x.detach().double()).dtype == torch.float64  # not fp32: never the C loop


def test_gpt2_c_gelu_leaves_denormals_alone():
    """Loading the C library keeps the process's floating-point mode: a shared library linked with -ffast-math
    would switch on flush-to-zero for all of torch, and 1e-40 (a denormal) would become 0."""
    c_gelu_or_skip()
    tiny = torch.tensor([1e-40]) * torch.tensor([1.0])
    assert tiny.item() != 0 and torch.finfo(torch.float32).tiny > 1e-40


@pytest.mark.parametrize("cc, reason", [("/nonexistent/cc", "no C compiler"), ("false", "building the C GELU failed")])
def test_gpt2_c_gelu_falls_back_without_a_compiler(tmp_path, cc, reason):
    """No compiler, or one that fails: gelu_tanh runs GELUTanhCPU and kernels.c_unavailable says why; a working
    compiler builds the library once into GAIA_CACHE_DIR."""
    code = ("import torch, kernels; y = kernels.gelu_tanh(torch.randn(4, requires_grad=True)); "
            "print(y.grad_fn.name(), '|', kernels.c_unavailable)")
    env = dict(os.environ, CC=cc, GAIA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    name, why = out.stdout.strip().split(" | ")
    assert name == "GELUTanhCPUBackward" and why.startswith(reason)
    assert not list(tmp_path.glob("*.so"))
    if kernels._c_library() is not None:
        env["CC"] = os.environ.get("CC", "cc")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "GELUTanhCBackward | None"
        assert len(list(tmp_path.glob("gelu_tanh_*.so"))) == 1


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)])
def test_gpt2_gpu_gelu_is_the_tanh_formula(dtype, rtol):
    """The branch GPUs, bf16/fp16 and torch.compile take (ATen's tanh GELU), called on the CPU: values within
    rounding (bf16: half a unit in the last place) of the formula in float64, gradients within one unit."""
    x = GELU_POINTS.to(dtype).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = F.gelu(x, approximate="tanh")
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = gelu_tanh_reference(x64)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=2 * rtol, atol=1e-5)
    if dtype == torch.bfloat16:  # the dispatch sends bf16 here, also on the CPU
        assert kernels.gelu_tanh(x).grad_fn.name() == y.grad_fn.name()


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_fused_qkv_is_three_projections(bias):
    """fused_qkv (one matmul over the concatenated weights) equals c_q(x), c_k(x), c_v(x): values and gradients.
    Its tensor-parallel branch (DTensor weights) calls the three projections; the TP tests run it."""
    torch.manual_seed(0)
    c_q, c_k, c_v = (torch.nn.Linear(32, 32, bias=bias) for _ in range(3))
    x = torch.randn(2, 5, 32, requires_grad=True)
    params = [x] + [p for m in (c_q, c_k, c_v) for p in m.parameters()]
    grads_out = [torch.randn(2, 5, 32) for _ in range(3)]
    fused = gpt2.fused_qkv(x, c_q, c_k, c_v)
    plain = (c_q(x), c_k(x), c_v(x))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    grads = torch.autograd.grad(fused, params, grads_out)
    for a, b in zip(grads, torch.autograd.grad(plain, params, grads_out)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- train.py against references

def test_training_steps_equal_a_hand_written_loop(tmp_path):
    """Two iterations of train.py (2 micro-steps each, clipping active, warmup) against the same steps written out
    here with torch's own AdamW and clip_grad_norm_: a loss not divided by the accumulation steps, clipping never
    applied, or a wrong learning rate or weight-decay group would move the weights."""
    args = dict(batch_size=4, block_size=16, accum=2, lr=3e-3, clip=0.05, warmup=1, wd=0.1, seed=7)
    model = train.train([*TINY_RUN, "--n_layer=1", f"--batch_size={args['batch_size']}", f"--block_size={args['block_size']}",
                         f"--gradient_accumulation_steps={args['accum']}", f"--learning_rate={args['lr']}",
                         f"--grad_clip={args['clip']}", f"--warmup_iters={args['warmup']}", "--min_lr=0.0",
                         f"--weight_decay={args['wd']}", f"--seed={args['seed']}", "--max_iters=2", "--eval_interval=1000",
                         f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}"])
    torch.manual_seed(args["seed"])  # the reference: the same init, then the loop by hand
    ref = gpt2.Model(gpt2.Config(**{**train.asdict(model.config)}))
    train_tokens, _ = data.load_splits("", data.ByteTokenizer(), str(tmp_path / "c"), args["block_size"])
    gen = torch.Generator().manual_seed(args["seed"])
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args["lr"], betas=(0.9, 0.95))
    grad_norms, losses = [], []
    for it in range(2):
        lr = args["lr"] * (it + 1) / (args["warmup"] + 1) if it < args["warmup"] else args["lr"] * 0.5 * (1 + math.cos(math.pi * (it - 1) / 1))
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(args["accum"]):
            starts = torch.randint(len(train_tokens) - args["block_size"], (args["batch_size"],), generator=gen)
            w = torch.from_numpy(np.stack([train_tokens[s:s + args["block_size"] + 1] for s in starts.tolist()]).astype(np.int64))
            _, loss = ref(w[:, :-1], w[:, 1:], need_logits=False)  # the loss as train.py asks for it (fused)
            (loss / args["accum"]).backward()
        losses.append(loss.item())  # train.py logs the last micro-step's loss
        grad_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), args["clip"]).item())
        opt.step()
        opt.zero_grad()
    assert min(grad_norms) > 5 * args["clip"]  # clipping was active
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["loss"] for r in logged] == pytest.approx(losses, abs=1e-5)
    assert [r["grad_norm"] for r in logged] == pytest.approx(grad_norms, rel=1e-5)  # before clipping
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0, msg=name)


def test_val_loss_is_the_eval_mode_loss_of_the_held_out_tail(tmp_path):
    """A corpus whose last 10% is exactly one window of block_size + 1 bytes: every val batch is that window, so the
    logged val loss must equal the loss of the trained model in eval mode (dropout off) on it, computed here."""
    text = bytes(range(32, 127)) * 4  # 380 bytes, so the val split is the last 38
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(text[:370])  # split at int(0.9 * 370) = 333: val is the last 37 = block_size + 1 bytes
    rows = run_train(f"--data={corpus}", "--block_size=36", "--n_layer=1", "--dropout=0.5", "--max_iters=3",
                     "--eval_interval=3", out_dir=str(tmp_path))
    model = train.model_from_checkpoint(train.load_checkpoint(str(tmp_path)), gpt2, str(tmp_path)).eval()
    window = torch.tensor(list(text[333:370]))[None]
    with torch.no_grad():
        logits, _ = model(window[:, :-1])
    expected = F.cross_entropy(logits[0], window[0, 1:]).item()
    assert rows[-1]["iter"] == 3 and rows[-1]["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_resume_remembers_the_best_val_loss(tmp_path):
    """With always_save_checkpoint=False only a better val loss replaces ckpt.pt, and "better" must count
    the evals from before the resume: a checkpoint that claims an unbeatable val loss is never replaced."""
    run_train("--max_iters=4", "--eval_interval=2", out_dir=str(tmp_path))
    path = tmp_path / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["best_val_loss"] = 0.0
    torch.save(ckpt, path)
    rows = run_train("--init_from=resume", "--max_iters=8", "--always_save_checkpoint=False", out_dir=str(tmp_path))
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4, 6, 8]
    assert torch.load(path, weights_only=True)["iter_num"] == 4


def test_fine_tune_from_a_hugging_face_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "hf")
    rows = run_train(f"--init_from={tmp_path / 'hf'}", "--max_iters=3", "--eval_interval=3", out_dir=str(tmp_path / "o"))
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3]
    # dropout is how to train, not what the weights are: it may change, and reaches the modules
    model = train.train([*TINY_RUN, f"--init_from={tmp_path / 'hf'}", "--dropout=0.25", "--max_iters=0",
                         f"--out_dir={tmp_path / 'o1'}", f"--cache_dir={tmp_path / 'o1'}"])
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25} and model.transformer.h[0].attn.dropout == 0.25
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight.T, hf.transformer.h[0].mlp.c_fc.weight)
    with pytest.raises(configurator.ConfigError, match="has n_layer=2, not 5"):
        run_train(f"--init_from={tmp_path / 'hf'}", "--n_layer=5", "--max_iters=1", out_dir=str(tmp_path / "o2"))
    with pytest.raises(configurator.ConfigError, match="longer than the model's maximum context 64"):
        run_train(f"--init_from={tmp_path / 'hf'}", "--block_size=128", "--max_iters=1", out_dir=str(tmp_path / "o3"))


def small_bpe(path, corpus, vocab_size=300):
    """A byte-level BPE trained here with the `tokenizers` package, saved as a Hugging Face tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def test_a_hugging_face_tokenizer_trains_samples_and_exports(tmp_path, capsys):
    """--tokenizer=PATH: a tokenizer.json tokenizes the corpus (cached ids decode back to the text, documents split by
    its end token); an HF model directory brings its own tokenizer to train.py and sample.py; export.py writes a
    directory that transformers loads with the same logits, tokenizer included."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    corpus = tmp_path / "docs"
    corpus.mkdir()
    texts = ["The quick brown fox jumps over the lazy dog. " * 40, "Pack my box with five dozen liquor jugs! " * 40]
    for i, t in enumerate(texts):
        (corpus / f"{i}.txt").write_text(t)
    small_bpe(tmp_path / "tokenizer.json", "".join(texts))
    tok = data.get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == 300 and tok.eot == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<|endoftext|>")
    file, n = data.tokenize_to_cache(data.read_corpus(str(corpus)), tok, str(tmp_path / "c"))
    ids = np.fromfile(file, dtype=np.uint16)
    assert len(ids) == n and [int(i) for i in np.where(ids == tok.eot)[0]] == [len(tok.encode(texts[0])), n - 1]
    assert tok.decode([i for i in ids if i != tok.eot]) == "".join(texts)

    run_train(f"--data={corpus}", f"--tokenizer={tmp_path / 'tokenizer.json'}", "--model=llama", "--max_iters=2",
              "--eval_interval=2", "--n_layer=1", out_dir=str(tmp_path / "run"))
    code, out = run_main(capsys, f"--out_dir={tmp_path / 'run'}", "--max_new_tokens=3", "--prompt=The quick", main=sample_main)
    assert code == 0 and out.startswith("The quick"), out
    code, out = run_main(capsys, f"--out_dir={tmp_path / 'run'}", f"--hf_dir={tmp_path / 'run_hf'}", main=export_main)
    assert code == 0 and (tmp_path / "run_hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()

    hf = tmp_path / "hf"  # a pretrained model directory with its own tokenizer.json
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).save_pretrained(hf)
    (hf / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    train.train([*TINY_RUN[1:], f"--data={corpus}", f"--init_from={hf}", "--model=llama", "--max_iters=2",  # no --tokenizer
                 "--eval_interval=2", f"--out_dir={tmp_path / 'ft'}", f"--cache_dir={tmp_path / 'c'}"])
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["tokenizer"] == str(hf)
    code, out = run_main(capsys, f"--init_from={hf}", "--model=llama", "--max_new_tokens=3", "--prompt=Pack my",
                         main=sample_main)
    assert code == 0 and out.startswith("Pack my"), out

    export_main([f"--out_dir={tmp_path / 'ft'}", f"--hf_dir={tmp_path / 'exported'}"])
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    ours = train.model_from_checkpoint(train.load_checkpoint(str(tmp_path / "ft")), train.load_model_module("llama"),
                                       str(tmp_path / "ft")).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


def test_token_cache_holds_ids_past_65535_and_is_keyed_by_the_tokenizer(tmp_path):
    """A vocabulary over 65,536 (Llama 3's 128,256) needs uint32 ids; two tokenizer.json files never share a cache;
    the end-of-document token comes from tokenizer_config.json's eos_token when the directory has one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {f"w{i}": i for i in range(70000)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "big").mkdir()
    tok.save(str(tmp_path / "big" / "tokenizer.json"))
    (tmp_path / "big" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "w69001"}}))
    big = data.get_tokenizer(str(tmp_path / "big"))
    assert big.vocab_size == 70000 and big.eot == 69001  # not on the list of usual end-token names
    text = "w69999 w1 w65536 w65535 w42"
    file, n = data.tokenize_to_cache([("doc", text.encode())], big, str(tmp_path / "c"))
    assert np.fromfile(file, dtype=np.uint32).tolist() == [69999, 1, 65536, 65535, 42, 69001]
    small_bpe(tmp_path / "a.json", "the quick brown fox " * 50)
    small_bpe(tmp_path / "b.json", "pack my box with jugs " * 50)
    docs = [("doc", b"the quick brown fox")]
    paths = {data.tokenize_to_cache(docs, data.get_tokenizer(str(tmp_path / f)), str(tmp_path / "c"))[0] for f in ("a.json", "b.json")}
    assert len(paths) == 2


def test_interval_means_in_the_log_line(tmp_path, monkeypatch):
    """time and tok/s are means over the log interval: with a clock whose steps take 2, 3, 4, 5 ms, the line at
    iter 2 says 2.5 ms and the line at iter 4 says 4.5 ms (not 3.5, the mean since the start)."""
    ticks = iter(range(10 ** 6))
    clock = [0.0]

    def fake_clock():  # call k advances the clock by k ms: each step takes longer than the one before
        clock[0] += next(ticks) / 1000
        return clock[0]
    monkeypatch.setattr(train, "perf_counter", fake_clock)
    rows = run_train("--max_iters=4", "--log_interval=2", "--eval_interval=1000", "--n_layer=1", out_dir=str(tmp_path))
    steps = [r for r in rows if "loss" in r]
    # calls: 0 before the loop, 1 after the eval at iter 0, then 2, 3, 4, 5 after each step: steps take 2, 3, 4, 5 ms
    assert [r["iter"] for r in steps] == [2, 4]
    assert [8 * 32 / r["tokens_per_s"] * 1000 for r in steps] == pytest.approx([2.5, 4.5])


# ------------------------------------------------------------------------------------- the command line and bad input

def test_cli_run_logs_samples_and_plots(tmp_path):
    code, out = run_cli(*TINY_RUN[:-1], "--sample_tokens=20", "--max_iters=4", "--eval_interval=2",
                        f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}")
    assert code == 0, out
    lines = re.findall(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms, ([\d,]+) tok/s, ([\d.]+) TFLOP/s$", out, re.M)
    assert [int(l[0]) for l in lines] == [1, 2, 3, 4]  # no MFU on a CPU: there is no peak to divide by
    assert "mfu" not in out and "sample:" in out
    assert {"ckpt.pt", "metrics.jsonl", "dashboard.png"} <= set(os.listdir(tmp_path))
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    model = train.model_from_checkpoint(train.load_checkpoint(str(tmp_path)), gpt2, str(tmp_path))
    for (it, loss, ms, tok_s, tflops), row in zip(lines, rows):  # what is printed is what is logged, and adds up
        assert float(loss) == pytest.approx(row["loss"], abs=1e-4) and int(tok_s.replace(",", "")) == round(row["tokens_per_s"])
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / (float(ms) / 1000), rel=1e-3)
        assert row["tflops"] == pytest.approx(model.flops_per_token(32) * row["tokens_per_s"] / 1e12, rel=1e-6)
    code, out = run_cli(f"--out_dir={tmp_path}", "--max_new_tokens=10", "--prompt=Hi", "--num_samples=2", script="sample.py")
    assert code == 0 and out.count("---------------") == 2, out
    (tmp_path / "prompt.txt").write_text("The answer")
    code, out = run_cli(f"--out_dir={tmp_path}", "--max_new_tokens=5", f"--prompt=FILE:{tmp_path / 'prompt.txt'}",
                        "--temperature=0", script="sample.py")
    idx = torch.tensor([list(b"The answer")])
    with torch.no_grad():  # greedy, written out: the full forward over everything so far, then its argmax
        for _ in range(5):
            idx = torch.cat([idx, model.eval()(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert code == 0 and out.startswith(bytes(idx[0].tolist()).decode("utf-8", errors="replace") + "\n---"), out


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"caf\xe9 latin-1", "not UTF-8 text.*offset 3"),
    (b"tiny", "train split has 3 tokens, fewer than block_size\\+1=33"),
])
def test_bad_data_gives_one_clear_line(tmp_path, capsys, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    code, out = run_main(capsys, "--tokenizer=byte", f"--data={path}", f"--out_dir={tmp_path / 'o'}", "--block_size=32",
                        f"--cache_dir={tmp_path / 'c'}")
    assert code == 1
    assert "Traceback" not in out
    assert re.search("error: .*" + message, out), out


@pytest.mark.parametrize("args, message", [
    (["--n_layers=2"], "unknown key n_layers.*did you mean n_layer"),
    (["--batch_size=big"], "batch_size='big'.*not a valid int"),
    (["--model=gpt5"], "unknown model 'gpt5'.*gpt2"),
    (["--tokenizer=words"], "unknown tokenizer 'words'"),
    (["--dtype=float8"], "dtype='float8'"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--init_from=/nonexistent_dir"], "neither scratch, resume, nor a Hugging Face"),
    (["--vocab_size=100"], "smaller than the byte tokenizer's 256"),
    (["--device=tpu"], "device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["--learning_rate=-0.001"], "learning_rate=-0.001 must be > 0; e.g. --learning_rate=0.002"),  # the default
    (["--min_lr=-1"], "min_lr=-1.0 must be in \\[0, learning_rate"),
    (["--beta2=1.5"], "beta2=1.5 must be in \\[0, 1\\)"),
    (["--grad_clip=-1"], "grad_clip=-1.0 must be >= 0"),
    (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["--top_k=0"], "top_k=0 must be >= 1"),
    (["--top_p=2"], "top_p=2.0 must be in \\(0, 1\\]"),
    (["--dropout=2"], "dropout=2"),
    (["--n_head=0"], "n_head=0"),
    (["--n_embd=1000", "--n_head=3"], "n_embd=1000.*n_head=3"),
    (["--model=llama", "--n_head=4", "--n_kv_head=3"], "n_kv_head=3"),
    (["--tp=2"], "--tp=2 needs several processes: launch with torchrun"),
    (["--fsdp=True"], "--fsdp=True needs several processes: launch with torchrun"),
    (["--kernels=cublas"], "kernels='cublas' is not one of auto, triton, torch, cuda"),
    (["--kernels=triton", "--device=cpu"], "kernels=triton runs Triton kernels, which need a CUDA device.*--kernels=auto"),
    (["--optimizer=sgd"], "optimizer='sgd' is not one of adamw, muon; e.g. --optimizer=adamw"),
    (["--muon_momentum=1"], "muon_momentum=1.0 must be in \\[0, 1\\)"),
    (["--optimizer=muon", "--fsdp=True"], "optimizer=muon cannot run with --fsdp=True: Newton-Schulz needs each whole matrix"),
    (["--optimizer=muon", "--tp=2"], "optimizer=muon cannot run with --tp=2: .*use DDP"),
])
def test_bad_config_gives_one_clear_line(tmp_path, capsys, args, message):
    code, out = run_main(capsys, "--tokenizer=byte", f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}", *args)
    assert code == 1 and "Traceback" not in out, out
    assert re.search("error: .*" + message, out), out
    assert not os.path.exists(tmp_path / "ckpt.pt")  # nothing ran


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_gives_one_clear_line(tmp_path, capsys, device):
    present = torch.cuda.device_count() > int(device.partition(":")[2] or 0) if device.startswith("cuda") \
        else torch.backends.mps.is_available()
    if present:
        pytest.skip(f"this machine has {device}")
    code, out = run_main(capsys, "--tokenizer=byte", f"--out_dir={tmp_path}", f"--device={device}")
    assert code == 1 and "Traceback" not in out and f"error: device={device} but" in out and "--device=cpu" in out, out


def test_unwritable_folders_give_one_clear_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, out = run_main(capsys, *TINY_RUN, f"--out_dir={tmp_path / 'a_file'}", f"--cache_dir={tmp_path / 'c'}")
    assert code == 1 and "out_dir=" in out and "is a file, not a folder" in out, out
    # a folder no one may create (root too): /proc refuses new entries
    code, out = run_main(capsys, *TINY_RUN, "--out_dir=/proc/gaia_out", f"--cache_dir={tmp_path / 'c'}")
    assert code == 1 and "error: cannot write to out_dir='/proc/gaia_out'" in out and "writable folder" in out, out
    code, out = run_main(capsys, *TINY_RUN, f"--out_dir={tmp_path / 'o'}", "--cache_dir=/proc/gaia_cache")
    assert code == 1 and "error: cannot write the token cache /proc/gaia_cache" in out and "--cache_dir" in out, out


def test_resume_refuses_another_model_or_a_contradicting_config(tmp_path, capsys):
    run_train("--max_iters=2", "--eval_interval=2", "--n_layer=2", out_dir=str(tmp_path))
    other = next((m for m in MODELS if m != "gpt2"), "llama")
    code, out = run_main(capsys, "--init_from=resume", f"--out_dir={tmp_path}", f"--model={other}")
    assert code == 1 and f"holds a gpt2 model, not {other}" in out, out
    code, out = run_main(capsys, "--init_from=resume", f"--out_dir={tmp_path}", "--n_layer=3")
    assert code == 1 and "trained with n_layer=2, not 3" in out, out
    code, out = run_main(capsys, "--init_from=resume", f"--out_dir={tmp_path}", "--optimizer=muon")
    assert code == 1 and "trained with optimizer='adamw', not 'muon'" in out, out


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a checkpoint", "other parameter names", "other config keys"])
def test_a_damaged_checkpoint_gives_one_clear_line_and_is_kept(tmp_path, capsys, damage):
    run_train("--max_iters=2", "--eval_interval=2", "--n_layer=1", out_dir=str(tmp_path))
    path = tmp_path / "ckpt.pt"
    good = path.read_bytes()
    if damage == "other parameter names":  # as a model file whose modules were renamed would see it
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_state"] = {k.replace("transformer.h.", "layers."): v for k, v in ckpt["model_state"].items()}
        torch.save(ckpt, path)
    elif damage == "other config keys":  # a key the model file has since renamed
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_config"]["layer_norm_epsilon"] = ckpt["model_config"].pop("norm_eps")
        torch.save(ckpt, path)
    else:
        path.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "not a checkpoint": b"hello"}[damage])
    damaged = path.read_bytes()
    for main, args in ((train.main, ["--init_from=resume", "--max_iters=4"]), (sample_main, ["--max_new_tokens=2"])):
        code, out = run_main(capsys, *args, f"--out_dir={tmp_path}", main=main)
        assert code == 1 and "Traceback" not in out and f"error: {path}" in out, out
        assert "another version" in out if damage.startswith("other") \
            else ("cannot read" in out or "cannot be read" in out) and "truncated or not a gaia checkpoint" in out, out
    assert path.read_bytes() == damaged  # nothing overwritten


def test_resume_refuses_another_tokenizer_and_a_finished_run(tmp_path, capsys):
    run_train("--max_iters=2", "--eval_interval=2", "--n_layer=1", out_dir=str(tmp_path))
    code, out = run_main(capsys, "--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=4", "--tokenizer=gpt2")
    assert code == 1 and "trained with tokenizer='byte', not 'gpt2'" in out, out
    code, out = run_main(capsys, "--init_from=resume", f"--out_dir={tmp_path}")
    assert code == 1 and "is at iter 2, and max_iters=2: nothing to train. Raise --max_iters" in out, out


def test_fine_tuning_another_architecture_gives_one_clear_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    for main, args in ((train.main, [*TINY_RUN, f"--out_dir={tmp_path / 'o'}"]), (sample_main, ["--max_new_tokens=2"])):
        code, out = run_main(capsys, *args, f"--init_from={tmp_path / 'hf'}", "--model=gpt2", main=main)
        assert code == 1 and "Traceback" not in out and "holds a 'llama' model, not gpt2" in out, out


def test_a_pretrained_directory_knows_its_tokenizer_or_says_so(tmp_path, capsys):
    """An exported byte run records its tokenizer in config.json, and fine-tuning or sampling it uses bytes again; a
    directory with neither tokenizer.json nor that record asks for --tokenizer; a damaged safetensors file, an
    unexportable setting: one line each."""
    run_train("--max_iters=2", "--eval_interval=2", "--n_layer=1", out_dir=str(tmp_path / "run"))
    assert export_main([f"--out_dir={tmp_path / 'run'}"]) is None
    hf = tmp_path / "run" / "hf"
    assert json.loads((hf / "config.json").read_text())["gaia_tokenizer"] == "byte"
    train.train([*TINY_RUN[1:], f"--init_from={hf}", "--max_iters=1", f"--out_dir={tmp_path / 'ft'}",  # no --tokenizer
                 f"--cache_dir={tmp_path / 'c'}"])
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["tokenizer"] == "byte"
    code, out = run_main(capsys, f"--init_from={hf}", "--max_new_tokens=3", "--prompt=ab", main=sample_main)
    assert code == 0 and out.startswith("ab"), out
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "gaia_tokenizer"}))
    for main, args in ((train.main, [*TINY_RUN[1:], f"--out_dir={tmp_path / 'o'}"]), (sample_main, [])):
        code, out = run_main(capsys, f"--init_from={hf}", *args, main=main)
        assert code == 1 and "has no tokenizer.json" in out and "--tokenizer=byte" in out, out
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for main, args in ((train.main, [*TINY_RUN, f"--out_dir={tmp_path / 'o'}"]), (sample_main, ["--tokenizer=byte"])):
        code, out = run_main(capsys, f"--init_from={hf}", *args, main=main)
        assert code == 1 and "Traceback" not in out and f"error: {hf} cannot be loaded" in out, out
    run_train("--model=moe", "--max_iters=1", "--eval_interval=1", "--n_layer=1", "--norm_topk_prob=False",
              out_dir=str(tmp_path / "moe"))
    code, out = run_main(capsys, f"--out_dir={tmp_path / 'moe'}", main=export_main)
    assert code == 1 and "Traceback" not in out and "error: moe cannot be exported to Hugging Face" in out, out


def test_cpu_anchor_names_a_missing_script(tmp_path):
    code, out = run_cli("cpu-anchor", f"--anchor={tmp_path / 'nope.sh'}", f"--data={tmp_path / 'x.txt'}", script="bench.py")
    assert code == 1 and f"error: --anchor={tmp_path / 'nope.sh'} is not a file" in out, out


def test_wandb_without_a_login_gives_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path))  # no ~/.netrc login
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY_RUN, "--max_iters=1", "--wandb_log=True",
                        f"--out_dir={tmp_path / 'o'}", f"--cache_dir={tmp_path / 'c'}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "Traceback" not in out and "error: wandb_log=True but wandb could not start" in out, out
    assert "WANDB_MODE=offline" in out


@pytest.mark.parametrize("args, message", [
    (["--top_k=0"], "top_k=0 must be >= 1"), (["--top_k=-5"], "top_k=-5 must be >= 1"),
    (["--top_p=-0.5"], "top_p=-0.5 must be in \\(0, 1\\]"), (["--top_p=2"], "top_p=2.0 must be in"),
    (["--temperature=-1"], "temperature=-1.0 must be >= 0"), (["--num_samples=0"], "num_samples=0 must be >= 1"),
    (["--tokenizer=gpt2"], "ckpt.pt was trained with tokenizer='byte', not 'gpt2'; drop --tokenizer"),
    (["--prompt=FILE:/nonexistent.txt"], "cannot read the prompt file"),
])
def test_sample_bad_input_gives_one_clear_line(tmp_path_factory, capsys, args, message):
    out_dir = tmp_path_factory.getbasetemp() / "sample_bad_input"
    if not (out_dir / "ckpt.pt").exists():
        run_train("--max_iters=1", "--eval_interval=1", "--n_layer=1", out_dir=str(out_dir))
    code, out = run_main(capsys, f"--out_dir={out_dir}", "--max_new_tokens=2", *args, main=sample_main)
    assert code == 1 and "Traceback" not in out, out
    assert re.search("error: .*" + message, out), out


@pytest.mark.parametrize("signum, always_save", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_exactly(tmp_path, signum, always_save):
    """Ctrl-C (or a cluster's SIGTERM) finishes the step, saves, says how to resume; the resumed run continues the
    unbroken run exactly, evals included (one every step here: the stopped step's eval had not run). When only the
    best-val checkpoint is kept, it moves aside to ckpt_best.pt instead of being overwritten."""
    keys = [*TINY_RUN, "--n_layer=1", "--dropout=0.1", "--lr_decay_iters=1000", "--eval_interval=1",
            f"--always_save_checkpoint={always_save}", f"--cache_dir={tmp_path / 'c'}"]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *keys, "--max_iters=100000",
                          f"--out_dir={tmp_path / 'a'}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in p.stdout:  # let it train a few steps, then press Ctrl-C
        lines.append(line)
        if line.startswith("iter 5:"):
            p.send_signal(signum)
            break
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 130 and "Traceback" not in out, out
    stopped = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["iter_num"]
    assert f"stopped at iter {stopped}; saved {tmp_path / 'a' / 'ckpt.pt'}" in out, out
    assert f"python train.py --init_from=resume --out_dir={tmp_path / 'a'}" in out
    if not always_save:
        best = torch.load(tmp_path / "a" / "ckpt_best.pt", weights_only=True)
        assert f"(the best-val checkpoint moved to {tmp_path / 'a' / 'ckpt_best.pt'})" in out
        assert best["val_loss"] == best["best_val_loss"] and best["iter_num"] <= stopped
    keys = [k for k in keys[len(TINY_RUN):] if not k.startswith("--cache_dir")]
    run_train("--init_from=resume", f"--max_iters={stopped + 3}", out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"))
    whole = run_train(*keys, f"--max_iters={stopped + 3}", out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"))
    resumed = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    evals = lambda rows: [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert losses(resumed) == losses(whole) and len(losses(whole)) == stopped + 3
    assert evals(resumed) == evals(whole) and [i for i, _ in evals(whole)] == list(range(stopped + 4))


def test_nan_loss_stops_with_a_hint_and_keeps_the_checkpoint(tmp_path, capsys):
    run_train("--max_iters=2", "--eval_interval=2", out_dir=str(tmp_path))
    before = (tmp_path / "ckpt.pt").read_bytes()
    code, out = run_main(capsys, *TINY_RUN, "--init_from=resume", f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'cache'}",
                        "--max_iters=30", "--learning_rate=1e30", "--grad_clip=0", "--eval_interval=1000")
    assert code == 1, out
    assert re.search(r"error: loss is (nan|inf) at iter \d+.*ckpt.pt.*lower --learning_rate", out), out
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_wandb_offline_and_tensorboard_logging(tmp_path):
    code, out = run_cli(*TINY_RUN, "--max_iters=2", "--eval_interval=2", "--wandb_log=True", "--tensorboard_log=True",
                        f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}",
                        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert code == 0, out
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    run = next(tmp_path / "wandb" / n for n in os.listdir(tmp_path / "wandb") if n.startswith("offline-run"))
    assert any(n.endswith(".wandb") and (run / n).stat().st_size > 0 for n in os.listdir(run))  # wandb's own binary log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    for key in ("loss", "lr", "grad_norm", "val_loss"):  # every scalar of the JSONL, at its iteration
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == \
            [(r["iter"], r[key]) for r in rows if key in r], key


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(configurator.ConfigError, match="pip install tensorboard"):
        run_train("--max_iters=1", "--tensorboard_log=True", out_dir=str(tmp_path))


def run_bench(monkeypatch, capsys, *commands):
    """bench.py's main() in this process for each command line; returns what they printed."""
    import bench
    capsys.readouterr()
    for argv in commands:
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        bench.main()
    return capsys.readouterr().out


def test_bench_runs_for_a_model(monkeypatch, capsys):
    out = run_bench(monkeypatch, capsys,
                    ["train", "--batch_size=2", "--block_size=16", "--iters=1", "--warmup=0", "--vocab_size=64"],
                    ["decode", "--context=4", "--new_tokens=3", "--no_cache_tokens=2", "--repeats=1", "--vocab_size=64"],
                    ["gelu", "--shape=4,8", "--repeats=1"])
    ms, tokens_per_s = re.search(r"B=2 T=16: median ([\d.]+) ms/iter over 1 iters, ([\d,]+) tokens/s", out).groups()
    # the figures agree (tokens/s is printed as a whole number)
    assert int(tokens_per_s.replace(",", "")) == pytest.approx(2 * 16 / (float(ms) / 1000), rel=0.02, abs=0.5)
    row = re.search(r"^  default\s+([\d,]+)\s+([\d,]+)\s+([\d.,]+|- \(noise\))\s+([\d.,]+)$", out, re.M)
    config = gpt2.Config(vocab_size=64, block_size=256)  # the decode bench's model: default shape, block_size for decoding
    assert int(row.group(1).replace(",", "")) == sum(p.numel() for p in gpt2.Model(config).parameters())
    assert int(row.group(2).replace(",", "")) == 2 * config.n_layer * config.n_embd * 4  # K and V, fp32, every layer
    assert "gaia tanh  forward" in out


def test_train_until_stops_at_the_first_eval_under_the_target_and_sums_step_times(tmp_path):
    """bench.py time-to-loss reads `iter k: ... time Tms` and `step k: ... val loss V` lines (nanoGPT's format and
    train.py's): a fake trainer's lines, stopped at the first eval after step 0 at or under the target; the time to
    k steps is the sum of the first k step times with the first replaced by the second (warm-up, nanoGPT's eval)."""
    import bench
    lines = ["step 0: train loss 5.5, val loss 1.0",  # at the target before any step: not reached by training
             "iter 0: loss 5.0, time 900.00ms", "iter 1: loss 4.0, time 100.00ms", "step 2: train loss 4, val loss 3.5",
             "iter 2: loss 3.0, time 110.00ms", "iter 3: loss 2.5, time 120.00ms", "step 4: train loss 2, val loss 2.5",
             "iter 4: loss 2.0, time 130.00ms", "step 5: train loss 2, val loss 2.0"]
    script = tmp_path / "fake.py"
    script.write_text("import sys\nfor line in %r: print(line)\nsys.exit(int(sys.argv[1]))\n" % lines)
    steps, evals = bench.train_until([sys.executable, str(script), "3"], str(tmp_path), target=2.6)
    assert evals == [(0, 1.0), (2, 3.5), (4, 2.5)]  # stopped at step 4: the exit code 3 after it is not an error
    assert steps == [0.9, 0.1, 0.11, 0.12]
    assert bench.training_seconds(steps, 4) == pytest.approx(0.1 + 0.1 + 0.11 + 0.12)
    steps, evals = bench.train_until([sys.executable, str(script), "0"], str(tmp_path), target=None)  # to its end
    assert evals[-1] == (5, 2.0) and len(steps) == 5
    with pytest.raises(RuntimeError, match="failed"):  # never reaching the target, the exit code is an error
        bench.train_until([sys.executable, str(script), "3"], str(tmp_path), target=0.5)


def test_time_to_loss_runs_against_a_fake_nanogpt(tmp_path, monkeypatch, capsys):
    """bench.py time-to-loss end to end, with a stand-in for the pinned nanoGPT (its train.py prints fixed step
    times and a target of 5.3, above ln 256 = 5.55, the recipe's zero-init start) and gaia's runs for real at 4 steps:
    nanoGPT's row is the hand sum of its times, gaia's gpt2 row its 4 steps, and the recipe reaches 5.3 or says not."""
    nano = tmp_path / "anchors" / "nanogpt"
    nano.mkdir(parents=True)
    (tmp_path / "anchors" / "nanogpt_cpu_bench.sh").write_text("# stand-in\n")
    (nano / "train.py").write_text(
        "import os\nassert os.path.getsize('data/bytes/train.bin') > 0\n"
        "for i, t in enumerate([700, 200, 210, 220]): print(f'iter {i}: loss 5.0, time {t:.2f}ms, mfu -100.00%')\n"
        "print('step 4: train loss 5.2, val loss 5.3')\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 400)
    out = run_bench(monkeypatch, capsys, ["time-to-loss", f"--anchor={tmp_path / 'anchors' / 'nanogpt_cpu_bench.sh'}",
                                          f"--data={corpus}", "--nano_iters=4", "--speedrun_iters=8", "--eval_every=2",
                                          "--eval_iters=1", "--rounds=1"])
    assert "round 1: nanoGPT 4 steps in 0.8 s, val loss 5.3000 (the target)" in out  # 0.2 + 0.2 + 0.21 + 0.22
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert rows["nanoGPT"][1:4] == ["4", "5.300", "0.8"]
    assert rows["gaia gpt2, nanoGPT's shapes and steps"][1] == "4"
    recipe = rows["speedrun recipe (config/speedrun.py)"]
    assert recipe[1] in ("2", "4", "6", "8") and float(recipe[2]) <= 5.3 or recipe[1] == "not reached", recipe


def test_profile_writes_a_trace_on_cpu(tmp_path):
    run_train("--max_iters=12", "--eval_interval=100", "--profile=True", out_dir=str(tmp_path))
    with open(tmp_path / "trace.json") as f:
        trace = json.load(f)
    steps = sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == [f"ProfilerStep#{i}" for i in range(5, 10)], steps  # iterations 5-9, as documented
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """What train.py does on the CPU: a step's freed activations come back without page faults next step."""
    import resource
    if not train.keep_freed_memory():
        pytest.skip("not glibc")

    def faults_of_one_allocation():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(4 << 20)  # 16 MiB, every page written
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    for _ in range(3):  # the heap grows to hold it: its 4,096 pages of 4 KiB fault in
        faults_of_one_allocation()
    # then none: glibc's default mmaps 16 MiB afresh each time, ~4,100 faults every time
    assert sum(faults_of_one_allocation() for _ in range(3)) < 400


def test_peak_flops_table_and_lr_schedule(monkeypatch):
    assert train.peak_flops("cpu", "float32") is None  # never a made-up MFU
    for name, dtype, peak in (("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
                              ("NVIDIA H200", "float32", 494e12), ("NVIDIA A100-SXM4-80GB", "float16", 312e12),
                              ("NVIDIA L40S", "bfloat16", 362e12), ("Tesla T4", "bfloat16", None),
                              ("NVIDIA GeForce GTX 1080", "float32", None)):  # datasheet figures; unknown -> no MFU
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert train.peak_flops("cuda:0", dtype) == peak, name
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.lr_at(0, cfg) == pytest.approx(1 / 11) and train.lr_at(9, cfg) == pytest.approx(10 / 11)
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: cos(pi/2) = 0
    assert train.lr_at(110, cfg) == pytest.approx(0.1) and train.lr_at(500, cfg) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- --optimizer=muon

def newton_schulz_reference(G, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Keller Jordan's quintic Newton-Schulz iteration in float64: X = G / ||G||_F turned wide, then
    X <- a X + (b A + c A^2) X with A = X X^T, steps times, turned back."""
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_muon_step_is_orthogonalised_nesterov_momentum():
    """Two Muon steps on a tall and a wide matrix of a tiny llama, against the formula: buf = mu buf + g,
    update = NS5(g + mu buf) (Nesterov), w -= muon_lr * sqrt(max(1, rows / cols)) * update. torch runs the iteration
    in bfloat16, hence the tolerance; without Nesterov, the wrong scale or the wrong coefficients it is far off. The
    update's singular values lie in the band the quintic leaves after 5 steps (about 0.68 to 1.13 for a
    well-conditioned matrix): orthogonal up to that spread."""
    model = tiny_llama()
    cfg = train.TrainConfig(optimizer="muon", muon_lr=0.02, muon_momentum=0.9, learning_rate=1e-3)
    opt = train.make_optimizer(model, cfg)
    params = dict(model.named_parameters())
    names = {"transformer.h.0.mlp.gate_proj.weight": 3 ** 0.5, "transformer.h.1.mlp.down_proj.weight": 1.0}
    assert [tuple(params[n].shape) for n in names] == [(192, 64), (64, 192)]  # rows / cols = 3, then 1/3
    generator = torch.Generator().manual_seed(0)
    buf = {n: 0 for n in names}
    for _ in range(2):
        grads = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
        before = {n: params[n].detach().clone() for n in names}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, scale in names.items():
            buf[n] = cfg.muon_momentum * buf[n] + grads[n]
            orthogonal = newton_schulz_reference(grads[n] + cfg.muon_momentum * buf[n])
            step = (params[n].detach() - before[n]).double() / (-cfg.muon_lr * scale)
            assert (step - orthogonal).norm() / orthogonal.norm() < 0.03, n
            singular = torch.linalg.svdvals(step)
            assert singular.min() > 0.66 and singular.max() < 1.15, (n, singular.min(), singular.max())


@pytest.mark.parametrize("model, muon, decay, no_decay", [
    ("gpt2", ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
     ["transformer.wte.weight", "transformer.wpe.weight"],  # the head is tied to wte: one tensor
     ["ln_1.weight", "ln_1.bias", "attn.c_q.bias", "attn.c_k.bias", "attn.c_v.bias", "attn.c_proj.bias", "ln_2.weight",
      "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]),
    ("llama", ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj"], ["transformer.wte.weight", "lm_head.weight"], ["ln_1.weight", "ln_2.weight"]),
])
def test_muon_trains_the_blocks_matrices_and_adamw_the_rest(model, muon, decay, no_decay):
    model, gpt2_like = (tiny_gpt2(), True) if model == "gpt2" else (tiny_llama(), False)
    cfg = train.TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    opt = train.make_optimizer(model, cfg)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = [[name[id(p)] for p in g["params"]] for g in opt.param_groups]  # Muon's, then AdamW's decay and no-decay
    blocks = lambda suffixes, end: [f"transformer.h.{i}.{s}{end}" for i in range(2) for s in suffixes]
    assert groups == [blocks(muon, ".weight"), decay, blocks(no_decay, "") + ["transformer.ln_f.weight"]
                      + (["transformer.ln_f.bias"] if gpt2_like else [])]
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon) and isinstance(opt.optimizers["adamw"], torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, cfg.weight_decay, 0.0]
    # the schedule scales every group alike: Muon's peaks at muon_lr, AdamW's at learning_rate
    assert [train.group_lr(g, 5e-4, cfg) for g in opt.param_groups] == pytest.approx([0.01, 5e-4, 5e-4])
    assert isinstance(train.make_optimizer(model, train.TrainConfig()), torch.optim.AdamW)  # the default: AdamW alone


def test_muon_resume_is_bit_identical(tmp_path):
    """As test_resume_is_bit_identical, with Muon: its momentum buffers go into the checkpoint and come back."""
    common = ["--model=llama", "--optimizer=muon", "--lr_decay_iters=12", "--eval_interval=3", "--dropout=0.1"]
    whole = run_train(*common, "--max_iters=12", out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"))
    run_train(*common, "--max_iters=6", out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"))
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["optimizer_state"]
    assert len(state["muon"]["state"]) == 4 * 7 and all("momentum_buffer" in s for s in state["muon"]["state"].values())
    resumed = run_train("--init_from=resume", "--max_iters=12", out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"))
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]
    assert len(losses(whole)) == 12 and losses(resumed) == losses(whole)
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]



# ------------------------------------------------------------------------------------- distributed (gloo, 2 CPU processes)

DIST_RUN = [*TINY_RUN, "--n_layer=2", "--eval_interval=3", "--lr_decay_iters=6", "--dropout=0.0"]


def torchrun(*args, nproc=2, script="train.py", timeout=240):
    """A torchrun launch on the CPU (gloo); the timeout guarantees that no hung process outlives the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script) if script.endswith(".py") and not os.path.isabs(script) else script, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout + p.stderr


def curve(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def assert_same_curve(a, b, tol=1e-5):
    assert [r[0] for r in a] == [r[0] for r in b], (a, b)
    for (i, la, ga), (_, lb, gb) in zip(a, b):
        assert abs(la - lb) <= tol and abs(ga - gb) <= tol * max(1.0, ga), (i, la, lb, ga, gb)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process, batch 8 = 2 ranks x batch 4, 6 iterations."""
    out = tmp_path_factory.mktemp("single")
    run_train(*DIST_RUN[len(TINY_RUN):], "--batch_size=8", "--max_iters=6", out_dir=str(out))
    return out


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(single_process_run, tmp_path):
    code, out = torchrun(*DIST_RUN, "--batch_size=4", "--max_iters=6", f"--out_dir={tmp_path}",
                         f"--cache_dir={tmp_path / 'c'}")
    assert code == 0, out
    assert "= 2,048 tokens per iteration" not in out and "x 2 data-parallel ranks = 256 tokens" in out, out
    assert_same_curve(curve(tmp_path), curve(single_process_run))
    val = lambda out_dir: [(r["iter"], r["train_loss"], r["val_loss"]) for r in map(json.loads, open(out_dir / "metrics.jsonl"))
                           if "val_loss" in r]
    assert [r[0] for r in val(tmp_path)] == [0, 3, 6]  # evals see the same batches at any world size, each rank its slice
    for (it, train_a, val_a), (_, train_b, val_b) in zip(val(tmp_path), val(single_process_run)):
        assert train_a == pytest.approx(train_b, abs=1e-5) and val_a == pytest.approx(val_b, abs=1e-5), it
    ddp, ref = torch.load(tmp_path / "ckpt.pt"), torch.load(single_process_run / "ckpt.pt")
    for k, v in ref["model_state"].items():  # the weights after 6 steps: every gradient went into them. AdamW divides
        # each gradient by its own running scale, so where a gradient is near 0 (a rare token's embedding row; c_k's
        # bias, which softmax ignores) the all-reduce's float32 rounding moves the weight by up to ~2e-5; a missing
        # or wrong all-reduce moves most weights by the learning rate's size (3e-3), and the mean difference says so
        torch.testing.assert_close(ddp["model_state"][k], v, atol=1e-4, rtol=0)
        assert (ddp["model_state"][k] - v).abs().mean() < 1e-5, k


def test_ddp_with_muon_equals_one_process(tmp_path):
    """Every rank runs Muon on the same all-reduced gradients: 2 ranks x 4 train as 1 process x 8. Newton-Schulz runs
    in bfloat16, which turns the all-reduce's float32 rounding (1e-7) into differences of bfloat16's size in a few
    entries of an update, hence 1e-3 here (measured: up to 1.4e-5 in the loss, 1.3e-4 relative in the gradient norm;
    a half batch instead of the whole differs by 2.6e-2 in the loss and 4e-2 relative at the first step)."""
    args = [*DIST_RUN[len(TINY_RUN):], "--optimizer=muon", "--max_iters=4"]
    run_train(*args, "--batch_size=8", out_dir=str(tmp_path / "one"), cache_dir=str(tmp_path / "c"))
    code, out = torchrun(*TINY_RUN, *args, "--batch_size=4", f"--out_dir={tmp_path / 'ddp'}", f"--cache_dir={tmp_path / 'c'}")
    assert code == 0, out
    assert_same_curve(curve(tmp_path / "ddp"), curve(tmp_path / "one"), tol=1e-3)


# ------------------------------------------------------------------------------------- llama.py
# Tests of llama.py. The references are independent of gaia's code: Hugging Face transformers'
# LlamaForCausalLM holding the same weights, the cache-free full forward, Meta's Llama 3.1 RoPE scaling and
# the KV-cache size and FLOP formulas written out here, and the published widths of Llama 2 7B and Llama 3 8B.


LLAMA_VOCAB = 96


def tiny_llama(**overrides):
    """A small random llama.Model: 2 layers, GQA 4:2, vocab 96, block_size 64."""
    torch.manual_seed(0)
    config = dict(vocab_size=LLAMA_VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return llama.Model(llama.Config(**{**config, **overrides}))


# Llama 3 frequency scaling as transformers 5 spells it (config.rope_parameters, rope_type "llama3"), at Llama 3's
# rope_theta. With head_dim 16 the 8 pairs have wavelengths 6, 32, 167, 862, ... 609226 tokens; with
# original_max_position_embeddings 48 and the factors 1 and 4, pair 0 (< 12 tokens) is kept, pair 1 (12 .. 48) is
# smoothed and pairs 2-7 (> 48) are divided by 8. test_llama3_rope_scaling_matches_transformers checks that
# the 64-token test sequences feel each of the three bands.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=48)


def tiny_hf_llama(n_head=4, n_kv_head=4, tie=False, rope_theta=10000.0, rope_parameters=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         rope_parameters=rope_parameters or dict(rope_type="default", rope_theta=rope_theta),
                         initializer_range=0.1)  # > HF's 0.02: peaked attention, so a wrong rotation shows in the logits
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF starts every RMSNorm weight at 1; random ones make a swapped or dropped norm visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("n_head,n_kv_head,tie,rope_theta,shards", [
    (4, 4, False, 10000.0, None),     # MHA, the default rope_theta
    (4, 2, False, 1234.0, "20KB"),    # GQA 2:1, read from a sharded checkpoint
    (8, 2, False, 500000.0, None),    # GQA 4:1, Llama 3's rope_theta
    (4, 1, False, 1234.0, None),      # MQA
    (4, 2, True, 500000.0, "20KB"),   # tied embeddings, sharded
], ids=["mha", "gqa2-sharded", "gqa4", "mqa", "tied-sharded"])
def test_llama_matches_transformers(tmp_path, n_head, n_kv_head, tie, rope_theta, shards):
    hf_model = tiny_hf_llama(n_head, n_kv_head, tie, rope_theta)
    model = hf_roundtrip(llama, hf_model, tmp_path, LLAMA_VOCAB, max_shard_size=shards)  # logits <= 1e-4 both ways
    c = model.config
    assert (c.n_head, c.n_kv_head, c.tie_word_embeddings, c.rope_theta) == (n_head, n_kv_head, tie, rope_theta)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    saved = json.loads((tmp_path / "gaia" / "config.json").read_text())
    assert saved["tie_word_embeddings"] == tie and saved["num_key_value_heads"] == n_kv_head
    assert saved["rope_parameters"] == dict(rope_type="default", rope_theta=rope_theta)
    check_cached_decode(model, LLAMA_VOCAB)  # 32 greedy tokens with the KV cache == full forward, <= 1e-5


def test_llama3_rope_scaling_matches_transformers(tmp_path, monkeypatch):
    hf_model = tiny_hf_llama(4, 2, rope_parameters=dict(LLAMA3_ROPE))
    model = hf_roundtrip(llama, hf_model, tmp_path, LLAMA_VOCAB, seq_len=64, max_shard_size="20KB")
    c = model.config
    assert (c.rope_theta, c.rope_factor, c.rope_original_max_position_embeddings) == (500000.0, 8.0, 48)
    saved = json.loads((tmp_path / "gaia" / "config.json").read_text())["rope_parameters"]
    assert {k: saved[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    check_cached_decode(model, LLAMA_VOCAB)
    idx = torch.randint(0, LLAMA_VOCAB, (2, 64))
    with torch.no_grad():
        reference = hf_model(idx).logits

    def logits_error(path):
        with torch.no_grad():
            return (llama.Model.from_pretrained(str(path)).eval()(idx)[0] - reference).abs().max().item()

    # transformers 4.x, which wrote most Llama checkpoints on the Hub, put rope_theta at the top level and the
    # scaling in rope_scaling: the same directory written that way loads to the same logits
    hf_dir = tmp_path / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert logits_error(hf_dir) < 1e-4
    # the test config has pairs in all three bands, and at 64 tokens each band is felt: the frequencies of one band
    # given another band's rule (kept ones divided by the factor, smoothed ones divided, divided ones kept) make
    # the logits differ from transformers' by far more than the 1e-4 of the parity check
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    wavelength = 2 * math.pi / plain
    kept, divided = wavelength < 48 / 4, wavelength > 48 / 1
    smoothed = ~kept & ~divided
    assert (kept.sum(), smoothed.sum(), divided.sum()) == (1, 1, 6)
    for band, wrong_rule in [(kept, plain / 8), (smoothed, plain / 8), (divided, plain)]:
        frequencies = torch.where(band, wrong_rule, llama.rope_frequencies(c, 16))
        with monkeypatch.context() as patch:
            patch.setattr(llama, "rope_frequencies", lambda config, dim: frequencies)
            assert logits_error(hf_dir) > 1e-2, band


def test_llama31_rope_frequencies_follow_meta_formula():
    # Llama 3.1's RoPE (rope_theta 500000, head_dim 128, factor 8, low 1, high 4, original context 8192), the
    # scaling written out as Meta's apply_scaling does it, one pair at a time, in float64
    theta, dim, factor, low, high, old = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    expected, bands = [], {"kept": 0, "smoothed": 0, "divided": 0}
    for i in range(dim // 2):
        freq = theta ** (-2 * i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            expected.append(freq)
            bands["kept"] += 1
        elif wavelen > old / low:
            expected.append(freq / factor)
            bands["divided"] += 1
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append((1 - smooth) * freq / factor + smooth * freq)
            bands["smoothed"] += 1
    assert bands == {"kept": 29, "smoothed": 6, "divided": 29}
    config = llama.Config(rope_theta=theta, rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                          rope_original_max_position_embeddings=old)
    ours = llama.rope_frequencies(config, dim).double()
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    unscaled = theta ** (-2 * torch.arange(dim // 2, dtype=torch.float64) / dim)
    assert torch.isclose(ours, unscaled, rtol=1e-5, atol=0).sum() == 29  # the fast pairs, untouched
    plain = llama.Config(rope_theta=theta)
    torch.testing.assert_close(llama.rope_frequencies(plain, dim).double(), unscaled, rtol=1e-5, atol=0)


def test_llama_cache_prefill_in_chunks():
    # a prompt fed in two chunks through the cache (the second one masked causally at an offset) == one forward
    model = tiny_llama().eval()
    idx = torch.randint(0, LLAMA_VOCAB, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_cache(2, 20)
        first, _ = model(idx[:, :7], cache=cache)
        second, _ = model(idx[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head,dtype", [(4, torch.float32), (2, torch.float32), (1, torch.float32),
                                             (2, torch.bfloat16)], ids=["mha", "gqa", "mqa", "gqa-bf16"])
def test_llama_kv_cache_bytes(n_kv_head, dtype):
    # the cache generate() really allocates holds n_kv_head heads: 2 * n_layer * n_kv_head * head_dim * dtype_size
    # bytes per token, never the n_head repeated ones
    n_layer, n_head, n_embd, B, prompt, new = 3, 4, 64, 2, 5, 4
    model = tiny_llama(block_size=32, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    model = model.to(dtype).eval()
    caches = []
    make_cache = model.make_cache
    model.make_cache = lambda *a: caches.append(make_cache(*a)) or caches[-1]
    model.generate(torch.randint(0, LLAMA_VOCAB, (B, prompt)), new, temperature=0)
    (cache,) = caches
    per_token = 2 * n_layer * n_kv_head * (n_embd // n_head) * torch.finfo(dtype).bits // 8
    assert type(cache.bytes_per_token) is int and cache.bytes_per_token == per_token
    assert make_cache(1, 1).bytes_per_token == per_token
    allocated = sum(t.untyped_storage().nbytes() for t in vars(cache).values() if torch.is_tensor(t))
    assert allocated == per_token * B * (prompt + new)  # every tensor the cache holds, per token of each sequence


def test_llama_swiglu_width_rule():
    # Meta's multiple_of rule against the published widths: Llama 2 7B 11008, Llama 3 8B 14336
    assert llama.Config(n_embd=4096, multiple_of=256).intermediate_size == 11008
    assert llama.Config(n_embd=4096, multiple_of=1024, ffn_dim_multiplier=1.3).intermediate_size == 14336
    assert llama.Config(n_embd=4096, intermediate_size=1000).intermediate_size == 1000
    assert llama.Config(n_embd=96, multiple_of=256).intermediate_size == 256  # 2/3 * 4 * 96 is a multiple already


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_flops_per_token_formula(tie):
    V, C, L, H, KV, I, T = 96, 64, 2, 4, 2, 88, 32
    model = llama.Model(llama.Config(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_kv_head=KV, n_embd=C,
                                     intermediate_size=I, tie_word_embeddings=tie))
    hd = C // H
    # by hand, per layer: 2 RMSNorm gains, q, k and v (n_kv_head heads each), o, and SwiGLU's gate, up, down; then
    # ln_f and the head (the input embedding is a lookup, not counted; when tied it is the head, counted once)
    per_layer = 2 * C + C * H * hd + 2 * C * KV * hd + H * hd * C + 3 * C * I
    n = L * per_layer + C + V * C
    attention = 2 * 2 * L * T * H * hd  # QK^T and AV over all n_head query heads, forward
    assert model.flops_per_token(T) == 6 * n + 3 * attention


def test_llama_gaia_model_loads_in_transformers(tmp_path):
    # a gaia-born model (Meta's width rule, tied, GQA, Llama 3 scaling, another rope_theta) read by transformers
    from transformers import LlamaForCausalLM
    config = dict(tie_word_embeddings=True, rope_theta=1234.0, rope_factor=4.0, rope_original_max_position_embeddings=16)
    model = tiny_llama(**config).eval()
    assert not any("rope" in name for name in model.state_dict())  # cos, sin: buffers rebuilt, never saved
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # larger than the init, so attention is far from uniform
    model.save_pretrained(str(tmp_path))
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    assert hf_model.config.intermediate_size == model.config.intermediate_size == 192
    idx = torch.randint(0, LLAMA_VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_llama_tp_plan_names_real_modules():
    import fnmatch
    model = tiny_llama()
    names = dict(model.named_modules())
    plan = model.tp_plan()
    linear = {path: style for path, style in plan.items() if path.endswith("_proj")}
    styles = {path.split(".")[-1]: type(style).__name__ for path, style in linear.items()}
    assert styles == dict(q_proj="ColwiseParallel", k_proj="ColwiseParallel", v_proj="ColwiseParallel",
                          o_proj="RowwiseParallel", gate_proj="ColwiseParallel", up_proj="ColwiseParallel",
                          down_proj="RowwiseParallel")
    for path in plan:
        matched = [n for n in names if fnmatch.fnmatch(n, path)]
        assert matched, path
        if path in linear:
            assert len(matched) == 2 and all(isinstance(names[n], torch.nn.Linear) for n in matched), path
    # sequence parallel: every RMSNorm works on a slice of the sequence
    for name in (n for n, m in names.items() if isinstance(m, llama.RMSNorm)):
        assert any(fnmatch.fnmatch(name, p) and type(s).__name__ == "SequenceParallel" for p, s in plan.items()), name


@pytest.mark.parametrize("n_head,n_kv_head,T", [(8, 2, 1), (4, 1, 1), (8, 2, 3), (4, 4, 1)],
                         ids=["gqa-decode", "mqa-decode", "gqa-prefill", "mha-decode"])
def test_llama_cached_attention_is_plain_attention(n_head, n_kv_head, T):
    # cached_attention (below the speed fence: query heads grouped per k/v head when decoding one token under GQA,
    # SDPA otherwise) against attention written out: query head h reads k/v head h // (n_head / n_kv_head),
    # softmax(q k^T / sqrt(hd)) v under the cache's causal mask; forward and gradients
    torch.manual_seed(0)
    B, S, hd = 2, 7, 16
    q = torch.randn(B, n_head, T, hd, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, n_kv_head, S, hd, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T) if T > 1 else None
    rep = n_head // n_kv_head
    scores = q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = scores.softmax(dim=-1) @ v.repeat_interleave(rep, dim=1)
    ours = llama.cached_attention(q, k, v, mask)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn_like(reference)
    for g, g_ref in zip(torch.autograd.grad((ours * weights).sum(), (q, k, v)),
                        torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_head=3), r"^n_kv_head=3 does not divide n_head=4; n_kv_head must divide n_head \(e.g. 1, 2 or 4\)$"),
    (dict(n_kv_head=8), "n_kv_head=8 does not divide n_head=4"),
    (dict(n_head=1, n_kv_head=2), r"n_kv_head=2 does not divide n_head=1; .*\(e.g. 1\)$"),
    (dict(n_head=0), "^n_head=0 must be >= 1$"),
    (dict(n_kv_head=0), "^n_kv_head=0 must be >= 1$"),
    (dict(n_embd=130), r"^n_embd=130 is not divisible by n_head=4; .*\(e.g. --n_embd=128\)$"),
    (dict(n_embd=1000, n_head=3, n_kv_head=1), r"n_embd=1000 is not divisible by n_head=3; .*--n_embd=996 or --n_head=4"),
    (dict(n_embd=36), r"n_embd=36 / n_head=4 = head_dim 9 is odd.*\(e.g. --n_embd=32 or --n_head=6\)"),
    (dict(dropout=2), r"^dropout=2 must be in \[0, 1\); e.g. --dropout=0.1$"),
    (dict(dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
    (dict(vocab_size=0), "vocab_size=0 must be >= 1"),
    (dict(block_size=0), "block_size=0 must be >= 1"),
    (dict(n_layer=0), "n_layer=0 must be >= 1"),
    (dict(n_embd=0), "n_embd=0 must be >= 1"),
    (dict(norm_eps=0.0), "norm_eps=0.0 must be > 0"),
    (dict(intermediate_size=0), "intermediate_size=0 must be >= 1, or None"),
    (dict(multiple_of=0), "multiple_of=0 must be >= 1"),
    (dict(ffn_dim_multiplier=0.0), "ffn_dim_multiplier=0.0 must be > 0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0 must be > 0"),
    (dict(rope_factor=0.5), "rope_factor=0.5 must be >= 1"),
    (dict(rope_low_freq_factor=4.0), "rope_low_freq_factor=4.0 and rope_high_freq_factor=4.0 must satisfy"),
    (dict(rope_low_freq_factor=0.0), "rope_low_freq_factor=0.0 .* must satisfy 0 < low < high"),
    (dict(rope_original_max_position_embeddings=0), "rope_original_max_position_embeddings=0 must be >= 1"),
])
def test_llama_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        llama.Config(**overrides)


def test_llama_config_rebuilds_from_its_dict():
    # checkpoints store dataclasses.asdict(config); the derived intermediate_size is stored and read back as set
    for config in (llama.Config(), llama.Config(n_embd=256, multiple_of=64, ffn_dim_multiplier=1.3),
                   llama.Config(intermediate_size=100, rope_factor=8.0)):
        assert llama.Config(**dataclasses.asdict(config)) == config
    assert llama.Config(vocab_size=None).vocab_size is None  # train.py builds it so, then sets the tokenizer's


def test_llama_bad_input():
    model = tiny_llama(block_size=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.make_cache(1, 16)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size=16"):  # 10 cached + 7 new
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


def test_llama_rejects_unsupported_checkpoints(tmp_path):
    base = dict(model_type="llama", vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for extra, message in [(dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "rope_type='yarn'"),
                           (dict(attention_bias=True), "attention_bias=True"),
                           (dict(head_dim=32), "head_dim=32"),
                           (dict(model_type="mistral"), "holds a 'mistral' model, not llama; use a LlamaForCausalLM"),
                           (dict(model_type="mixtral"), "holds a 'mixtral' model, not llama; use --model=moe")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(ValueError, match=message):
            llama.Model.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------- mamba.py
# Tests of mamba.py (Mamba-1 and Mamba-2). References: transformers' MambaForCausalLM / Mamba2ForCausalLM holding
# the same weights, step-by-step loops of the recurrence written here, and formulas for the state size and FLOPs.


MAMBA_VOCAB = 97


def tiny_mamba(**overrides):
    """A small random Mamba, Mamba-1 unless variant="mamba2" (then 8 heads of 8 in 2 groups, chunks of 8)."""
    torch.manual_seed(0)
    config = dict(variant="mamba1", vocab_size=MAMBA_VOCAB, n_layer=2, n_embd=32, d_state=8, head_dim=8, n_groups=2,
                  chunk_size=8)
    return mamba.Model(mamba.Config(**{**config, **overrides})).eval()


def perturbed_mamba(hf_model):
    """HF's init leaves norms at 1, D at 1 and conv biases at 0, where a mixed-up weight would go unnoticed."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf_model


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_hf_mamba1(tmp_path, max_shard_size):
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    hf = MambaForCausalLM(MambaConfig(vocab_size=MAMBA_VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, use_bias=True,
                                      pad_token_id=None, bos_token_id=None, eos_token_id=None))
    model = hf_roundtrip(mamba, perturbed_mamba(hf), tmp_path, MAMBA_VOCAB, seq_len=24, max_shard_size=max_shard_size)
    assert model.config.variant == "mamba1" and model.config.dt_rank == 2 and model.config.tie_word_embeddings


@pytest.mark.parametrize("n_groups,num_heads,head_dim,max_shard_size", [(1, 4, 16, None), (2, 8, 8, None), (2, 8, 8, "20KB")])
def test_hf_mamba2(tmp_path, n_groups, num_heads, head_dim, max_shard_size):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=MAMBA_VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        num_heads=num_heads, head_dim=head_dim, n_groups=n_groups, chunk_size=8))
    model = hf_roundtrip(mamba, perturbed_mamba(hf), tmp_path, MAMBA_VOCAB, seq_len=21,  # 2 chunks of 8 and a partial one
                         max_shard_size=max_shard_size)
    c = model.config
    assert (c.variant, c.n_groups, c.head_dim, c.chunk_size, c.tie_word_embeddings) == ("mamba2", n_groups, head_dim, 8, False)


# ------------------------------------------------------------------------- the recurrence, step by step

def reference_ssm(x, dt, A, B, C, D, h):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t h_t + D x_t, one step at a time, heads reading their
    group's B and C. x (b, T, H, P), dt (b, T, H), A (H, N) or (H, 1), B, C (b, T, G, N), h (b, H, P, N)."""
    H, G = x.shape[2], B.shape[2]
    B, C = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)  # (b, T, H, N)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t, :, None] * A)  # (b, H, N) or (b, H, 1)
        h = decay[:, :, None, :] * h + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]) + D[None, :, None] * x[:, t])
    return torch.stack(ys, dim=1), h


def ssm_inputs(b, T, H, P, G, N, scalar_A):
    torch.manual_seed(0)
    x = torch.randn(b, T, H, P, dtype=torch.float64)
    dt = torch.exp(torch.empty(b, T, H, dtype=torch.float64).uniform_(-7, 3))  # 1e-3 .. 20: from keeping h to wiping it
    A = -torch.empty(H, 1 if scalar_A else N, dtype=torch.float64).uniform_(0.5, 16)
    B, C = torch.randn(b, T, G, N, dtype=torch.float64), torch.randn(b, T, G, N, dtype=torch.float64)
    D, h = torch.randn(H, dtype=torch.float64), torch.randn(b, H, P, N, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, h)]


def check_against_reference(fn, inputs, reference=reference_ssm):
    """fn's outputs (y, last h) and the gradients of every input must match the reference's (fn runs in fp32)."""
    torch.manual_seed(1)
    outs = [fn(*inputs), reference(*inputs)]
    weights = [torch.randn_like(o, dtype=torch.float64) for o in outs[1]]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), inputs) for out in outs]
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)
    for name, got, want in zip("x dt A B C D h".split(), *grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("T", [1, 37, 64])
def test_selective_scan_matches_loop(T):
    # Mamba-1 shapes: every channel a head of size P = 1 with N decays of its own, one group
    check_against_reference(mamba.selective_scan, ssm_inputs(2, T, 6, 1, 1, 5, scalar_A=False))


@pytest.mark.parametrize("T,chunk_size", [(37, 8), (16, 8), (5, 8), (12, 1)])
def test_ssd_matches_loop(T, chunk_size):
    # Mamba-2 shapes: 4 heads of P = 3 in 2 groups, one scalar decay per head
    check_against_reference(lambda *a: mamba.ssd(*a[:6], chunk_size, a[6]), ssm_inputs(2, T, 4, 3, 2, 5, scalar_A=True))


@pytest.mark.parametrize("scalar_A,P,G", [(False, 1, 1), (True, 3, 2)])
def test_mamba_sequential_definition_matches_loop(scalar_A, P, G):
    check_against_reference(mamba.ssm_sequential, ssm_inputs(2, 9, 4, P, G, 5, scalar_A))


@pytest.mark.parametrize("path, T, chunk_size, from_state", [
    ("selective_scan", 1, None, False), ("selective_scan", 1, None, True), ("selective_scan", 2, None, False),
    ("selective_scan", 37, None, False), ("selective_scan", 64, None, True),
    ("ssd", 5, 8, False), ("ssd", 16, 8, True), ("ssd", 37, 8, False), ("ssd", 37, 8, True), ("ssd", 12, 1, True)])
def test_mamba_speed_paths_equal_the_sequential_definition(path, T, chunk_size, from_state):
    """Below the speed fence against the definition above it: selective_scan (parallel scan: T = 1, even and odd T)
    and ssd (one partial chunk, whole chunks, chunks and a partial one, chunks of 1) give ssm_sequential's y and
    last h, and the same gradients for every input, from a zero state (h=None) and from a given one."""
    scalar_A = path == "ssd"
    inputs = ssm_inputs(2, T, 4, 3 if scalar_A else 1, 2 if scalar_A else 1, 5, scalar_A)
    if not from_state:
        inputs = inputs[:6]
    fast = mamba.selective_scan if path == "selective_scan" else lambda *a: mamba.ssd(*a[:6], chunk_size, *a[6:])
    check_against_reference(fast, inputs, reference=mamba.ssm_sequential)


def linear_recurrence_loop(a, b):
    """h_t = a_t h_{t-1} + b_t along dim 1 from h_{-1} = 0, one step at a time (a broadcasts against b)."""
    h, hs = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 37])
def test_mamba_linear_recurrence_matches_loop(T):
    """The parallel scan with its hand-written backward, a broadcast over a size-1 dim as selective_scan and ssd
    call it: h and the gradients of a and b equal autograd through the loop; gradcheck against finite differences."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, T, 3, 1, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, T, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, T, 3, 4, generator=g, dtype=torch.float64)
    h, want = kernels.LinearRecurrence.apply(a, b), linear_recurrence_loop(a, b)
    torch.testing.assert_close(h, want, atol=1e-12, rtol=0)
    for got, ref in zip(torch.autograd.grad((h * w).sum(), (a, b)), torch.autograd.grad((want * w).sum(), (a, b))):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(kernels.LinearRecurrence.apply, (a, b))


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
def test_mamba_model_with_only_the_sequential_definition_is_the_same(variant, monkeypatch):
    """The one-line call sites: the model's logits and every parameter's gradient are the same when the speed
    paths are replaced by the sequential definition."""
    model = tiny_mamba(variant=variant, bias=True).train()
    idx = torch.randint(0, MAMBA_VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))

    def logits_and_grads():
        model.zero_grad()
        logits, loss = model(idx, idx)
        loss.backward()
        return [logits] + [p.grad.clone() for p in model.parameters()]

    fast = logits_and_grads()
    monkeypatch.setattr(mamba, "selective_scan", mamba.ssm_sequential)
    monkeypatch.setattr(mamba, "ssd", lambda x, dt, A, B, C, D, chunk_size, h=None: mamba.ssm_sequential(x, dt, A, B, C, D, h))
    for got, want in zip(fast, logits_and_grads(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- the model

@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
def test_mamba_cached_decode(variant):
    check_cached_decode(tiny_mamba(variant=variant), MAMBA_VOCAB, prompt_len=11, new_tokens=32)  # Mamba-2: 1.4 chunks


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
def test_mamba_state_continues(variant):
    """Feeding a sequence in two pieces through the cache (the second by the parallel path, from a state) gives the
    logits of one full forward."""
    model = tiny_mamba(variant=variant)
    idx = torch.randint(0, MAMBA_VOCAB, (2, 40))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_cache(2, 40)
        first, _ = model(idx[:, :13], cache=cache)
        second, _ = model(idx[:, 13:], cache=cache)
    torch.testing.assert_close(torch.cat((first, second), 1), full, atol=1e-5, rtol=0)
    assert cache.pos == 40


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_cache_bytes(variant, dtype):
    """The state per layer, by formula: d_conv - 1 conv inputs of each conv channel (x, and Mamba-2's B and C) in
    the model's dtype, and h, d_inner * d_state floats in fp32. It does not grow: bytes_per_token is 0, and a
    cache for 1,000 tokens, or one that has seen 45, holds what one for 10 holds."""
    model = tiny_mamba(variant=variant).to(dtype)
    c, batch = model.config, 3
    conv_channels = c.d_inner + (2 * c.n_groups * c.d_state if variant == "mamba2" else 0)
    per_layer = conv_channels * (c.d_conv - 1) * dtype.itemsize + c.d_inner * c.d_state * 4
    cache = model.make_cache(batch, 10)
    assert type(cache.bytes_per_token) is int and cache.bytes_per_token == 0
    assert cache.nbytes == c.n_layer * batch * per_layer
    assert (model.make_cache(batch, 1000).nbytes - cache.nbytes) / 990 == cache.bytes_per_token
    with torch.no_grad():
        model(torch.randint(0, MAMBA_VOCAB, (batch, 5)), cache=cache)
        model(torch.randint(0, MAMBA_VOCAB, (batch, 40)), cache=cache)
    assert cache.pos == 45 and sum(t.numel() * t.element_size() for t in vars(cache).values()
                                   if torch.is_tensor(t)) == c.n_layer * batch * per_layer


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_mamba_flops_per_token_formula(variant, tie):
    """Parameters counted by hand (n_embd 32, d_inner 64, N 8, d_conv 4, 2 layers, vocab 97, biases on), then
    6 FLOPs per weight that multiplies (not the embedding lookup, unless it is the tied head) plus 3x the scan's
    forward: Mamba-1 9 d_inner N; Mamba-2 with Q = 8, H = 8, G = 2: 2QGN + QH + 2Q d_inner + 4 d_inner N."""
    model = tiny_mamba(variant=variant, bias=True, tie_word_embeddings=tie)
    if variant == "mamba1":  # dt_rank = ceil(32 / 16) = 2
        per_layer = (32 + (32 * 128 + 128) + (64 * 4 + 64) + 64 * (2 + 2 * 8) + (2 * 64 + 64) + 64 * 8 + 64
                     + (64 * 32 + 32))  # ln_1, in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj
        scan = 9 * 64 * 8
    else:  # conv channels 64 + 2 * 2 * 8 = 96; in_proj gives z 64, xBC 96, Δ 8
        per_layer = 32 + (32 * 168 + 168) + (96 * 4 + 96) + 8 + 8 + 8 + 64 + (64 * 32 + 32)  # ... dt_bias, A_log, D, norm
        scan = 2 * 8 * 2 * 8 + 8 * 8 + 2 * 8 * 64 + 4 * 64 * 8
    table = 97 * 32
    assert model.num_params() == 2 * per_layer + 32 + table * (1 if tie else 2)
    weights = 2 * per_layer + 32 + table  # the head; the untied embedding table is a lookup
    assert model.flops_per_token(64) == 6 * weights + 3 * 2 * scan


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
def test_mamba_save_load_and_loss(tmp_path, variant):
    model = tiny_mamba(variant=variant, tie_word_embeddings=variant == "mamba1", bias=True)
    model.save_pretrained(str(tmp_path))
    again = mamba.Model.from_pretrained(str(tmp_path)).eval()
    unused = {"mamba1": ("head_dim", "n_groups", "chunk_size"), "mamba2": ("dt_rank",)}[variant]  # HF has no key for them
    assert dataclasses.replace(again.config, **{k: getattr(model.config, k) for k in unused}) == model.config
    idx = torch.randint(0, MAMBA_VOCAB, (2, 19))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    with torch.no_grad():
        logits, loss = model(idx, targets)
        logits2, _ = again(idx)
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, MAMBA_VOCAB), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)


MAMBA_BAD_CONFIGS = [
    (dict(variant="mamba3"), r"variant='mamba3' is not a Mamba variant; choose --variant=mamba1 .* or --variant=mamba2"),
    (dict(vocab_size=0), r"vocab_size=0 must be an integer >= 1"),
    (dict(n_layer=0), r"n_layer=0 must be"),
    (dict(n_embd=-8), r"n_embd=-8 must be"),
    (dict(d_state=0), r"d_state=0 must be an integer >= 1"),
    (dict(d_conv=0), r"d_conv=0 must be"),
    (dict(expand=0), r"expand=0 must be"),
    (dict(expand=1.5), r"expand=1.5 must be an integer"),
    (dict(chunk_size=0), r"chunk_size=0 must be"),
    (dict(head_dim=0), r"head_dim=0 must be"),
    (dict(n_groups=0), r"n_groups=0 must be"),
    (dict(dt_rank=0), r"dt_rank=0 must be an integer >= 1; or leave it unset \(None\) for ceil\(n_embd / 16\) = 8"),
    (dict(dt_min=0.0), r"dt_min=0.0 must be > 0.*--dt_min=0.001"),
    (dict(dt_min=0.1, dt_max=0.01), r"dt_max=0.01 is smaller than dt_min=0.1; choose dt_max >= dt_min"),
    (dict(norm_eps=0.0), r"norm_eps=0.0 must be > 0; e.g. --norm_eps=1e-5"),
    (dict(bias="yes"), r"bias='yes' must be True or False"),
    (dict(variant="mamba2", n_embd=32, head_dim=24),
     r"head_dim=24 does not divide d_inner = expand \* n_embd = 64; choose head_dim dividing 64 \(e.g. --head_dim=16\)"),
    (dict(variant="mamba2", n_embd=32, head_dim=16, n_groups=3),
     r"n_groups=3 does not divide n_head = d_inner / head_dim = 4; .* \(e.g. --n_groups=2\)"),
]


@pytest.mark.parametrize("overrides, message", MAMBA_BAD_CONFIGS, ids=[list(o)[-1] for o, _ in MAMBA_BAD_CONFIGS])
def test_mamba_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match="^" + message) as error:
        mamba.Config(**overrides)
    assert "\n" not in str(error.value)


def test_mamba_config_derives_and_rebuilds():
    assert mamba.Config(n_embd=40).dt_rank == 3 and mamba.Config(n_embd=40, dt_rank=5).dt_rank == 5
    c2 = mamba.Config(variant="mamba2", n_embd=64, head_dim=16)
    assert c2.dt_rank is None and (c2.d_inner, c2.n_head) == (128, 8)  # derived, not fields
    assert {"d_inner", "n_head"}.isdisjoint(f.name for f in dataclasses.fields(mamba.Config))
    for c in (mamba.Config(), c2, mamba.Config(vocab_size=None)):  # train.py sets vocab_size after building
        assert mamba.Config(**dataclasses.asdict(c)) == c


def test_mamba_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="idx"):
        tiny_mamba()(torch.zeros(2, 3))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="holds a 'gpt2' model, not mamba or mamba2; use --model=gpt2"):
        mamba.Model.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------- moe.py
# Tests of moe.py. The references are independent of gaia's code: transformers' MixtralForCausalLM and
# Qwen3MoeForCausalLM holding the same weights, a slow per-token MoE loop written here, the balancing and
# z-loss formulas computed here by hand (and transformers' load_balancing_loss_func), and the cache-free
# full forward.

MOE_VOCAB = 96


def tiny_moe_config(**kw):
    base = dict(vocab_size=MOE_VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                n_experts=4, n_experts_per_tok=2, intermediate_size=48)
    return moe.Config(**{**base, **kw})


def tiny_moe(**overrides):
    """A small random moe.Model for the tests: 2 layers of 4 experts (top 2), vocab 96, block_size 64."""
    torch.manual_seed(0)
    return moe.Model(tiny_moe_config(**overrides))


# ------------------------------------------------------------------ transformers as the reference

def hf_mixtral(n_experts, k, n_kv_head, tie=False, vocab_size=MOE_VOCAB):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=n_kv_head, num_local_experts=n_experts,
                           num_experts_per_tok=k, max_position_embeddings=64, tie_word_embeddings=tie)
    return MixtralForCausalLM(config)


def hf_qwen3_moe(norm_topk_prob, head_dim=24):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=MOE_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                            num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob,
                            max_position_embeddings=64)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # transformers initialises q_norm / k_norm to ones: make them count
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("n_experts,k,n_kv_head,tie,max_shard_size", [(4, 2, 2, False, None), (8, 2, 1, True, None),
                                                                       (4, 2, 2, False, "20KB")])
def test_moe_matches_hf_mixtral(tmp_path, n_experts, k, n_kv_head, tie, max_shard_size):
    model = hf_roundtrip(moe, hf_mixtral(n_experts, k, n_kv_head, tie), tmp_path, MOE_VOCAB, max_shard_size=max_shard_size)
    c = model.config
    assert (c.n_experts, c.n_experts_per_tok, c.n_kv_head, c.tie_word_embeddings) == (n_experts, k, n_kv_head, tie)
    assert (c.qk_norm, c.norm_topk_prob) == (False, True)


@pytest.mark.parametrize("norm_topk_prob,max_shard_size", [(True, None), (False, None), (False, "20KB")])
def test_moe_matches_hf_qwen3_moe(tmp_path, norm_topk_prob, max_shard_size):
    model = hf_roundtrip(moe, hf_qwen3_moe(norm_topk_prob), tmp_path, MOE_VOCAB, max_shard_size=max_shard_size)
    c = model.config
    assert (c.qk_norm, c.norm_topk_prob, c.head_dim) == (True, norm_topk_prob, 24)
    assert (c.n_experts, c.n_experts_per_tok) == (8, 3)


def test_moe_fine_tune_sets_loss_weights_not_shapes(tmp_path):
    """The router loss weights say how to train, so fine-tuning a transformers checkpoint may set them;
    a shape (n_experts) must match the checkpoint."""
    hf_mixtral(4, 2, 2, vocab_size=256).save_pretrained(tmp_path / "hf")  # 256: the byte tokenizer's
    args = [*TINY_RUN, "--model=moe", f"--init_from={tmp_path / 'hf'}", "--max_iters=0", f"--out_dir={tmp_path / 'o'}",
            f"--cache_dir={tmp_path / 'c'}", "--block_size=16"]
    model = train.train(args + ["--aux_loss_coef=0.05", "--z_loss_coef=0.0"])
    assert (model.config.aux_loss_coef, model.config.z_loss_coef) == (0.05, 0.0)
    with pytest.raises(configurator.ConfigError, match="has n_experts=4, not 8"):
        train.train(args + ["--n_experts=8"])


def test_moe_loads_fused_expert_layout(tmp_path):
    """A checkpoint holding transformers 5's in-memory layout (experts fused in 3-D tensors) loads too."""
    from safetensors.torch import save_file
    hf = randomize_constant_params(hf_mixtral(4, 2, 2).eval())
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # model.layers.i.mlp.experts.gate_up_proj ...
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = moe.Model.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, MOE_VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_moe_rejects_unsupported_checkpoints(tmp_path):
    import json
    hf_qwen3_moe(True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [1]}))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        moe.Model.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model, not moe \\(mixtral or qwen3_moe\\); use --model=llama"):
        moe.Model.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        moe.Model(tiny_moe_config(norm_topk_prob=False)).save_pretrained(str(tmp_path / "out"))


@pytest.mark.parametrize("overrides, message", [
    ({"n_head": 0}, "n_head=0 must be >= 1"),
    ({"n_kv_head": -1}, "n_kv_head=-1 must be >= 1"),
    ({"n_experts": 0}, "n_experts=0 must be >= 1"),
    ({"n_experts_per_tok": 0}, "n_experts_per_tok=0 must be >= 1"),
    ({"intermediate_size": -5}, "intermediate_size=-5 must be >= 1"),
    ({"head_dim": 0}, "head_dim=0 must be >= 1"),
    ({"n_embd": 1000, "n_head": 3, "n_kv_head": 1}, "n_embd=1000 is not divisible by n_head=3; choose n_embd as a "
                                                    "multiple of n_head \\(e.g. --n_embd=999 or --n_head=4\\), or set --head_dim"),
    ({"n_embd": 36, "n_head": 4}, "head_dim=9 is odd; RoPE turns pairs"),
    ({"n_head": 4, "n_kv_head": 3}, "n_kv_head=3 does not divide n_head=4; n_kv_head must divide n_head \\(e.g. 1, 2 or 4\\)"),
    ({"n_experts": 4, "n_experts_per_tok": 5}, "n_experts_per_tok=5 is more than n_experts=4.*--n_experts_per_tok=4 "
                                               "or --n_experts=5"),
    ({"dropout": 2}, "dropout=2 must be in \\[0, 1\\); e.g. --dropout=0.1"),
    ({"norm_eps": -1e-6}, "norm_eps=-1e-06 must be > 0"),
    ({"rope_theta": 0}, "rope_theta=0 must be > 0"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef=-0.1 must be >= 0"),
    ({"z_loss_coef": float("nan")}, "z_loss_coef=nan must be >= 0"),
])
def test_moe_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe.Config(**overrides)


def test_moe_config_derives_head_dim_and_the_model_leaves_it_alone():
    import dataclasses
    c = tiny_moe_config()
    assert c.head_dim == 32 // 4 and moe.Config(**dataclasses.asdict(c)) == c
    before = dataclasses.asdict(c)
    moe.Model(c)
    assert dataclasses.asdict(c) == before
    assert tiny_moe_config(n_embd=30, n_head=4, head_dim=8).head_dim == 8  # set: n_embd need not divide


def test_moe_flops_per_token_counts_the_active_experts():
    """Parameters by hand, only n_experts_per_tok of the n_experts experts per layer counting, then 6 per parameter
    plus attention's 12 * n_layer * n_head * head_dim * seq_len."""
    L, C, H, KV, D, E, k, I, V = 2, 32, 4, 2, 12, 8, 3, 20, MOE_VOCAB
    for qk_norm, tie in [(False, False), (True, True)]:
        model = tiny_moe(n_layer=L, n_embd=C, n_head=H, n_kv_head=KV, head_dim=D, n_experts=E, n_experts_per_tok=k,
                         intermediate_size=I, qk_norm=qk_norm, tie_word_embeddings=tie)
        attention = C * H * D + 2 * C * KV * D + H * D * C + (2 * D if qk_norm else 0)
        per_layer = 2 * C + attention + C * E + k * 3 * I * C  # 2 RMSNorms, attention, router, the k chosen experts
        active = L * per_layer + C + V * C  # + ln_f and the head (the embedding lookup is not a matmul)
        assert model.num_params(active=True) == active
        assert model.flops_per_token(16) == 6 * active + 12 * L * H * D * 16


# ------------------------------------------------------------------ dispatch against a per-token loop

def moe_per_token(layer, x):
    """The MoE layer by definition, one token at a time: y = sum over its top-k experts e of w_e * SwiGLU_e(x)."""
    k, E = layer.config.n_experts_per_tok, layer.config.n_experts
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(token @ layer.router.weight.t(), dim=-1)
        chosen = sorted(range(E), key=lambda e: -probs[e].item())[:k]
        total = sum(probs[e] for e in chosen) if layer.config.norm_topk_prob else 1.0
        y = 0
        for e in chosen:
            swiglu = F.silu(layer.gate_proj[e] @ token) * (layer.up_proj[e] @ token)
            y = y + probs[e] / total * (layer.down_proj[e] @ swiglu)
        rows.append(y)
    return torch.stack(rows).view_as(x)


def grouped_mm_runs_on_cpu():
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
@pytest.mark.parametrize("n_experts,k,norm_topk_prob,tokens,hidden", [(4, 2, True, 24, 48), (8, 3, False, 24, 16),
                                                                      (8, 1, True, 5, 48)])
def test_moe_dispatch_matches_per_token_loop(path, n_experts, k, norm_topk_prob, tokens, hidden):
    """Outputs and gradients (input, router, experts) of the sorted, sliced dispatch equal the slow loop.
    Expert width 16 < n_embd 32 scales rows before the down projection, 48 after it. 5 tokens top-1 of 8
    leave experts with no token: their slices are empty and their gradients zero."""
    if path == "grouped_mm" and not grouped_mm_runs_on_cpu():
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    torch.manual_seed(0)
    layer = moe.MoE(tiny_moe_config(n_experts=n_experts, n_experts_per_tok=k, norm_topk_prob=norm_topk_prob,
                                 intermediate_size=hidden))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    layer.use_grouped_mm = path == "grouped_mm"
    x = torch.randn(1, tokens, 32, requires_grad=True)
    grad_out = torch.randn(1, tokens, 32)
    params = [x, layer.router.weight, layer.gate_proj, layer.up_proj, layer.down_proj]

    y, _, _ = layer(x)
    grads = torch.autograd.grad(y, params, grad_out)
    y_ref = moe_per_token(layer, x)
    grads_ref = torch.autograd.grad(y_ref, params, grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    if tokens == 5:
        assert (layer.load == 0).any() and (grads[2].abs().sum(dim=(1, 2)) == 0).any()


def test_moe_expert_matmul_paths_equal_a_row_by_row_product():
    """Both paths of expert_matmul (the speed fence), forced: each row times its expert's matrix, values and
    gradients, with experts that get no row. The grouped_mm path runs where torch has a CPU kernel for it."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 8, 0])  # rows per expert: experts 1 and 4 get none
    expert_of_row = torch.repeat_interleave(torch.arange(5), counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(5, 24, 16, requires_grad=True)
    g = torch.randn(int(counts.sum()), 24)
    reference = torch.stack([w[e] @ row for row, e in zip(x, expert_of_row.tolist())])
    ref_grads = torch.autograd.grad(reference, (x, w), g)
    paths = [False] + ([True] if grouped_mm_runs_on_cpu() else [])
    for use_grouped_mm in paths:
        y = moe.expert_matmul(x, w, counts, use_grouped_mm)
        torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad(y, (x, w), g), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert use_grouped_mm or y.grad_fn.name() == "CatBackward0"


# ------------------------------------------------------------------ the losses, by hand

# 6 tokens, 4 experts: fixed router logits
MOE_ROUTER_LOGITS = [[2.0, 1.0, 0.5, -1.0],
          [0.1, 0.2, 3.0, 0.0],
          [1.5, -0.5, 1.4, 0.3],
          [0.0, 0.0, 0.1, 2.5],
          [-1.0, 2.2, 0.0, 0.4],
          [3.0, 2.9, -2.0, 0.0]]


def test_moe_aux_and_z_loss_formulas():
    """With router = identity and x = the logits, the layer's router outputs MOE_ROUTER_LOGITS. Switch's loss
    E * sum_i f_i P_i (f_i = tokens with i among their top-2 / tokens, P_i = mean probability) and
    ST-MoE's z-loss mean_t logsumexp(logits_t)^2 are computed here in plain Python."""
    E, k, N = 4, 2, len(MOE_ROUTER_LOGITS)
    layer = moe.MoE(tiny_moe_config(n_embd=E, n_head=2, n_experts=E, n_experts_per_tok=k, intermediate_size=8))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
        for w in (layer.gate_proj, layer.up_proj, layer.down_proj):
            w.normal_()
    _, aux_loss, z_loss = layer(torch.tensor(MOE_ROUTER_LOGITS).view(1, N, E))

    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in MOE_ROUTER_LOGITS]
    top = [sorted(range(E), key=lambda e: -p[e])[:k] for p in probs]
    f = [sum(e in t for t in top) / N for e in range(E)]
    P = [sum(p[e] for p in probs) / N for e in range(E)]
    assert f == [3 / 6, 4 / 6, 3 / 6, 2 / 6]  # counted by eye: expert 0 is in the top-2 of rows 0, 2, 5, ...
    aux_hand = E * sum(fi * Pi for fi, Pi in zip(f, P))
    z_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in MOE_ROUTER_LOGITS) / N
    assert aux_loss.item() == pytest.approx(aux_hand, rel=1e-6)
    assert z_loss.item() == pytest.approx(z_hand, rel=1e-6)
    torch.testing.assert_close(layer.load, torch.tensor(f) / k)

    # transformers' Switch loss on one layer is the same number
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    hf_aux = load_balancing_loss_func((torch.tensor(MOE_ROUTER_LOGITS),), num_experts=E, top_k=k)
    assert aux_loss.item() == pytest.approx(hf_aux.item(), rel=1e-6)


def test_moe_loss_adds_layer_mean_of_router_losses():
    """Returned loss = cross-entropy + aux_loss_coef * mean over layers of the balancing loss + z_loss_coef *
    mean of the z-loss, each recomputed here from the router logits that forward hooks capture."""
    torch.manual_seed(0)
    model = moe.Model(tiny_moe_config(n_layer=3, aux_loss_coef=0.3, z_loss_coef=0.05))
    captured = []
    for block in model.transformer.h:
        block.mlp.router.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().float()))
    idx = torch.randint(0, MOE_VOCAB, (2, 12))
    logits, loss = model(idx, idx)
    E, k = 4, 2
    aux, z, load = [], [], []
    for router_logits in captured:  # (N, E) per layer
        probs = router_logits.softmax(-1)
        counts = torch.zeros(E).index_add_(0, probs.topk(k).indices.flatten(), torch.ones(probs.shape[0] * k))
        aux.append(E * (counts / probs.shape[0] * probs.mean(0)).sum())
        z.append((torch.logsumexp(router_logits, -1) ** 2).mean())
        load.append(counts / counts.sum())
    ce = F.cross_entropy(logits.view(-1, MOE_VOCAB), idx.view(-1))
    expected = ce + 0.3 * sum(aux) / 3 + 0.05 * sum(z) / 3
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)

    m = model.metrics()
    load = torch.stack(load)
    torch.testing.assert_close(m["expert_load"], load)
    torch.testing.assert_close(m["expert_imbalance"], (load.max(1).values / load.mean(1)).mean())
    torch.testing.assert_close(m["aux_loss"], sum(aux) / 3)
    torch.testing.assert_close(m["z_loss"], sum(z) / 3)
    assert all(not v.requires_grad for v in m.values())


# ------------------------------------------------------------------ decoding, training, tensor parallel

@pytest.mark.parametrize("qk_norm", [False, True])
def test_moe_cached_decode_matches_full_forward(qk_norm):
    check_cached_decode(tiny_moe(qk_norm=qk_norm, n_experts=8, n_kv_head=1), MOE_VOCAB)


@pytest.mark.parametrize("n_kv_head,dtype", [(2, torch.float32), (1, torch.float32), (2, torch.bfloat16)])
def test_moe_kv_cache_bytes(n_kv_head, dtype):
    """bytes_per_token = 2 (k and v) * n_layer * n_kv_head * head_dim * dtype size, per token of one sequence: the
    cache generate() really allocates holds n_kv_head heads, never the n_head repeated ones."""
    n_layer, batch, prompt, new = 3, 2, 5, 4
    model = tiny_moe(n_layer=n_layer, n_kv_head=n_kv_head, head_dim=12).to(dtype).eval()
    caches = []
    make_cache = model.make_cache
    model.make_cache = lambda *a: caches.append(make_cache(*a)) or caches[-1]
    model.generate(torch.randint(0, MOE_VOCAB, (batch, prompt)), new, temperature=0)
    (cache,) = caches
    per_token = 2 * n_layer * n_kv_head * 12 * torch.finfo(dtype).bits // 8
    assert isinstance(cache.bytes_per_token, int) and cache.bytes_per_token == per_token
    stored = sum(t.untyped_storage().nbytes() for t in (cache.k, cache.v))
    assert cache.nbytes == stored == per_token * batch * (prompt + new)


def test_moe_rope_turns_pairs_by_position_times_frequency():
    """kernels.rope with the model's cos/sin buffers against complex multiplication written here: the pair
    (x_i, x_{i + dim/2}) is the complex number x_i + i x_{i + dim/2}, turned by pos * theta^(-2i/dim).
    The buffers are not saved in the state_dict."""
    model = tiny_moe(head_dim=8, rope_theta=500.0)
    assert not any(k.endswith(("cos", "sin")) for k in model.state_dict())
    T, H, D = 10, 3, 8
    x = torch.randn(2, T, H, D, dtype=torch.float64)
    got, _ = kernels.rope_torch(x, x[:, :, :1], model.cos[:T, None].double(), model.sin[:T, None].double())
    angle = torch.tensor([[p * 500.0 ** (-2 * i / D) for i in range(D // 2)] for p in range(T)], dtype=torch.float64)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), atol=1e-6, rtol=0)  # float32 buffers


def moe_final_imbalance(aux_loss_coef, steps=40):
    """A tiny model trained on a fixed batch; returns max/mean expert load (mean over layers) of a last forward."""
    torch.manual_seed(0)
    model = moe.Model(tiny_moe_config(n_layer=2, n_experts=8, aux_loss_coef=aux_loss_coef, z_loss_coef=0.0))
    idx = torch.randint(0, MOE_VOCAB, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model(idx[:, :-1])
    return model.metrics()["expert_imbalance"].item(), loss.item()


def test_moe_aux_loss_lowers_expert_imbalance():
    """Same seed, same data, 40 AdamW steps: with aux_loss_coef=0.1 the busiest expert ends much closer to
    an even share than with 0 (seeds 0-5 measured 1.15-1.19 vs 1.39-1.47)."""
    imbalance_off, loss_off = moe_final_imbalance(0.0)
    imbalance_on, loss_on = moe_final_imbalance(0.1)
    assert imbalance_on < imbalance_off - 0.15, (imbalance_on, imbalance_off)
    assert loss_off < 3.0  # both learned the batch (ln 96 = 4.56 at the start)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_moe_tp_plan_names_real_modules(qk_norm):
    model = tiny_moe(n_layer=2, qk_norm=qk_norm)
    modules = dict(model.named_modules())
    styles = {}  # module path -> the name of its style, wildcards expanded as parallelize_module does
    for pattern, style in model.tp_plan().items():
        matched = [p for p in modules if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), p)]
        assert matched, pattern  # every entry names real modules
        styles.update({p: type(style).__name__ for p in matched})
    linear = {p: s for p, s in styles.items() if isinstance(modules[p], torch.nn.Linear) and p != "lm_head"}
    assert len(linear) == 8  # q, k, v, o of 2 layers; the router and experts stay replicated
    assert all(s == ("RowwiseParallel" if p.endswith("o_proj") else "ColwiseParallel") for p, s in linear.items())
    # sequence parallel: every RMSNorm works on a slice of the sequence (q/k norms on a slice of the heads)
    norms = [n for n, m in model.named_modules() if isinstance(m, moe.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 + (4 if qk_norm else 0)
    assert all(styles.get(n) == "SequenceParallel" for n in norms)



# ------------------------------------------------------------------------------------- mla.py
# Tests for mla.py (DeepSeek-V3: multi-head latent attention + DeepSeekMoE), against independent references:
# transformers' DeepseekV3ForCausalLM holding the same weights, slow loops written here, and formulas.

MLA_VOCAB = 96
# DeepSeek-V3's YaRN: cos/sin scaled by mscale(4, 1) / mscale(4, 0.707), the softmax by mscale(4, 0.707)^2 = 1.21;
# rope_theta not the default, so a loader that ignores it moves the logits
MLA_YARN = dict(rope_type="yarn", rope_theta=50000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32,
                beta_slow=1, mscale=1.0, mscale_all_dim=0.707)


def tiny_mla(**overrides):
    """A small random mla.py model: 3 layers (one dense, then two DeepSeekMoE layers of 8 experts in 2 groups),
    low-rank queries, the latent c_KV of 16 and a rope key of 8."""
    kw = dict(vocab_size=MLA_VOCAB, block_size=64, n_layer=3, n_head=4, n_embd=32, q_lora_rank=24, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=48, moe_intermediate_size=16,
              n_experts=8, n_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1)
    kw.update(overrides)
    torch.manual_seed(0)
    return mla.Model(mla.Config(**kw))


def hf_deepseek(**overrides):
    """A tiny random DeepseekV3ForCausalLM. initializer_range=0.1 (not 0.02) so attention patterns and
    routing are far from uniform and a wrong detail moves the logits well past 1e-4; the router bias
    e_score_correction_bias is random (not zeros), so selection-only use of the bias is tested."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    kw = dict(vocab_size=MLA_VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
              n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              max_position_embeddings=128, initializer_range=0.1)
    kw.update(overrides)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    return model


def hf_deepseek_in_gaia(tmp_path, **overrides):
    """hf_deepseek's weights loaded into mla.py (the model the decode tests run)."""
    hf_deepseek(**overrides).save_pretrained(tmp_path / "hf")
    return mla.Model.from_pretrained(str(tmp_path / "hf"))


def test_mla_hf_low_rank_query_moe_groups(tmp_path):
    """A sharded checkpoint (safetensors shards + index), q_lora_rank, MoE layers after one dense layer,
    group-limited routing (n_group=2, topk_group=1), DeepSeek's interleaved rope layout; then the expert load
    gaia reports for a training forward equals a count of the choices of transformers' own router on the same
    hidden states."""
    hf = hf_deepseek()
    model = hf_roundtrip(mla, hf, tmp_path, MLA_VOCAB, max_shard_size="20KB")
    assert model.config.q_lora_rank == 24 and model.config.first_k_dense_replace == 1
    inputs = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, block in enumerate(model.transformer.h) if isinstance(block.mlp, mla.MoE)]
    idx = torch.randint(0, MLA_VOCAB, (2, 24))
    model.train()  # dropout is 0: the same function, and the load of a training forward is what metrics() reports
    model(idx)
    load = model.metrics()["expert_load"]
    with torch.no_grad():
        expected = []
        for i in sorted(inputs):
            _, _, chosen = hf.model.layers[i].mlp.gate(inputs[i])  # transformers' router, same weights
            expected.append(torch.bincount(chosen.flatten(), minlength=8).float() / chosen.numel())
    for h in hooks:
        h.remove()
    assert load.shape == (2, 8) and not load.requires_grad
    torch.testing.assert_close(load, torch.stack(expected))
    imbalance = model.metrics()["expert_imbalance"]
    assert imbalance.ndim == 0 and imbalance.item() == pytest.approx(max(e.max().item() * 8 for e in expected))
    # transformers 5 holds experts fused, (E, 2I, C) gate_up_proj and (E, C, I) down_proj: that layout loads too
    from safetensors.torch import save_file
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in hf.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(mla.Model.from_pretrained(str(fused))(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_mla_hf_full_query_dense_only_tied(tmp_path):
    """q_lora_rank=None (full query projection), every layer dense (first_k_dense_replace = n_layer), the head
    tied to the embedding."""
    hf = hf_deepseek(q_lora_rank=None, first_k_dense_replace=3, tie_word_embeddings=True)
    model = hf_roundtrip(mla, hf, tmp_path, MLA_VOCAB)
    assert model.config.q_lora_rank is None and not model.moe_layers()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_mla_hf_groups_no_renorm_half_rope_theta(tmp_path):
    """n_group=4 / topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5, no shared expert,
    rope_interleave=False, and rope_theta=500 (not the default 10000)."""
    hf = hf_deepseek(q_lora_rank=None, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                     routed_scaling_factor=1.5, rope_interleave=False, first_k_dense_replace=0, n_shared_experts=0,
                     rope_parameters=dict(rope_type="default", rope_theta=500.0))
    model = hf_roundtrip(mla, hf, tmp_path, MLA_VOCAB)
    assert len(model.moe_layers()) == 3 and model.config.rope_theta == 500.0 and model.config.n_shared_experts == 0


def test_mla_hf_yarn(tmp_path):
    """DeepSeek-V3's YaRN rope scaling: frequency ramp, cos/sin attention factor (mscale != mscale_all_dim)
    and the softmax scale times mscale(factor, mscale_all_dim)^2; rope_theta=50000."""
    model = hf_roundtrip(mla, hf_deepseek(rope_parameters=MLA_YARN), tmp_path, MLA_VOCAB)
    c = model.config
    assert c.rope_factor == 4.0 and c.rope_theta == 50000.0 and c.mscale_all_dim == 0.707
    factor = (0.1 * math.log(4) + 1) / (0.1 * 0.707 * math.log(4) + 1)
    torch.testing.assert_close(model.cos[0], torch.full((8,), factor))  # position 0: cos 0 = 1, times the factor
    assert "cos" not in model.state_dict()


@pytest.mark.parametrize("rope", [None, MLA_YARN], ids=["plain", "yarn"])
def test_mla_cached_decode(tmp_path, rope):
    """Greedy decoding of 32 tokens from the latent cache, W_UK and W_UV absorbed into the query and the output,
    equals the full (training-path) forward at every step; with YaRN too, whose mscale^2 the absorbed softmax
    scale must carry (x1.21 here)."""
    model = hf_deepseek_in_gaia(tmp_path, **({"rope_parameters": rope} if rope else {}))
    check_cached_decode(model, MLA_VOCAB, new_tokens=32, atol=1e-4)


@pytest.mark.parametrize("kind", ["expanded", "kv"])
def test_mla_benchmark_baselines_decode_as_the_model(tmp_path, kind):
    """benchmarks/mla_cache.py's two baselines (the latent cache re-expanded at each step, per-head K/V caching)
    decode the same logits as the full forward, so its tokens/s compare equal work."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mla_cache", os.path.join(ROOT, "benchmarks", "mla_cache.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = hf_deepseek_in_gaia(tmp_path, rope_parameters=MLA_YARN)
    model.make_cache = bench.decode_with(model, kind)
    assert all(type(block.attn) is bench.ATTENTION[kind] for block in model.transformer.h)
    check_cached_decode(model, MLA_VOCAB, new_tokens=32, atol=1e-4)


def test_mla_cache_bytes():
    """make_cache(batch, max_len) holds n_layer * (kv_lora_rank + qk_rope_head_dim) * dtype_size bytes per token
    (an int), what its tensors measure; generate decodes in such a cache."""
    model = tiny_mla()
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = model.to(dtype).make_cache(3, 10)
        assert type(cache.bytes_per_token) is int and cache.latent.dtype == dtype
        assert cache.bytes_per_token == 3 * (16 + 8) * size  # n_layer=3, kv_lora_rank=16, qk_rope_head_dim=8
        tensors = [t for t in vars(cache).values() if torch.is_tensor(t)]
        assert sum(t.numel() * t.element_size() for t in tensors) / (3 * 10) == cache.bytes_per_token
        assert cache.nbytes == 3 * 10 * cache.bytes_per_token
    model = tiny_mla()
    made = []
    model.make_cache = lambda *a: made.append(mla.Model.make_cache(model, *a)) or made[-1]
    model.generate(torch.zeros(3, 4, dtype=torch.long), 5, temperature=0)
    assert len(made) == 1 and isinstance(made[0], mla.LatentCache) and made[0].pos == 9


def test_mla_dispatch_matches_token_loop():
    """The sorted, dropless dispatch equals a slow loop over tokens and their chosen experts (outputs and grads)."""
    torch.manual_seed(0)
    cfg = mla.Config(vocab_size=MLA_VOCAB, n_embd=16, moe_intermediate_size=8, n_experts=6, n_experts_per_tok=2,
                     n_group=3, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.0)
    moe = mla.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = moe(x)
    e = moe.experts
    ref = []
    for h in x.view(-1, 16):  # one token at a time, the definition written out
        s = torch.sigmoid(moe.gate.weight @ h)
        b = s + moe.gate.e_score_correction_bias
        group_score = b.view(3, 2).sum(-1)  # 2 experts a group: the top-2 sum is the group's sum
        allowed = torch.zeros(3, dtype=torch.bool)
        allowed[group_score.topk(2).indices] = True
        chosen = b.masked_fill(~allowed.repeat_interleave(2), float("-inf")).topk(2).indices
        g = s[chosen] / s[chosen].sum() * 2.0
        out = sum(g[j] * (e.down_proj[i] @ (F.silu(e.gate_proj[i] @ h) * (e.up_proj[i] @ h)))
                  for j, i in enumerate(chosen.tolist()))
        ref.append(out + moe.shared_experts(h))
    ref = torch.stack(ref).view(2, 7, 16)
    torch.testing.assert_close(y, ref)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, e.gate_proj, e.down_proj, moe.gate.weight])
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, e.gate_proj, e.down_proj, moe.gate.weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_mla_expert_load_counts_training_forwards_only():
    """The expert load, what metrics() logs and what after_optimizer_step balances, is that of training
    forwards: model.eval(), torch.no_grad() and generate leave both alone; the next training forward adds."""
    model = tiny_mla(first_k_dense_replace=0)
    moes = model.moe_layers()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, MLA_VOCAB, (2, 2, 16), generator=g)

    def seen():
        return torch.stack([moe.gate.load_since_update for moe in moes]).clone(), model.metrics()["expert_load"].clone()

    model.train()
    model(a)
    counts, load = seen()
    assert counts.sum(dim=1).tolist() == [2 * 16 * 2] * 3  # every token's n_experts_per_tok=2 choices, per layer
    torch.testing.assert_close(load, counts / (2 * 16 * 2))
    model.eval()
    model(b)
    model.train()
    with torch.no_grad():
        model(b)
    model.generate(b[:, :4], 3, temperature=0)
    after_eval = seen()
    assert torch.equal(after_eval[0], counts) and torch.equal(after_eval[1], load)
    model(b)
    counts_b, load_b = seen()
    assert counts_b.sum(dim=1).tolist() == [2 * 2 * 16 * 2] * 3
    torch.testing.assert_close(load_b, (counts_b - counts) / (2 * 16 * 2))
    assert not torch.equal(load_b, load)


@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, tie_word_embeddings=True, n_shared_experts=0,
                                                first_k_dense_replace=2)])
def test_mla_active_params_and_flops_formula(overrides):
    """num_params(active=True), which flops_per_token and so the logged MFU rest on, against the count written
    out from the config: attention, norms, dense SwiGLUs, and per MoE layer the router, the shared experts and
    n_experts_per_tok routed experts (of n_experts)."""
    kw = dict(n_experts=8, n_experts_per_tok=3, n_shared_experts=2, n_group=2, topk_group=2)
    model = tiny_mla(**{**kw, **overrides})
    c = model.config
    C, H, V, q, r = c.n_embd, c.n_head, c.vocab_size, c.q_lora_rank, c.kv_lora_rank
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    queries = C * q + q + q * H * (dn + dr) if q else C * H * (dn + dr)  # W_DQ, its norm, [W_UQ | W_QR]
    attention = queries + C * (r + dr) + r + r * H * (dn + dv) + H * dv * C  # [W_DKV | W_KR], norm, [W_UK | W_UV], W_O
    expert = 3 * C * c.moe_intermediate_size
    n_dense, n_moe = c.first_k_dense_replace, c.n_layer - c.first_k_dense_replace
    active = (c.n_layer * (attention + 2 * C) + n_dense * 3 * C * c.intermediate_size
              + n_moe * (C * c.n_experts + (c.n_shared_experts + c.n_experts_per_tok) * expert)
              + C + V * C)  # ln_f, lm_head (the token embedding is a lookup; tied, it is the head)
    assert model.num_params(active=True) == active
    assert model.num_params() == active + n_moe * (c.n_experts - c.n_experts_per_tok) * expert
    assert model.num_params(non_embedding=False) == model.num_params() + (0 if c.tie_word_embeddings else V * C)
    T = 64
    assert model.flops_per_token(T) == 6 * active + 3 * c.n_layer * 2 * H * (dn + dr + dv) * T


def _train_load_imbalance(bias_update, steps=60):
    """Train a tiny all-MoE model on random tokens; return mean over layers of max/mean expert load
    measured afterwards on 256 sequences (a training-mode forward, without a step: what metrics() reports)."""
    torch.manual_seed(0)
    cfg = mla.Config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, q_lora_rank=None,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=0,
                     moe_intermediate_size=16, n_experts=8, n_experts_per_tok=2, bias_update_speed=0.005)
    model = mla.Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, 32, (256, 17), generator=g)
    for step in range(steps):
        batch = data[torch.randint(0, 256, (16,), generator=g)]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bias_update:
            model.after_optimizer_step(step + 1, steps)
    model(data[:, :-1])
    load = model.metrics()["expert_load"]
    bias = torch.stack([moe.gate.e_score_correction_bias for moe in model.moe_layers()])
    return (load.max(dim=1).values / load.mean(dim=1)).mean().item(), bias


def test_mla_bias_update_balances_load():
    """Aux-loss-free balancing: same seed, same data; with after_optimizer_step's bias update the final
    max/mean expert load is lower than without. (Over seeds 0-9 this setting gave 1.13-1.24 with the
    update and 1.40-1.77 without.)"""
    off, bias_off = _train_load_imbalance(False)
    on, bias_on = _train_load_imbalance(True)
    assert torch.all(bias_off == 0) and bias_on.abs().max() > 0
    assert on < off - 0.05, f"max/mean expert load {on:.3f} with the bias update, {off:.3f} without"


def _mla_tp_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mla.Model(mla.Config(vocab_size=MLA_VOCAB, n_layer=2, n_head=4, n_embd=32, first_k_dense_replace=1))
    idx, targets = torch.randint(0, MLA_VOCAB, (2, 12)), torch.randint(0, MLA_VOCAB, (2, 12))
    ref_logits, ref_loss = model(idx, targets)  # the whole model on one rank: the reference
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    parallelize_module(model, init_device_mesh("cpu", (world,)), model.tp_plan())
    logits, loss = model(idx, targets)
    loss.backward()
    errors = {"logits": (logits - ref_logits).abs().max().item()}
    for n, p in model.named_parameters():  # full_tensor() is a collective: every rank runs it
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        errors[n] = ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
    sharded = sum(hasattr(p, "device_mesh") for p in model.parameters())
    if rank == 0:
        results.put((errors, sharded))
    dist.barrier()
    dist.destroy_process_group()


def test_mla_tp_plan(tmp_path):
    """Two gloo ranks on the CPU, each holding half the heads and half the SwiGLU units: logits and every
    gradient equal the unsharded model's (the shared rope key k_R needs its gradient summed over ranks)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_mla_tp_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    errors, sharded = results.get()
    assert sharded == 2 * 5 + 3 + 3  # per layer W_UQ, W_QR, W_UK, W_UV, W_O; the dense and the shared SwiGLU
    bad = {n: e for n, e in errors.items() if e > 1e-5}
    assert not bad, f"tensor-parallel run differs from the single-rank model: {bad}"


def test_mla_tp_plan_names_real_modules():
    """The plan names modules this model has (dense and MoE layers hold different ones), each a Linear."""
    for model in (tiny_mla(), tiny_mla(first_k_dense_replace=0, n_shared_experts=0)):
        plan, modules = model.tp_plan(), dict(model.named_modules())
        assert plan and all(isinstance(modules.get(name), torch.nn.Linear) for name in plan)
        dense = model.config.first_k_dense_replace
        assert sum(name.endswith("mlp.down_proj") for name in plan) == dense
        assert sum("shared_experts" in name for name in plan) == 3 * (3 - dense) * (model.config.n_shared_experts > 0)


BAD_MLA_CONFIGS = [
    (dict(n_experts=8, n_experts_per_tok=9), "n_experts_per_tok=9"),
    (dict(n_group=2, topk_group=3), "topk_group=3"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(n_head=0), "n_head=0"),
    (dict(block_size=0), "block_size=0"),
    (dict(q_lora_rank=-1), "q_lora_rank=-1"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7"),
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim=0"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim=0"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size=0"),
    (dict(n_experts=8, n_group=3), "n_group=3"),
    (dict(n_experts=8, n_group=8, n_experts_per_tok=1), "n_group=8"),
    (dict(n_experts=8, n_group=4, topk_group=1, n_experts_per_tok=3), "n_experts_per_tok=3"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace=5"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace=-1"),
    (dict(n_shared_experts=-1), "n_shared_experts=-1"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(rope_theta=0.0), "rope_theta=0.0"),
    (dict(rope_factor=0.5), "rope_factor=0.5"),
    (dict(beta_fast=1.0, beta_slow=32.0), "beta_fast=1.0"),
    (dict(mscale_all_dim=-1.0), "mscale_all_dim=-1.0"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0"),
    (dict(bias_update_speed=-0.1), "bias_update_speed=-0.1"),
]


@pytest.mark.parametrize("bad, key", BAD_MLA_CONFIGS, ids=[k for _, k in BAD_MLA_CONFIGS])
def test_mla_config_rejects_bad_values(bad, key):
    """Each bad value fails when the Config is built, in one line that starts with the key and its value."""
    with pytest.raises(ValueError) as error:
        mla.Config(**bad)
    message = str(error.value)
    assert message.startswith(key + " ") and "\n" not in message, message


def test_mla_config_defaults_rebuild_and_dense_only():
    from dataclasses import asdict
    c = mla.Config()
    assert mla.Config(**asdict(c)) == c
    assert mla.Config(q_lora_rank=0).q_lora_rank is None  # 0 and None: the full query projection
    mla.Config(n_layer=2, first_k_dense_replace=2, n_experts=8, n_group=3)  # no MoE layer: routing keys unused


def test_mla_bad_input(tmp_path):
    model = tiny_mla(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    (tmp_path / "mixtral").mkdir()
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="holds a 'mixtral' model, not deepseek_v3; use --model=moe"):
        mla.Model.from_pretrained(str(tmp_path / "mixtral"))


def test_mla_benchmarks_run(monkeypatch, capsys):
    """bench.py decode --model=mla reports the latent cache's bytes per token; bench.py mla runs its three caches."""
    out = run_bench(monkeypatch, capsys,
                    ["decode", "--model=mla", "--context=4", "--new_tokens=3", "--no_cache_tokens=2", "--repeats=1",
                     "--vocab_size=64", "--n_layer=2"],
                    ["mla", "--contexts=8", "--new_tokens=2", "--repeats=1", "--vocab_size=64", "--n_layer=1",
                     "--n_head=2", "--n_embd=32"])
    assert re.search(r"default\s+[\d,]+\s+640\s", out), out  # 2 layers * (kv_lora_rank 64 + rope 16) * 4 bytes
    assert "absorbed/expanded" in out and "70,272" in out  # DeepSeek-V3's shapes in bf16


# ------------------------------------------------------------------------------------- vlm.py
# Tests of vlm.py. The references are independent of its code: transformers' SiglipVisionModel and LlamaForCausalLM
# holding the same weights (norm gains and biases randomized), the image tokens placed by a loop written here, the
# pixel shuffle as an index loop, cross-entropy written out over the answer bytes, the cache-free full forward for
# cached decoding, the jsonl rows' line numbers, and train.py's own runs for the loss and resume.

VLM_TINY = dict(image_size=16, patch_size=4, vision_n_layer=2, vision_n_head=2, vision_n_embd=32, pixel_shuffle=2,
                n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # 4 x 4 patches -> 4 image tokens
VLM_RUN = ["--model=vlm", "--image_size=16", "--vision_n_layer=1", "--vision_n_embd=32", "--vision_n_head=2",
           "--n_layer=2", "--n_embd=64", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
           "--learning_rate=3e-3", "--warmup_iters=2"]


def tiny_vlm(**overrides):
    torch.manual_seed(0)
    return randomize_constant_params(vlm.Model(vlm.Config(**{**VLM_TINY, **overrides})))


def pixel_shuffle_loop(x, s):
    """out[b, i * (g/s) + j, (di * s + dj) * D + d] = x[b, (i*s + di) * g + j*s + dj, d], one element at a time."""
    B, N, D = x.shape
    g = math.isqrt(N)
    out = torch.empty(B, N // s ** 2, D * s ** 2)
    for b in range(B):
        for i in range(g // s):
            for j in range(g // s):
                for di in range(s):
                    for dj in range(s):
                        for d in range(D):
                            out[b, i * (g // s) + j, (di * s + dj) * D + d] = x[b, (i * s + di) * g + j * s + dj, d]
    return out


@pytest.mark.parametrize("s", [1, 2, 4])
def test_vlm_pixel_shuffle_matches_an_index_loop(s):
    x = torch.randn(2, 64, 3)  # an 8 x 8 grid of 3-wide patches
    assert torch.equal(vlm.pixel_shuffle(x, s), pixel_shuffle_loop(x, s))


def tiny_siglip(use_head=False):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=16, patch_size=4, layer_norm_eps=1e-5, vision_use_head=use_head)
    return randomize_constant_params(SiglipVisionModel(config).float().eval())


@pytest.mark.parametrize("use_head, shards", [(False, None), (True, "20KB")], ids=["plain", "pooling-head-sharded"])
def test_vlm_vision_encoder_matches_siglip(tmp_path, use_head, shards):
    """SiglipVisionModel -> VisionEncoder.from_pretrained: last_hidden_state within 1e-4 (fp32); save_pretrained ->
    transformers again. A pooling head (vision_use_head) is SigLIP's, not ours: it is left out."""
    from transformers import SiglipVisionModel
    hf = tiny_siglip(use_head)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shards} if shards else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shards)
    encoder = vlm.VisionEncoder.from_pretrained(str(tmp_path / "hf")).eval()
    c = encoder.config
    assert (c.image_size, c.patch_size, c.vision_n_embd, c.vision_n_layer, c.vision_n_head, c.vision_norm_eps) == \
        (16, 4, 32, 2, 4, 1e-5)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        torch.testing.assert_close(encoder(images), ref, atol=1e-4, rtol=0)
        encoder.save_pretrained(str(tmp_path / "back"))
        back = SiglipVisionModel.from_pretrained(tmp_path / "back").float().eval()
        torch.testing.assert_close(back(pixel_values=images).last_hidden_state, ref, atol=1e-4, rtol=0)


def tiny_hf_llama_for_vlm(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie, rope_parameters=dict(rope_type="default", rope_theta=1234.0),
                         initializer_range=0.1)
    return randomize_constant_params(LlamaForCausalLM(config).float().eval())


@pytest.mark.parametrize("tie", [False, True])
def test_vlm_matches_siglip_and_llama_with_the_image_in_place(tmp_path, tie):
    """A VLM from a SigLIP directory and a Llama directory (Model.from_parts): on text its logits are Llama's; with an
    image they are Llama's run on inputs_embeds whose <image> positions hold the projected SigLIP output, placed by a
    loop here. save_parts writes both halves back for transformers."""
    from transformers import LlamaForCausalLM, SiglipVisionModel
    siglip, llama_hf = tiny_siglip(), tiny_hf_llama_for_vlm(tie)
    siglip.save_pretrained(tmp_path / "siglip")
    llama_hf.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    model = vlm.Model.from_parts(vision=str(tmp_path / "siglip"), decoder=str(tmp_path / "llama")).eval()
    c = model.config
    assert (c.n_embd, c.n_kv_head, c.block_size, c.rope_theta, c.tie_word_embeddings, c.n_image_tokens) == \
        (64, 2, 96, 1234.0, tie, 4)
    with torch.no_grad():
        model.projector.proj.weight.normal_(0, 0.3)  # random: from_parts starts the projector afresh
        idx = torch.randint(0, 256, (2, 24))
        ref = llama_hf(idx).logits
        torch.testing.assert_close(model(idx)[0], ref, atol=1e-4, rtol=0)
        images = torch.randn(2, 3, 16, 16)
        ids = torch.tensor([[5, 6] + [256] * 4 + [7, 8, 9], [10] + [256] * 4 + [11, 12, 13, 14]])
        patches = siglip(pixel_values=images).last_hidden_state
        image_tokens = pixel_shuffle_loop(patches, 2) @ model.projector.proj.weight.T
        embeds = llama_hf.model.embed_tokens(ids).clone()
        for b in range(2):
            slots = [t for t in range(ids.shape[1]) if ids[b, t] == 256]
            for k, t in enumerate(slots):
                embeds[b, t] = image_tokens[b, k]
        torch.testing.assert_close(model((images, ids))[0], llama_hf(inputs_embeds=embeds).logits, atol=1e-4, rtol=0)
        model.save_parts(str(tmp_path / "v"), str(tmp_path / "d"))
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(tmp_path / "d").float()(idx).logits, ref,
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(SiglipVisionModel.from_pretrained(tmp_path / "v").float()(pixel_values=images)
                                   .last_hidden_state, siglip(pixel_values=images).last_hidden_state, atol=1e-4, rtol=0)
        # Model.from_pretrained of a Llama directory: the same decoder, a random vision encoder
        torch.testing.assert_close(vlm.Model.from_pretrained(str(tmp_path / "d"))(idx)[0], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_vlm_save_pretrained_round_trip(tmp_path, tie):
    """gaia's own layout for the whole model: the same logits back, also from shards listed in an index; a directory
    without weights says so."""
    from safetensors.torch import load_file, save_file
    model = tiny_vlm(tie_word_embeddings=tie).eval()
    model.save_pretrained(str(tmp_path / "a"))
    images, ids = torch.randn(2, 3, 16, 16), torch.tensor([[256] * 4 + [1, 2, 3]] * 2)
    with torch.no_grad():
        ref, _ = model((images, ids))
        loaded = vlm.Model.from_pretrained(str(tmp_path / "a"))
        torch.testing.assert_close(loaded((images, ids))[0], ref, atol=0, rtol=0)
        tensors = load_file(tmp_path / "a" / "model.safetensors")  # re-saved as two shards and an index
        os.remove(tmp_path / "a" / "model.safetensors")
        names = sorted(tensors)
        weight_map = {k: f"model-0000{1 + (k in names[::2])}-of-00002.safetensors" for k in names}
        for shard in set(weight_map.values()):
            save_file({k: tensors[k] for k in names if weight_map[k] == shard}, tmp_path / "a" / shard)
        (tmp_path / "a" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        sharded = vlm.Model.from_pretrained(str(tmp_path / "a"))
        torch.testing.assert_close(sharded((images, ids))[0], ref, atol=0, rtol=0)
        assert (sharded.lm_head.weight is sharded.transformer.wte.weight) == tie
    os.remove(tmp_path / "a" / "model.safetensors.index.json")
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        vlm.Model.from_pretrained(str(tmp_path / "a"))


def vlm_split(rows, config):
    """A Split of (question, answer) rows with random images."""
    size = config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (len(rows), size, size, 3), dtype=np.uint8)
    examples = [dict(question=q, answer=a, kind="qa", unseen=False) for q, a in rows]
    return vlm.Split(examples, config, pixels)


def test_vlm_loss_counts_the_answer_and_eos_only():
    """Batches' targets are -1 except at the positions that predict an answer byte or the <eos> after it (worked out
    here from the raw strings), and the model's loss is the mean over the examples of each example's mean
    cross-entropy over those positions alone (every example weighs the same, whatever its answer's length)."""
    model = tiny_vlm()
    rows = [("what colour is it?", "red"), ("how many?", "3"), ("describe the image.", "blue circle, red cross")]
    split = vlm_split(rows, model.config)
    (images, ids), targets = vlm.Batches(split, model.config, 6, seed=0).next()
    logits, loss = model((images, ids), targets)
    by_image = {tuple(split.image(i).flatten()[:8].tolist()): i for i in range(len(rows))}
    picked, example_means = set(), []
    for b in range(len(ids)):
        question, answer = rows[by_image[tuple(images[b].flatten()[:8].tolist())]]
        picked.add(question)
        prompt = [256] * 4 + list(question.encode()) + [ord("\n")]  # <image> x 4 image tokens, then the question
        answer_ids = list(answer.encode()) + [257]  # then the answer and <eos>
        expected = torch.full((ids.shape[1],), -1)
        for k, token in enumerate(answer_ids):
            expected[len(prompt) - 1 + k] = token  # position t predicts the token at t + 1
        assert torch.equal(ids[b, :len(prompt) + len(answer_ids) - 1], torch.tensor(prompt + answer_ids[:-1]))
        assert torch.equal(targets[b], expected), (question, targets[b], expected)
        total, count = 0.0, 0
        for t in range(ids.shape[1]):
            if expected[t] >= 0:
                total -= torch.log_softmax(logits[b, t].double(), -1)[expected[t]]
                count += 1
        example_means.append(total / count)
    assert len(picked) > 1
    assert len({len(a) for q, a in rows if q in picked}) > 1  # answers of several lengths: a token mean would differ
    torch.testing.assert_close(loss.double(), sum(example_means) / len(example_means), atol=1e-6, rtol=0)


def test_vlm_cached_generation_equals_the_full_forward():
    """Greedy decoding with the image in the KV cache's prefix picks the tokens, and sees the logits, of a full forward
    over (image, prompt + answer); answer() batched by prompt length equals each question alone."""
    model = tiny_vlm().eval()
    tok = model.tokenizer
    images = torch.randn(2, 3, 16, 16)
    prompt = torch.tensor([tok.encode(vlm.prompt_text("what colour is the cross?"))] * 2)
    P = prompt.shape[1]
    out, step_logits = model.generate((images, prompt), 30, temperature=0, return_logits=True)
    with torch.no_grad():
        full, _ = model((images, out[:, :-1]))
    reference = full[:, P - 1:]
    torch.testing.assert_close(step_logits, reference, atol=1e-5, rtol=0)
    drawable = reference.clone()
    drawable[..., tok.image_id] = float("-inf")  # generate never draws <image>
    assert torch.equal(out[:, P:], drawable.argmax(-1))
    assert not torch.equal(out[0, P:], out[1, P:])  # two images, two answers: the image reaches the decoder
    check_cached_decode(model, 256)  # text alone decodes as llama.py does
    questions = ["how many circles?", "what colour is the square?", "how many crosses?", "describe the image."]
    many = torch.randn(4, 3, 16, 16)
    together = vlm.answer(model, many, questions, max_new_tokens=12)
    assert together == [vlm.answer(model, many[i:i + 1], [q], max_new_tokens=12)[0] for i, q in enumerate(questions)]
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.generate((images, prompt), model.config.block_size, temperature=0)


@pytest.fixture(scope="module")
def vlm_builtin():
    return vlm.load_splits("", vlm.Config(), None)


def test_vlm_builtin_data_is_fixed_and_holds_pairs_out(vlm_builtin):
    """The built-in splits are the same at every load (seeds of their own, not train.py's); no training image or text
    holds a HELD_OUT colour-shape pair; half the held-out questions are about them; each kind takes its turn."""
    train_split, val_split = vlm_builtin
    some = [*range(3000), *range(len(train_split) - 1000, len(train_split))]  # the start and the end of a million
    first_train, first_val = [train_split.examples[i] for i in some], list(val_split.examples)
    vlm.builtin_example.cache_clear()  # made again, not read back from builtin_example's cache
    torch.manual_seed(123)
    np.random.seed(123)
    again = vlm.load_splits("", vlm.Config(), None)
    assert [again[0].examples[i] for i in some] == first_train
    assert list(again[1].examples) == first_val
    assert torch.equal(again[1].image(7), val_split.image(7))
    held_out_text = [f"{colour} {shape}" for colour, shape in vlm.HELD_OUT]
    for e in (train_split.examples[i] for i in some):
        assert not any((colour, shape) in vlm.HELD_OUT for shape, colour, *_ in e["scene"]), e
        assert not any(t in e["question"] or t in e["answer"] for t in held_out_text), e
        assert not e["unseen"]
    evaluated = [val_split.examples[i] for i in vlm.eval_indices(val_split)]
    assert sum(e["unseen"] for e in evaluated) == len(evaluated) // 2
    for e in evaluated:  # an unseen question names or shows a held-out pair
        pairs = {(colour, shape) for shape, colour, *_ in e["scene"]}
        assert not e["unseen"] or pairs & vlm.HELD_OUT or any(t in e["question"] for t in held_out_text)
    assert [e["kind"] for e in evaluated[:10]] == list(vlm.KINDS) * 2
    for e in evaluated:  # the answer to a colour question is a colour the image shows
        if e["kind"] == "colour":
            pixels = (val_split.image(evaluated.index(e)).permute(1, 2, 0) + 1) * 127.5
            target = torch.tensor(vlm.COLOURS[e["answer"]], dtype=torch.float)
            assert ((pixels - target).abs().max(-1).values < 1).any(), e


def test_vlm_batches_slice_the_global_batch_and_seek(vlm_builtin):
    train_split = vlm_builtin[0]
    config = vlm.Config()
    (images, ids), targets = vlm.Batches(train_split, config, 8, seed=3).next()
    for rank in range(2):
        (im, x), y = vlm.Batches(train_split, config, 4, seed=3, rank=rank, world=2).next()
        assert torch.equal(im, images[4 * rank:4 * rank + 4]) and torch.equal(x, ids[4 * rank:4 * rank + 4])
        assert torch.equal(y, targets[4 * rank:4 * rank + 4])
    batches = vlm.Batches(train_split, config, 8, seed=3)
    first = batches.next()
    batches.next()
    batches.seek(batches.position)
    again = batches.next()
    batches.seek(vlm.Batches(train_split, config, 8, seed=3).position)
    assert torch.equal(batches.next()[1], first[1]) and not torch.equal(again[1], first[1])


def write_jsonl(tmp_path, bad=None):
    """Four good rows (and a bad one as line 3); returns the file's path."""
    from PIL import Image
    for i, colour in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [json.dumps({"image": f"{i}.png", "question": "what colour is it?", "answer": colour})
            for i, colour in enumerate(("red", "green", "blue", "white"))]
    if bad is not None:
        rows.insert(2, bad)
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("bad, message", [
    ('{"image": "0.png", "question": "what?"', "is not JSON"),
    ('{"image": "0.png", "question": "what?"}', 'lacks "answer"'),
    ('{"image": "nowhere.png", "question": "what?", "answer": "red"}', "image 'nowhere.png' does not exist"),
    ('{"image": "broken.png", "question": "what?", "answer": "red"}', "image 'broken.png' cannot be read"),
], ids=["not-json", "missing-key", "missing-image", "unreadable-image"])
def test_vlm_a_bad_row_is_one_line_naming_it(tmp_path, capsys, bad, message):
    path = write_jsonl(tmp_path, bad)
    with pytest.raises(ValueError, match=f"qa.jsonl line 3.*{message}"):
        vlm.load_splits(path, vlm.Config(), None)
    code, out = run_main(capsys, *VLM_RUN, f"--data={path}", f"--out_dir={tmp_path / 'out'}")
    assert code == 1 and out.count("\n") == 1 and out.startswith("error: ") and "line 3" in out, out


def test_vlm_trains_on_a_jsonl_file_and_answers_an_image_file(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm, "EVAL_EXAMPLES", 4)
    path = write_jsonl(tmp_path)
    rows = run_train(*VLM_RUN, f"--data={path}", "--max_iters=2", "--eval_interval=2",
                         out_dir=str(tmp_path / "out"), base=[])
    assert "answer_acc_qa" in rows[-1] and 0 <= rows[-1]["answer_acc"] <= 1
    from PIL import Image
    assert Image.open(tmp_path / "out" / "picture.png").size == (184, 228)  # the one held-out row: a 1 x 1 grid
    # the trained checkpoint answers a question about an image file (what sample.py --image=PATH prints)
    ckpt = train.load_checkpoint(str(tmp_path / "out"))
    model = train.model_from_checkpoint(ckpt, vlm, str(tmp_path / "out")).eval()
    assert isinstance(vlm.answer_image(model, str(tmp_path / "0.png"), "what colour is it?", max_new_tokens=4), str)


def test_vlm_short_run_lowers_the_loss_and_resumes_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm, "EVAL_EXAMPLES", 10)
    common = [*VLM_RUN, "--lr_decay_iters=20", "--eval_interval=10", "--dropout=0.1"]
    whole = run_train(*common, "--max_iters=20", out_dir=str(tmp_path / "a"), base=[])
    evals = [r for r in whole if "val_loss" in r]
    assert abs(evals[0]["val_loss"] - math.log(258)) < 0.15, evals[0]  # near uniform over the 258 ids at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0, evals
    assert {"answer_acc", "answer_acc_caption", "answer_acc_unseen"} <= set(evals[-1])
    run_train(*common, "--max_iters=10", out_dir=str(tmp_path / "b"), base=[])
    resumed = run_train("--init_from=resume", "--max_iters=20", out_dir=str(tmp_path / "b"), base=[])
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(losses(whole)) == 20 and losses(resumed) == losses(whole)
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in evals]


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=30), "image_size=30 is not a multiple of patch_size=4"),
    (dict(pixel_shuffle=3), "does not split into squares of pixel_shuffle=3"),
    (dict(vision_n_embd=30), "vision_n_embd=30 is not divisible by vision_n_head=4"),
    (dict(n_kv_head=3), "n_kv_head=3 does not divide n_head=4"),
    (dict(n_embd=100), "n_embd=100 is not a multiple of 2 \\* n_head=8"),
    (dict(tokenizer="bpe"), "tokenizer='bpe' is not one of byte, gpt2"),
    (dict(vocab_size=200), "vocab_size=200 is smaller than the byte tokenizer's 258"),
    (dict(block_size=16), "block_size=16 leaves no room for text after the 16 image tokens"),
    (dict(dropout=1.0), "dropout=1.0 must be in"),
    (dict(vision_n_layer=0), "vision_n_layer=0 must be >= 1"),
])
def test_vlm_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        vlm.Config(**overrides)


def test_vlm_config_derives_the_vocabulary_from_the_tokenizer():
    assert vlm.Config().vocab_size == 258 and vlm.Config(tokenizer="gpt2").vocab_size == 50259
    config = vlm.Config(image_size=64, patch_size=8, pixel_shuffle=4)
    assert (config.n_patches, config.n_image_tokens) == (64, 4)
    assert vlm.Config(**dataclasses.asdict(config)) == config


# ------------------------------------------------------------------------------------- jepa.py
# Tests of jepa.py (I-JEPA). References independent of gaia's code: transformers' IJepaModel holding the same
# weights, the masks' definition counted patch by patch, the EMA and loss formulas written out, a probe on
# features separable by construction, torch's FLOP counter, and image folders written here with Pillow.


def tiny_jepa(**overrides):
    """A small random jepa.Model: 16 x 16 images in 2 x 2 patches (an 8 x 8 grid), 2 layers of 32, a 1-layer
    predictor of 16."""
    torch.manual_seed(0)
    config = dict(img_size=16, patch_size=2, n_embd=32, n_layer=2, n_head=4, pred_n_embd=16, pred_n_layer=1,
                  pred_n_head=2)
    return jepa.Model(jepa.Config(**{**config, **overrides}))


def hf_ijepa(qkv_bias=True):
    from transformers import IJepaConfig, IJepaModel
    torch.manual_seed(0)
    config = IJepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                         image_size=16, patch_size=4, layer_norm_eps=1e-6, qkv_bias=qkv_bias,
                         initializer_range=0.1)  # > HF's 0.02: peaked attention, so a wrong q/k/v order shows
    return randomize_constant_params(IJepaModel(config, add_pooling_layer=False).float().eval())


@pytest.mark.parametrize("qkv_bias, max_shard_size", [(True, None), (True, "20KB"), (False, "20KB")],
                         ids=["one-file", "sharded", "no-qkv-bias"])
def test_jepa_encode_matches_transformers_both_ways(tmp_path, qkv_bias, max_shard_size):
    """transformers' IJepaModel -> gaia (both encoders) -> the same last_hidden_state (incl. the final norm);
    gaia's save_pretrained (the target encoder) -> IJepaModel.from_pretrained -> the same again."""
    from transformers import IJepaModel
    hf = hf_ijepa(qkv_bias)
    if max_shard_size:
        hf.save_pretrained(tmp_path / "hf", max_shard_size=max_shard_size)
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
        assert not (tmp_path / "hf" / "model.safetensors").exists()
    else:
        hf.save_pretrained(tmp_path / "hf")
    model = jepa.Model.from_pretrained(str(tmp_path / "hf")).eval()
    assert (model.config.n_embd, model.config.mlp_ratio, model.config.grid) == (32, 2.5, 4)
    assert model.config.min_keep == 0  # lowered from 4: on a 4 x 4 grid the smallest target block is one patch
    jepa.sample_masks(model.config, 2, torch.Generator())  # so training can draw its masks
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model.encode(images), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encoder(images), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(images)[0], ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # what save_pretrained writes is the target encoder: make it differ from the encoder
        for p in model.encoder.parameters():
            p.add_(0.1)
    model.save_pretrained(str(tmp_path / "gaia"))
    saved = json.loads((tmp_path / "gaia" / "config.json").read_text())
    assert saved["model_type"] == "ijepa" and saved["architectures"] == ["IJepaModel"]
    back = IJepaModel.from_pretrained(tmp_path / "gaia").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=images).last_hidden_state, ref, atol=1e-4, rtol=0)


def test_jepa_rejects_unsupported_checkpoints(tmp_path):
    from transformers import IJepaConfig, IJepaModel
    base = dict(model_type="ijepa", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                image_size=16, patch_size=4)
    for extra, message in [(dict(hidden_act="gelu_new"), "hidden_act='gelu_new' is not the exact GELU"),
                           (dict(image_size=18), "image_size=18 is not a multiple of patch_size=4"),
                           (dict(image_size=[16, 32]), r"image_size=\[16, 32\] is not square"),
                           (dict(model_type="llama"), "holds a 'llama' model, not ijepa; use --model=llama")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(ValueError, match=message):
            jepa.Model.from_pretrained(str(tmp_path))
    IJepaModel(IJepaConfig(**{k: v for k, v in base.items() if k != "model_type"}),
               add_pooling_layer=True).save_pretrained(tmp_path / "pooled")
    with pytest.raises(ValueError, match="has a pooler"):
        jepa.Model.from_pretrained(str(tmp_path / "pooled"))


# ------------------------------------------------------------------ the masks, counted patch by patch

def rectangle(indices, grid):
    """(top, left, h, w) of the patch indices if they fill exactly that rectangle of the grid, else None."""
    rows, cols = sorted({i // grid for i in indices}), sorted({i % grid for i in indices})
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    full = {r * grid + c for r in range(rows[0], rows[0] + h) for c in range(cols[0], cols[0] + w)}
    return (rows[0], cols[0], h, w) if set(indices) == full and len(indices) == len(full) else None


JEPA_MASK_CONFIGS = [dict(), dict(img_size=48, patch_size=4, n_targets=3, target_scale=(0.1, 0.3),
                                  target_aspect=(0.5, 2.0), context_scale=(0.5, 0.7), min_keep=6)]


@pytest.mark.parametrize("overrides", JEPA_MASK_CONFIGS, ids=["default", "12x12"])
def test_jepa_masks_obey_their_definition(overrides):
    """Over 40 seeded batches of 16: each target block is a full h x w rectangle, one size per batch, with
    h * w / N in target_scale and h / w in target_aspect up to the rounding of each side to the nearest integer
    (so area and ratio are checked with h, w each +-0.5, and the scale's int() floor as 1 patch); the context lies
    in one square no larger than context_scale allows, outside every target block of its image (the reference
    gives up the last targets' constraint after 20 failed draws: allowed in under 2% of images), more than
    min_keep patches everywhere, and every patch of the grid can be a target and in the context."""
    c = jepa.Config(**overrides)
    grid, N = c.grid, c.n_patches
    generator = torch.Generator().manual_seed(0)
    overlaps = images = 0
    seen_target, seen_context = set(), set()
    for _ in range(40):
        context, targets = jepa.sample_masks(c, 16, generator)
        assert context.dtype == targets.dtype == torch.int64
        assert context.shape[0] == 16 and targets.shape[:2] == (c.n_targets, 16)
        assert context.shape[1] > c.min_keep and targets.shape[2] > c.min_keep
        sizes = set()
        for b in range(16):
            blocks = [targets[j, b].tolist() for j in range(c.n_targets)]
            for block in blocks:
                rect = rectangle(block, grid)
                assert rect is not None, block
                top, left, h, w = rect
                assert 0 <= top and top + h <= grid and 0 <= left and left + w <= grid
                sizes.add((h, w))
                lo, hi = c.target_scale
                assert (h - 0.5) * (w - 0.5) <= hi * N and (h + 0.5) * (w + 0.5) >= lo * N - 1, (h, w)
                assert (h - 0.5) / (w + 0.5) <= c.target_aspect[1] and (h + 0.5) / (w - 0.5) >= c.target_aspect[0]
                seen_target.update(block)
            ctx = context[b].tolist()
            assert ctx == sorted(set(ctx))
            rows, cols = [i // grid for i in ctx], [i % grid for i in ctx]
            side = math.sqrt(c.context_scale[1] * N) + 0.5
            assert max(rows) - min(rows) + 1 <= side and max(cols) - min(cols) + 1 <= side
            seen_context.update(ctx)
            images += 1
            overlaps += any(set(ctx) & set(block) for block in blocks)
        assert len(sizes) == 1, sizes  # one target size per batch
    assert overlaps <= 0.02 * images, (overlaps, images)
    assert seen_target == set(range(N)), sorted(set(range(N)) - seen_target)
    if c.context_scale[1] < 0.9:  # a context smaller than the grid can sit anywhere too
        assert seen_context == set(range(N)), sorted(set(range(N)) - seen_context)


def test_jepa_blocks_fill_every_place_and_the_tolerance_gives_up_the_last_target_first():
    """sample_block: an h x w rectangle at a uniformly drawn top-left corner, every corner of the grid reached
    (the last row and column included, where the reference's randint(0, grid - h) never goes). Context blocks
    that cannot keep more than min_keep patches outside the targets give up the LAST target's region after 20
    failed draws (the reference's tolerance): with the left half and then the right half of a 4 x 4 grid to
    avoid, a whole-grid block ends up as the right half."""
    generator = torch.Generator().manual_seed(0)
    for h, w in [(3, 2), (1, 4), (5, 5)]:
        corners = set()
        for _ in range(400):
            mask = jepa.sample_block(h, w, 6, 0, generator)
            rect = rectangle(mask.flatten().nonzero().squeeze(1).tolist(), 6)
            assert rect is not None and rect[2:] == (h, w), (rect, h, w)
            corners.add(rect[:2])
        assert corners == {(t, l) for t in range(6 - h + 1) for l in range(6 - w + 1)}
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    mask = jepa.sample_block(4, 4, 4, 4, generator, avoid=[left, ~left])
    assert torch.equal(mask, ~left)


def test_jepa_positions_are_the_references_2d_sincos():
    """The reference's get_2d_sincos_pos_embed, written out as there (numpy, meshgrid with w first)."""
    def reference(dim, grid_size):
        def one_d(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)
        grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=float), np.arange(grid_size, dtype=float)), axis=0)
        grid = grid.reshape([2, 1, grid_size, grid_size])
        return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    for dim, grid in [(32, 8), (16, 3)]:
        torch.testing.assert_close(jepa.sincos_pos_embed(dim, grid), torch.from_numpy(reference(dim, grid)).float())
    model = tiny_jepa()
    torch.testing.assert_close(model.encoder.pos_embed[0], torch.from_numpy(reference(32, 8)).float())
    torch.testing.assert_close(model.predictor.pos_embed[0], torch.from_numpy(reference(16, 8)).float())


def test_jepa_batches_replay_and_ranks_split_the_global_batch():
    """seek(position) redraws a batch exactly; the masks use only the given generator (not the global one);
    rank r of 2 with batch 8 holds rows 8r..8r+7 of what one process with batch 16 draws, masks included."""
    c = jepa.Config(img_size=16, patch_size=2)
    images, labels = jepa.render_shapes(40, 16, 0)
    split = jepa.ImageSplit(torch.from_numpy(images), torch.from_numpy(labels), list(jepa.SHAPES))
    one = jepa.Batches(split, c, 16, seed=7)
    ranks = [jepa.Batches(split, c, 8, seed=7, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, (ctx, tgt) = one.next()
        assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        parts = [b.next() for b in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([p[1][0] for p in parts]), ctx)
        assert torch.equal(torch.cat([p[1][1] for p in parts], dim=1), tgt)
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the global generator must not matter
    x, (ctx, tgt) = one.next()
    torch.set_rng_state(state)
    position = one.position  # the state that drew x
    one.next()
    one.seek(position)
    x2, (ctx2, tgt2) = one.next()
    assert torch.equal(x, x2) and torch.equal(ctx, ctx2) and torch.equal(tgt, tgt2)


# ------------------------------------------------------------------ the training step, by hand

def test_jepa_ema_is_its_formula_and_the_target_gets_no_gradient():
    model = tiny_jepa(ema_start=0.9, ema_end=0.99)
    context, targets = jepa.sample_masks(model.config, 4, torch.Generator().manual_seed(0))
    _, loss = model(torch.randn(4, 3, 16, 16), (context, targets))
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    with torch.no_grad():  # the encoder moves away from the target (as after an optimizer step)
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in model.encoder.parameters()]
    before = [p.detach().clone() for p in model.target_encoder.parameters()]
    model.after_optimizer_step(3, 10)
    m = 0.9 + (0.99 - 0.9) * 3 / 10
    for p, t, o in zip(model.target_encoder.parameters(), before, online):
        torch.testing.assert_close(p, m * t + (1 - m) * o, rtol=0, atol=1e-6)
    assert all(torch.equal(p, o) for p, o in zip(model.encoder.parameters(), online))


def test_jepa_loss_and_target_std_by_hand():
    """loss = mean smooth L1 (beta 1) between the predictions and the target encoder's features, layer-normed
    (no affine, eps 1e-5) and gathered at each target block of each image by a loop; target_std from the same."""
    model = tiny_jepa()
    with torch.no_grad():  # the target encoder differs from the encoder, as during training
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(3, 3, 16, 16)
    context, targets = jepa.sample_masks(model.config, 3, torch.Generator().manual_seed(1))
    pred, loss = model(images, (context, targets))
    with torch.no_grad():
        h = model.encode(images)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + 1e-5)
    total, count = 0.0, 0
    for j in range(targets.shape[0]):
        for b in range(3):
            for k, patch in enumerate(targets[j, b].tolist()):
                d = (pred[j, b, k] - h[b, patch]).abs()
                total += torch.where(d < 1, 0.5 * d ** 2, d - 0.5).sum()
                count += d.numel()
    torch.testing.assert_close(loss, total / count)
    pooled = h.mean(1)
    expected = ((pooled - pooled.mean(0)) ** 2).mean(0).sqrt().mean()
    assert model.metrics()["target_std"] == pytest.approx(float(expected), rel=1e-5)
    model.eval()(torch.randn(3, 3, 16, 16), (context, targets))  # an eval loss does not move the training watch
    assert model.metrics()["target_std"] == pytest.approx(float(expected), rel=1e-5)


def test_jepa_predictor_predicts_each_block_from_its_image_alone():
    """The batched predictor (the context repeated once per target block) gives, for block j of image b, what
    a batch of that image and that block alone gives; the encoder keeps only the asked patches, each with its
    own position (reversed indices give the reversed full output)."""
    model = tiny_jepa()
    images = torch.randn(3, 3, 16, 16)
    context, targets = jepa.sample_masks(model.config, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ctx = model.encoder(images, context)
        pred = model.predictor(ctx, context, targets)
        for j in range(targets.shape[0]):
            for b in range(3):
                alone = model.predictor(ctx[b:b + 1], context[b:b + 1], targets[j:j + 1, b:b + 1])
                torch.testing.assert_close(pred[j, b], alone[0, 0], atol=1e-5, rtol=0)
        everything = model.encoder(images)
        reverse = torch.arange(model.config.n_patches - 1, -1, -1).expand(3, -1)
        torch.testing.assert_close(model.encoder(images, reverse), everything.flip(1), atol=1e-5, rtol=0)


def test_jepa_flops_per_sample_counts_the_matmuls(monkeypatch):
    """flops_per_sample(n_context, n_target) * B equals torch's FLOP counter over one training forward and
    backward, with attention written as matmuls so that the counter sees it."""
    from torch.utils.flop_counter import FlopCounterMode

    def attention(q, k, v):
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    model = tiny_jepa(mlp_ratio=3.0)
    context, targets = jepa.sample_masks(model.config, 4, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 3, 16, 16), (context, targets))[1].backward()
    expected = model.flops_per_sample(context.shape[1], targets.shape[2]) * 4
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert 0 < model.flops_per_sample() < 6 * 3 * model.num_params() * model.config.n_patches


# ------------------------------------------------------------------ the linear probe

def test_jepa_linear_probe_separates_separable_features():
    """Features whose class shifts one coordinate by 4 noise widths are separated; shuffled labels are not."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (900,), generator=g)
    x = torch.randn(900, 24, generator=g) + 4 * F.one_hot(y, 24).float()
    assert jepa.linear_probe(x[:600], y[:600], x[600:], y[600:]) >= 0.95
    shuffled = y[:600][torch.randperm(600, generator=g)]
    assert jepa.linear_probe(x[:600], shuffled, x[600:], y[600:]) <= 0.35


def test_jepa_evaluate_probes_this_model_and_a_random_one():
    model = tiny_jepa()
    (train_images, train_labels), (val_images, val_labels) = jepa.render_shapes(120, 16, 0), jepa.render_shapes(60, 16, 1)
    train = jepa.ImageSplit(torch.from_numpy(train_images), torch.from_numpy(train_labels), list(jepa.SHAPES))
    val = jepa.ImageSplit(torch.from_numpy(val_images), torch.from_numpy(val_labels), list(jepa.SHAPES))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = jepa.evaluate(model, train, val)
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run draws the same numbers
    assert set(first) == {"probe_acc", "probe_acc_random"} and all(0 <= v <= 1 for v in first.values())
    assert jepa.evaluate(model, train, val) == first  # deterministic
    assert jepa.evaluate(model, jepa.ImageSplit(train.images, None, []), jepa.ImageSplit(val.images, None, [])) == {}


def test_jepa_draw_writes_a_png(tmp_path):
    model = tiny_jepa()
    images, labels = jepa.render_shapes(8, 16, 0)
    jepa.draw(model, jepa.ImageSplit(torch.from_numpy(images), torch.from_numpy(labels), list(jepa.SHAPES)),
              str(tmp_path / "masks.png"))
    assert (tmp_path / "masks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ data: the built-in shapes and image folders

def test_jepa_builtin_data_is_deterministic_and_labelled():
    c = jepa.Config()
    train, val = jepa.load_splits("", c, None)
    again, _ = jepa.load_splits("", c, None)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (c.img_size, c.img_size, 3)
    assert len(train) >= 5 * len(val) > 0 and val.images.shape[1:] == train.images.shape[1:]
    assert len(train.classes) >= 6 and train.classes == val.classes
    for split in (train, val):  # every class present, none dominant
        counts = torch.bincount(split.labels, minlength=len(split.classes))
        assert counts.min() > 0.5 * len(split) / len(split.classes)
    assert not torch.equal(train.images[:len(val)], val.images)  # val is drawn apart from train
    assert train.images.float().std() > 40  # not blank


def write_png(path, size=(40, 30), colour=(200, 10, 10)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (0, 0, 255))  # blue edges around a centred square of colour
    w, h = size
    image.paste(colour, (w // 2 - 5, h // 2 - 5, w // 2 + 5, h // 2 + 5))
    image.save(path)


def test_jepa_image_folders(tmp_path):
    """Class subfolders give labels by sorted folder name and a per-class val share; a flat folder gives none.
    Images are resized by the shorter side and centre-cropped: the centred square stays in the middle."""
    c = jepa.Config(img_size=16, patch_size=2)
    for i in range(6):
        write_png(tmp_path / "classes" / "b_dogs" / f"{i}.png", colour=(200, 10, 10))
        write_png(tmp_path / "classes" / "a_cats" / f"{i}.jpg", size=(30, 50), colour=(10, 200, 10))
    write_png(tmp_path / "classes" / "a_cats" / "extra.PNG", colour=(10, 200, 10))
    (tmp_path / "classes" / "notes.txt").write_text("not an image")
    train, val = jepa.load_splits(str(tmp_path / "classes"), c, str(tmp_path / "cache"))
    assert train.classes == val.classes == ["a_cats", "b_dogs"]
    assert len(train) + len(val) == 13 and sorted(torch.bincount(val.labels).tolist()) == [1, 1]
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == torch.uint8
    for split in (train, val):
        for image, label in zip(split.images, split.labels):
            centre, corner = image[8, 8].tolist(), image[0, 0].tolist()
            assert (centre[1] > 150) == (label == 0) and (centre[0] > 150) == (label == 1) and corner[2] > 200
    cached, _ = jepa.load_splits(str(tmp_path / "classes"), c, str(tmp_path / "cache"))
    assert torch.equal(cached.images, train.images) and len(os.listdir(tmp_path / "cache")) == 1
    for i in range(10):
        write_png(tmp_path / "flat" / f"{i}.png")
    train, val = jepa.load_splits(str(tmp_path / "flat"), c, None)
    assert train.labels is None and val.labels is None and len(train) + len(val) == 10 and len(val) >= 1


def test_jepa_bad_folders_give_one_clear_line(tmp_path):
    c = jepa.Config()
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    write_png(tmp_path / "corrupt" / "good.png")
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG not really")
    write_png(tmp_path / "one" / "only" / "a.png")
    write_png(tmp_path / "mixed" / "loose.png")
    write_png(tmp_path / "mixed" / "cls" / "a.png")
    for path, words in [("missing", "does not exist"), ("file.png", "is a file"), ("empty", "no PNG/JPEG images"),
                        ("text", "no PNG/JPEG images"), ("corrupt", "cannot read image .*bad.png"),
                        ("one", "one class subfolder .*a probe needs two or more.*flat folder"),
                        ("mixed", "both images .* and class subfolders")]:
        with pytest.raises(ValueError, match=words) as error:
            jepa.load_splits(str(tmp_path / path), c, None)
        assert "\n" not in str(error.value)


def test_jepa_trains_on_an_image_folder_without_collapse_and_exports(tmp_path, capsys):
    """train.py on a folder of two classes: the loss falls, the target features keep their spread (no collapse),
    and export.py writes the target encoder as a directory transformers' IJepaModel loads with the same features."""
    from transformers import IJepaModel
    for i in range(24):
        write_png(tmp_path / "images" / "red" / f"{i}.png", size=(20 + i, 24), colour=(200, 10 + i, 10))
        write_png(tmp_path / "images" / "green" / f"{i}.png", size=(24, 20 + i), colour=(10, 200, 10 + i))
    rows = run_train("--model=jepa", *JEPA_TINY_RUN, f"--data={tmp_path / 'images'}", "--max_iters=20",
                     "--eval_interval=10", out_dir=str(tmp_path / "run"), base=[])
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"], steps
    assert min(r["target_std"] for r in steps) > 0.5 * steps[0]["target_std"], steps  # collapse drives it to 0
    assert {"probe_acc", "probe_acc_random"} <= set(rows[-1])
    code, out = run_main(capsys, f"--out_dir={tmp_path / 'run'}", f"--hf_dir={tmp_path / 'hf'}", main=export_main)
    assert code == 0, out
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    model = train.model_from_checkpoint({**ckpt, "path": "ckpt.pt"}, jepa, str(tmp_path / "run")).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = IJepaModel.from_pretrained(tmp_path / "hf").eval()(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model.encode(images), reference, atol=1e-4, rtol=0)


def test_jepa_bad_folder_through_train_py_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out = run_main(capsys, "--model=jepa", f"--data={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'run'}")
    assert code == 1 and len(out.strip().splitlines()) == 1 and out.startswith("error: ") and "no PNG/JPEG" in out, out


# ------------------------------------------------------------------ the config

@pytest.mark.parametrize("overrides, key", [
    (dict(img_size=30), "img_size"), (dict(img_size=0), "img_size"), (dict(patch_size=32), "patch_size"),
    (dict(n_embd=102), "n_embd"), (dict(n_embd=198, n_head=6), "n_embd"), (dict(n_head=0), "n_head"),
    (dict(pred_n_embd=90), "pred_n_embd"), (dict(n_layer=0), "n_layer"), (dict(n_targets=0), "n_targets"),
    (dict(mlp_ratio=0.0), "mlp_ratio"), (dict(norm_eps=0.0), "norm_eps"), (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(ema_start=1.1, ema_end=1.2), "ema_start"), (dict(ema_start=0.99, ema_end=0.9), "ema_start"),
    (dict(target_scale=(0.3, 0.2)), "target_scale"), (dict(target_scale=(0.0, 0.2)), "target_scale"),
    (dict(target_scale=(0.1, 0.2, 0.3)), "target_scale"), (dict(context_scale=(0.5, 1.5)), "context_scale"),
    (dict(target_aspect=(2.0, 1.0)), "target_aspect"), (dict(min_keep=-1), "min_keep"),
    (dict(min_keep=9), "target_scale"),  # a 3 x 3 target block cannot keep more than 9 patches
], ids=lambda v: v if isinstance(v, str) else None)
def test_jepa_config_rejects_bad_values(overrides, key):
    """Each bad value fails when the Config is built, in one line that starts with the key and its value."""
    with pytest.raises(ValueError) as error:
        jepa.Config(**overrides)
    message = str(error.value)
    assert message.startswith(key + "=") and "\n" not in message, message


def test_jepa_config_rebuilds_from_its_dict_and_the_model_leaves_it_alone():
    model = tiny_jepa(target_scale=[0.1, 0.2])  # a JSON config gives lists: stored as the tuple
    before = dataclasses.asdict(model.config)
    assert before["target_scale"] == (0.1, 0.2) and jepa.Config(**before) == model.config
    jepa.Model(model.config)
    assert dataclasses.asdict(model.config) == before


# ------------------------------------------------------------------------------------- vla.py
# Tests of vla.py. The references are written here: success checks on scenes placed by hand, the expert's successes
# counted over seeded episodes, RT-2's bins by their formula, the flow-matching loss and the Euler sampler against the
# straight path's closed form, the action expert's attention written out, ACT's weights by hand and a fake
# environment that records what rollout() executes, BabyAI's expert replayed action by action through the adapter,
# and train.py's own runs for the loss and resume.

VLA_TINY = dict(image_size=16, n_stem=2, stem_channels=8, n_layer=1, n_head=2, n_embd=32, flow_layers=1,
                chunk_size=4, n_demos=20, n_val_demos=4, eval_episodes=4, action_head="flow")
VLA_RUN = ["--image_size=16", "--n_stem=2", "--stem_channels=8", "--n_layer=1", "--n_head=2", "--n_embd=32",
           "--flow_layers=1", "--chunk_size=4", "--n_demos=20", "--n_val_demos=4", "--eval_episodes=4",
           "--batch_size=8", "--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=2",
           "--action_head=tokens", "--tasks=reach"]  # the generic tests' run (one family: shorter evals); the flow head's loss is too noisy at batch 8 for their
# "the last step's loss is below the first", so it has its own tests below
BABYAI_LEVEL = "BabyAI-GoToRedBallGrey-v0"


def tiny_vla(**overrides):
    torch.manual_seed(0)
    return vla.Model(vla.Config(**{**VLA_TINY, **overrides}))


def placed_tabletop(family, gripper, objects, closed=False, held=-1, edge="left"):
    """A tabletop of one family with the gripper and objects [(x, y, r)] put by hand (object 0 is the one named)."""
    env = vla.Tabletop(family, image_size=16)
    env.reset(seed=0)
    for o, (x, y, r) in zip(env.objects, objects):
        o[2:5] = x, y, r
    env.gripper, env.closed, env.held, env.edge = np.array(gripper, dtype=float), closed, held, edge
    return env


def stay(env, grip=-1.0):
    """One step that moves nothing: (terminated, reward)."""
    _, reward, terminated, _, info = env.step([0.0, 0.0, grip])
    assert info["success"] == terminated and reward == float(terminated)
    return terminated


@pytest.mark.parametrize("family, setup, solved", [
    ("reach", dict(gripper=(0.56, 0.5), objects=[(0.5, 0.5, 0.07)]), True),    # 0.06 from the centre, radius 0.07
    ("reach", dict(gripper=(0.5, 0.58), objects=[(0.5, 0.5, 0.07)]), False),   # 0.08: beside it
    ("push", dict(gripper=(0.9, 0.9), objects=[(0.19, 0.5, 0.07)], edge="left"), True),
    ("push", dict(gripper=(0.9, 0.9), objects=[(0.21, 0.5, 0.07)], edge="left"), False),
    ("push", dict(gripper=(0.1, 0.1), objects=[(0.81, 0.5, 0.07)], edge="right"), True),
    ("push", dict(gripper=(0.1, 0.1), objects=[(0.79, 0.5, 0.07)], edge="right"), False),
    ("push", dict(gripper=(0.9, 0.9), objects=[(0.5, 0.19, 0.07)], edge="top"), True),
    ("push", dict(gripper=(0.9, 0.1), objects=[(0.5, 0.81, 0.07)], edge="bottom"), True),
    ("push", dict(gripper=(0.9, 0.1), objects=[(0.19, 0.79, 0.07)], edge="bottom"), False),  # at the left, not the bottom
    ("place", dict(gripper=(0.9, 0.9), objects=[(0.5, 0.5, 0.07), (0.53, 0.53, 0.07)]), True),   # 0.042 apart
    ("place", dict(gripper=(0.9, 0.9), objects=[(0.5, 0.5, 0.07), (0.54, 0.54, 0.07)]), False),  # 0.057 apart
])
def test_vla_success_checks_match_hand_computed_cases(family, setup, solved):
    assert stay(placed_tabletop(family, **setup)) == solved


def test_vla_tabletop_gripper_rules_by_hand():
    # a held object is not placed yet, even right on the other one; opening there places it
    env = placed_tabletop("place", (0.5, 0.5), [(0.5, 0.5, 0.07), (0.52, 0.5, 0.07)], closed=True, held=0)
    assert not stay(env, grip=1.0) and stay(env, grip=-1.0)
    # closing over an object's centre picks it up; it then moves with the gripper, 0.07 per unit of action
    env = placed_tabletop("place", (0.3, 0.3), [(0.31, 0.3, 0.07), (0.8, 0.8, 0.07), (0.2, 0.8, 0.07)])
    env.step([1.0, 0.0, 1.0])
    assert env.held == 0 and env.objects[0, 2:4] == pytest.approx([0.38, 0.3])
    # closing 0.08 from a centre of radius 0.07 picks up nothing
    env = placed_tabletop("place", (0.3, 0.3), [(0.38, 0.3, 0.07), (0.8, 0.8, 0.07), (0.2, 0.8, 0.07)])
    env.step([0.0, 0.0, 1.0])
    assert env.held == -1
    # a closed, empty gripper pushes: moving from 0.3 to 0.37 against a circle at 0.4 (r 0.07, + the gripper's 0.02)
    # slides it to 0.37 + 0.09 = 0.46; an open one passes over it
    env = placed_tabletop("push", (0.3, 0.5), [(0.4, 0.5, 0.07), (0.8, 0.8, 0.07), (0.2, 0.8, 0.07)], closed=True)
    env.step([1.0, 0.0, 1.0])
    assert env.objects[0, 2:4] == pytest.approx([0.46, 0.5])
    env = placed_tabletop("push", (0.3, 0.5), [(0.4, 0.5, 0.07), (0.8, 0.8, 0.07), (0.2, 0.8, 0.07)])
    env.step([1.0, 0.0, -1.0])
    assert env.objects[0, 2:4] == pytest.approx([0.4, 0.5])
    # the gripper's own radius counts: 0.08 from the centre (beyond r 0.07, within r + 0.02) it still pushes
    env = placed_tabletop("push", (0.25, 0.5), [(0.4, 0.5, 0.07), (0.8, 0.8, 0.07), (0.2, 0.8, 0.07)], closed=True)
    env.step([1.0, 0.0, 1.0])
    assert env.objects[0, 2:4] == pytest.approx([0.41, 0.5])


@pytest.mark.parametrize("family", vla.FAMILIES)
def test_vla_expert_solves_at_least_99_percent_of_seeded_episodes(family):
    env, solved = vla.Tabletop(family, image_size=16), 0
    for seed in range(100):
        obs, _ = env.reset(seed=seed)
        for _ in range(vla.STEP_LIMIT[family]):
            obs, _, terminated, truncated, info = env.step(env.expert())
            if terminated or truncated:
                break
        # the goal, checked here from the final state, not from the env's success()
        o, g = env.objects, env.gripper
        dx, dy = vla.EDGES[env.edge]
        goal = {"reach": np.hypot(*(g - o[0, 2:4])) < o[0, 4],
                "push": (o[0, 2] if dx else o[0, 3]) * (dx + dy) > (0.8 if dx + dy > 0 else -0.2),
                "place": not env.closed and np.hypot(*(o[0, 2:4] - o[1, 2:4])) < 0.05}[family]
        solved += bool(goal) and terminated
    assert solved >= 99, solved


def test_vla_a_seed_replays_an_episode_exactly():
    def episode(seed):
        env, rng = vla.Tabletop(image_size=32), np.random.default_rng(0)
        obs, info = env.reset(seed=seed)
        frames, rewards = [obs["image"]], []
        for _ in range(15):
            obs, reward, *_ = env.step(rng.uniform(-1, 1, 3))
            frames.append(obs["image"])
            rewards.append(reward)
        return obs["mission"], np.stack(frames), rewards
    a, b, c = episode(5), episode(5), episode(6)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[1][0], c[1][0])


def test_vla_action_tokens_round_trip():
    bins = torch.arange(256)
    assert torch.equal(vla.value_to_bin(vla.bin_to_value(bins, 256), 256), bins)  # bin -> value -> bin
    # by hand: 256 bins of width 2/256 over [-1, 1]; 1 itself falls in the last
    assert vla.value_to_bin(torch.tensor([-1.0, -0.995, -0.99, 0.0, 0.99, 1.0, 3.0]), 256).tolist() == \
        [0, 0, 1, 128, 254, 255, 255]
    assert vla.bin_to_value(torch.tensor([0, 128, 255]), 256).tolist() == [-1 + 1 / 256, 1 / 256, 1 - 1 / 256]
    v = torch.linspace(-1, 1, 1001)
    assert (vla.bin_to_value(vla.value_to_bin(v, 256), 256) - v).abs().max() <= 1 / 256 + 1e-6  # half a bin


def test_vla_flow_time_is_beta_1_5_1():
    t = vla.sample_time(torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    assert float(t.mean()) == pytest.approx(1.5 / 2.5, abs=0.003)  # Beta(a, b)'s mean a / (a + b)
    for x in (0.2, 0.5, 0.9):  # its CDF, x^1.5
        assert float((t <= x).float().mean()) == pytest.approx(x ** 1.5, abs=0.004)


class KnownField(torch.nn.Module):
    """A velocity network replaced by a known function of (x_t, t)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x_t, t, context, mask):
        return self.fn(x_t, t)


def test_vla_flow_matching_loss_equals_its_formula_on_a_fixed_sample():
    """The flow head's loss: the velocity's mean squared error plus the readouts' cross-entropy over the current
    action's bins (uniform logits here: ln n_bins)."""
    m = tiny_vla(chunk_size=1)
    m.flow = KnownField(lambda x_t, t: 2 * x_t) # a known network: the loss must then follow from the formula alone
    m.lm_head = FixedLogits(torch.zeros(3, m.config.n_bins))
    a = [[0.5, -0.2, 1.0], [-0.4, 0.8, -1.0]]
    noise = [[1.0, 0.3, -0.5], [-2.0, 0.1, 0.7]]
    t = [0.25, 0.9]
    errors = []
    for b in range(2):
        for d in range(3):
            x_t = t[b] * noise[b][d] + (1 - t[b]) * a[b][d]
            errors.append((2 * x_t - (noise[b][d] - a[b][d])) ** 2)
    images, words = torch.zeros(2, 3, 16, 16), torch.zeros(2, m.config.max_words, dtype=torch.long)
    _, loss = m((images, words, torch.tensor(noise)[:, None], torch.tensor(t)), torch.tensor(a)[:, None])
    assert float(loss) == pytest.approx(sum(errors) / len(errors) + math.log(m.config.n_bins), rel=1e-6)


def test_vla_euler_sampler_integrates_a_known_field_exactly():
    """The straight path x_t = a + t (noise - a) has the field v(x, t) = (x - a) / t, constant along it: Euler's
    10 steps from t = 1 must land on a, and the policy (with this field) must return a from any noise."""
    a = torch.tensor([[[0.3, -0.7, 0.9]], [[-0.1, 0.2, -0.5]]])
    x1 = torch.randn(2, 1, 3)
    out = vla.euler(lambda x, t: (x - a) / t[:, None, None], x1, 10)
    torch.testing.assert_close(out, a, atol=1e-6, rtol=0)
    m = tiny_vla(chunk_size=1)
    m.flow = KnownField(lambda x, t: (x - a) / t[:, None, None])
    act = m.act(torch.zeros(2, 3, 16, 16), torch.zeros(2, m.config.max_words, dtype=torch.long))
    torch.testing.assert_close(act, a, atol=1e-6, rtol=0)


def test_vla_action_expert_layer_equals_attention_written_out():
    """One ExpertBlock against its attention spelled out: queries from the action tokens only, keys and values from
    the layer-normed context followed by the action tokens, a softmax that gives masked context tokens no weight."""
    torch.manual_seed(0)
    c = vla.Config(**{**VLA_TINY, "n_head": 2})
    block = vla.ExpertBlock(c)
    for p in block.parameters():  # away from LayerNorm's 1, 0 so every parameter matters
        torch.nn.init.normal_(p, std=0.3)
    x, context = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    keep = torch.tensor([[True] * 6, [True, True, False, True, False, True]])
    mask = F.pad(keep[:, None, None, :], (0, 4), value=True)  # (B, 1, 1, T + chunk)
    with torch.no_grad():
        got = block(x, context, mask)
        a = F.layer_norm(x, (32,), block.ln_1.weight, block.ln_1.bias, c.norm_eps)
        kv_in = torch.cat([F.layer_norm(context, (32,), block.ln_kv.weight, block.ln_kv.bias, c.norm_eps), a], 1)
        q = a @ block.q.weight.T + block.q.bias
        k, v = (kv_in @ block.kv.weight.T + block.kv.bias).split(32, dim=-1)
        heads = []
        for h in range(2):
            s = slice(16 * h, 16 * (h + 1))
            scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(16)  # (B, chunk, T + chunk)
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
            heads.append(scores.softmax(-1) @ v[..., s])
        y = x + torch.cat(heads, -1) @ block.c_proj.weight.T + block.c_proj.bias
        expected = y + block.mlp(F.layer_norm(y, (32,), block.ln_2.weight, block.ln_2.bias, c.norm_eps))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    moved = context.clone()
    moved[1, 2] += 5.0  # a masked context token: nothing changes
    torch.testing.assert_close(block(x, moved, mask), got, rtol=0, atol=0)
    moved[1, 3] += 5.0  # a kept one: the actions see it
    assert not torch.allclose(block(x, moved, mask)[1], got[1])


class FixedLogits(torch.nn.Module):
    """An lm_head that ignores its input and gives the same logits (action_dim, n_actions) to every example."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, h):
        return self.logits.expand(h.shape[0], *self.logits.shape)


def test_vla_discrete_actions_are_sampled_and_bins_are_the_argmax():
    """A discrete env's policy draws its action from softmax(logits): over 4000 draws each action's frequency is
    within 4 standard deviations of its probability, and the same seed gives the same draws. Continuous bins stay
    the argmax's centre."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0, 0.0])
    m = tiny_vla(env="babyai:" + BABYAI_LEVEL, action_head="tokens")
    m.lm_head = FixedLogits(probs.log()[None])
    images, words = torch.zeros(4000, 3, 16, 16), torch.zeros(4000, m.config.max_words, dtype=torch.long)
    ids = m.act(images, words, torch.Generator().manual_seed(0))
    assert ids.shape == (4000, 1, 1)
    freq = torch.bincount(ids.flatten().long(), minlength=7).double() / 4000
    assert ((freq - probs.double()).abs() <= 4 * (probs * (1 - probs) / 4000).sqrt() + 1e-12).all(), freq
    torch.testing.assert_close(m.act(images, words, torch.Generator().manual_seed(0)), ids, rtol=0, atol=0)
    m = tiny_vla(action_head="tokens")
    logits = torch.full((3, m.config.n_bins), -5.0)
    logits[0, 7], logits[1, 200], logits[2, 128] = 1.0, 2.0, 3.0
    m.lm_head = FixedLogits(logits)
    acts = m.act(images[:2], words[:2], torch.Generator().manual_seed(0))
    expected = vla.bin_to_value(torch.tensor([7, 200, 128]), m.config.n_bins)
    torch.testing.assert_close(acts, expected.expand(2, 1, 3), rtol=0, atol=0)


def test_vla_temporal_ensembling_weights_by_hand():
    got = vla.ensemble(torch.tensor([[1.0], [2.0], [4.0]]), 0.5)  # oldest first
    w = [1, math.exp(-0.5), math.exp(-1.0)]
    assert float(got) == pytest.approx((1 * w[0] + 2 * w[1] + 4 * w[2]) / sum(w), rel=1e-6)


class RecordingEnv:
    """A fake environment: a blank image, 6 steps, and a record of every action it is given."""

    def __init__(self):
        self.actions = []

    def reset(self, seed=None, options=None):
        return {"image": np.zeros((16, 16, 3), np.uint8), "mission": "go to the red circle"}, {}

    def step(self, action):
        self.actions.append(np.array(action))
        done = len(self.actions) == 6
        return self.reset()[0], 0.0, False, done, {"success": False}


def test_vla_rollout_executes_acts_temporal_ensemble(monkeypatch):
    """A policy whose chunk made at step s says s for every future step: at step t, rollout must execute the mean of
    the starts s = t - 3 .. t (chunk_size 4) weighted exp(-m i), i = 0 for the oldest."""
    envs = []
    monkeypatch.setattr(vla, "make_env", lambda config, family: envs.append(RecordingEnv()) or envs[-1])
    config = vla.Config(**{**VLA_TINY, "ensemble_m": 0.3})
    calls = []

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.w = config, torch.nn.Parameter(torch.zeros(1))

        def act(self, images, words, generator=None):
            calls.append(len(calls))
            return torch.full((images.shape[0], config.chunk_size, 3), float(len(calls) - 1))

    assert vla.rollout(Policy(), config, "reach", [0, 1]) == [False, False]
    for t in range(6):
        starts = list(range(max(0, t - 3), t + 1))
        w = [math.exp(-0.3 * i) for i in range(len(starts))]
        want = sum(s * wi for s, wi in zip(starts, w)) / sum(w)
        for env in envs:
            assert env.actions[t] == pytest.approx([want] * 3, rel=1e-6), (t, env.actions[t])


def test_vla_flow_chunks_are_the_next_actions_then_staying_put():
    """Two episodes of 3 and 5 steps, actions (i / 100, -i / 100, grip) for step i: each drawn chunk of 4 must hold
    steps i .. i + 3 while they are in i's episode, then (0, 0, the last step's grip)."""
    config = vla.Config(**{**VLA_TINY, "chunk_size": 4})
    steps = np.arange(8)
    grip = np.where(steps % 2 == 0, 1.0, -1.0)
    arrays = dict(obs=np.zeros((8, 4 + 5 * vla.N_OBJECTS), np.float32),
                  actions=np.stack([steps / 100, -steps / 100, grip], 1).astype(np.float32),
                  episode=np.array([0, 0, 0, 1, 1, 1, 1, 1]), end=np.array([3, 8]), missions=np.array(["a", "b"]),
                  family=np.array([0, 0]), words=np.zeros((2, config.max_words), np.int64))
    (_, _, _, _), chunks = vla.Batches(vla.Demos(arrays, config, "train"), config, 32, seed=0).next()
    seen = set()
    for chunk in chunks.numpy():
        i = round(chunk[0, 0] * 100)
        last = 2 if i < 3 else 7
        want = [[j / 100, -j / 100, grip[j]] if j <= last else [0.0, 0.0, grip[last]] for j in range(i, i + 4)]
        assert chunk == pytest.approx(np.array(want), abs=1e-6), (i, chunk)
        seen.add(i)
    assert {1, 2, 5, 6, 7} <= seen  # the chunks that run past an episode's end were drawn


def test_vla_words_are_hashed_bags_padded_with_zeros():
    import zlib
    c = vla.Config(max_words=6, n_words=512)
    ids = vla.words_of("Go to the red circle", c)
    assert ids[:5] == [1 + zlib.crc32(w.encode()) % 511 for w in ("go", "to", "the", "red", "circle")]
    assert ids[5] == 0 and vla.words_of("", c) == [0] * 6 and len(vla.words_of("a " * 9, c)) == 6


@pytest.mark.parametrize("head", ["tokens", "flow"])
def test_vla_padding_words_change_nothing(head):
    """A padded instruction reads the same as the words alone: attention never looks at the padding (the action
    expert's neither)."""
    m = tiny_vla(action_head=head).eval()
    images = torch.randn(1, 3, 16, 16)
    words = torch.tensor([vla.words_of("go to the red circle", m.config)])
    other = words.clone()
    other[0, 5:] = 0
    flow = (torch.randn(1, 4, 3), torch.tensor([0.7])) if head == "flow" else ()
    chunk = torch.zeros(1, 4, 3) if head == "flow" else None
    with torch.no_grad():
        m.transformer.wte.weight[0] = 5.0  # the padding's embedding: must not matter
        a, _ = m((images, words, *flow), chunk)
        m.transformer.wpe.weight[6:] = -3.0  # positions of padding only
        b, _ = m((images, other, *flow), chunk)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def babyai_config(**overrides):
    return vla.Config(**{**VLA_TINY, "env": f"babyai:{BABYAI_LEVEL}", "action_head": "tokens", "image_size": 32,
                         **overrides})


def test_vla_babyai_episode_runs_and_the_experts_demonstrations_replay_to_success():
    pytest.importorskip("minigrid")
    config = babyai_config()
    obs, actions, lengths, missions = vla.record(config, BABYAI_LEVEL, [0, 1, 2])
    assert len(lengths) == 3 and all(m == "go to the red ball" for m in missions)
    k = 0
    for seed, n in zip([0, 1, 2], lengths):
        env = vla.make_env(config, None)
        o, _ = env.reset(seed=seed)
        assert o["image"].shape == (32, 32, 3) and o["image"].dtype == np.uint8
        for i in range(n):
            assert np.array_equal(o["image"], obs[k + i])  # the same level from the same seed
            o, reward, terminated, truncated, info = env.step(int(actions[k + i][0]))
        assert terminated and info["success"] and reward > 0
        k += n


def test_vla_babyai_image_is_turned_so_that_the_agent_faces_up():
    """Whichever way the agent faces, a step forward onto an empty cell moves its tile one tile up the image, drawn
    the same (minigrid's own rule for the move, the image's rows for up)."""
    pytest.importorskip("minigrid")
    env, rng, moves = vla.BabyAI("BabyAI-GoToLocalS8N2-v0", 64), np.random.default_rng(0), 0  # 8 x 8 tiles of 8 px
    tiles = lambda im: im.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4)  # noqa: E731  (row, col, 8, 8, 3)
    env.env.unwrapped.highlight = False  # no shading of the agent's view: a move changes just two tiles
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        for _ in range(12):
            front = env.env.unwrapped.grid.get(*env.env.unwrapped.front_pos)
            before, after = tiles(obs["image"]), tiles(env.step(2)[0]["image"])
            if front is None:  # the move happened
                (r, c), (r2, c2) = np.argwhere((before != after).any(axis=(2, 3, 4)))
                assert (r2, c2) == (r + 1, c) and np.array_equal(after[r, c], before[r + 1, c])
                moves += 1
            obs = env.step(int(rng.integers(2)))[0]  # turn left or right
    assert moves >= 10


def test_vla_babyai_without_minigrid_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "minigrid", None)  # import minigrid now raises ImportError
    with pytest.raises(ValueError, match=r"needs the minigrid package .*: pip install minigrid$"):
        vla.load_splits("", babyai_config(), str(tmp_path))
    code, out = run_main(capsys, "--model=vla", f"--env=babyai:{BABYAI_LEVEL}", "--action_head=tokens",
                         f"--out_dir={tmp_path}", f"--cache_dir={tmp_path}")
    assert code == 1 and out.strip().startswith("error: ") and out.strip().endswith("pip install minigrid"), out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("bad, message", [
    (dict(env="babyai:X", action_head="flow"), "action_head=flow needs continuous actions"),
    (dict(env="atari"), "is not tabletop or babyai:LEVEL-ID"),
    (dict(tasks="reach,stack"), "stack is not a tabletop task family"),
    (dict(image_size=20, n_stem=3), "not a multiple of 2\\^n_stem=8"),
])
def test_vla_bad_config_says_what_to_do(bad, message):
    with pytest.raises(ValueError, match=message):
        vla.Config(**bad)


def test_vla_babyai_short_run_lowers_the_loss_and_scores_its_level(tmp_path, own_data_cache):
    pytest.importorskip("minigrid")
    rows = run_own("vla", f"--env=babyai:{BABYAI_LEVEL}", "--image_size=32", "--max_iters=80", "--eval_interval=80",
                   out_dir=tmp_path, cache_dir=own_data_cache)
    steps, evals = [r["loss"] for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert np.mean(steps[-10:]) < np.mean(steps[:10]) - 0.3, steps  # from about ln 7
    for r in evals:
        for kind in ("", "_blind", "_random"):
            score = r[f"success_GoToRedBallGrey{kind}"]
            assert 0 <= score <= 1 and score * 4 % 1 == 0 and r[f"success{kind}"] == score  # of 4 episodes


def test_vla_tabletop_scores_are_means_over_the_families(tmp_path, own_data_cache):
    rows = run_own("vla", "--max_iters=2", "--eval_interval=2", "--tasks=reach,push,place", out_dir=tmp_path,
                   cache_dir=own_data_cache)
    for r in [r for r in rows if "val_loss" in r]:
        for kind in ("", "_blind", "_random"):
            scores = [r[f"success_{f}{kind}"] for f in vla.FAMILIES]
            assert all(0 <= s <= 1 and s * 4 % 1 == 0 for s in scores)  # of 4 episodes each
            assert r[f"success{kind}"] == pytest.approx(np.mean(scores))


@pytest.mark.parametrize("head", ["flow", "tokens"])
def test_vla_short_run_fits_a_batch(head):
    """Either head drives its loss on one batch of demonstrations (the flow head's noise and times fixed with it)
    below half of where it starts: the gradients reach everything that sets the actions."""
    m = tiny_vla(action_head=head)
    c = m.config
    train_split, _ = vla.load_splits("", c, None)
    x, y = vla.Batches(train_split, c, 16, seed=0).next()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        _, loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_vla_flow_head_resumes_bit_exactly(tmp_path, own_data_cache):
    """The generic resume test runs the tokens head; the flow head draws noise and times with its batches too."""
    common = ["--action_head=flow", "--lr_decay_iters=6", "--eval_interval=3"]
    whole = run_own("vla", *common, "--max_iters=6", out_dir=tmp_path / "a", cache_dir=own_data_cache)
    run_own("vla", *common, "--max_iters=3", out_dir=tmp_path / "b", cache_dir=own_data_cache)
    resumed = run_train("--init_from=resume", "--max_iters=6", out_dir=str(tmp_path / "b"), cache_dir=own_data_cache,
                        base=[])
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]  # noqa: E731
    assert len(losses(whole)) == 6 and losses(resumed) == losses(whole)
    assert [r for r in resumed if "val_loss" in r] == [r for r in whole if "val_loss" in r]  # the scores too


# ------------------------------------------------------------------------------------- speedrun.py
# Tests of speedrun.py against formulas written here: the soft cap, QK-norm, ReLU², the identity blocks at init, and
# the value-embedding and U-net wiring against a forward spelled out layer by layer. It has no Hugging Face
# counterpart.

def tiny_speedrun(**overrides):
    """A small random speedrun.Model: 2 layers, vocab 96, block_size 64. The zero-init projections and head, and the
    constant scalars, are randomized: at init every block is the identity, and a decode test would see nothing."""
    torch.manual_seed(0)
    config = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=64, intermediate_size=96)
    return randomize_constant_params(speedrun.Model(speedrun.Config(**{**config, **overrides})))


def rms(x, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_speedrun_soft_cap_is_cap_tanh_of_the_logits():
    """The same weights with softcap=15 and softcap=0 (the raw logits): capped = 15 tanh(raw / 15), in the logits and
    in the loss of both forward paths (need_logits=False takes the fused head + loss only without the cap)."""
    model = tiny_speedrun()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # logits past the cap, so it bends them
    raw_model = speedrun.Model(dataclasses.replace(model.config, softcap=0.0))
    raw_model.load_state_dict(model.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        raw, raw_loss = raw_model(idx, idx)
        capped, loss = model(idx, idx)
        _, fused_loss = model(idx, idx, need_logits=False)
        _, raw_fused_loss = raw_model(idx, idx, need_logits=False)
    assert raw.abs().max() > 30 and capped.abs().max() <= 15
    torch.testing.assert_close(capped, 15 * torch.tanh(raw / 15), atol=1e-5, rtol=0)
    expected = F.cross_entropy((15 * torch.tanh(raw / 15)).flatten(0, 1), idx.flatten())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_loss, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(raw_fused_loss, raw_loss, atol=1e-5, rtol=0)


def test_speedrun_qk_norm_is_rms_of_each_head():
    """q_norm and k_norm divide each head's vector by its RMS (no gain); the attention is then blind to the scale
    of c_q and c_k (without QK-norm, x7 and x0.5 would change it; eps makes it not exact)."""
    model = tiny_speedrun()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 4, 16) * 3
    torch.testing.assert_close(attn.q_norm(x), rms(x), atol=1e-5, rtol=0)
    assert not list(attn.q_norm.parameters()) and not list(attn.k_norm.parameters())
    h = torch.randn(2, 16, 64)
    cos, sin = model.rope_cos[:16, None], model.rope_sin[:16, None]
    with torch.no_grad():
        before = attn(h, cos, sin)
        attn.c_q.weight.mul_(7)
        attn.c_k.weight.mul_(0.5)
        after = attn(h, cos, sin)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)


def test_speedrun_mlp_is_relu_squared():
    mlp = tiny_speedrun().transformer.h[0].mlp
    x = torch.randn(3, 5, 64)
    hidden = x @ mlp.c_fc.weight.T
    expected = (torch.where(hidden > 0, hidden, 0.0) ** 2) @ mlp.c_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(value_embeds=2, unet=True)])
def test_speedrun_blocks_are_the_identity_at_init(overrides):
    """attn.c_proj, mlp.c_proj and the head start at zero: every block returns its input, and the model predicts
    the uniform distribution, loss ln(vocab_size)."""
    torch.manual_seed(0)
    model = speedrun.Model(speedrun.Config(vocab_size=96, n_layer=4, **overrides))
    idx = torch.randint(0, 96, (2, 16))
    x = torch.randn(2, 16, 128)
    cos, sin = model.rope_cos[:16, None], model.rope_sin[:16, None]
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            ve = model.transformer.ve[model.ve_table[i]](idx) if model.ve_table[i] is not None else None
            assert torch.equal(block(x, cos, sin, ve), x), i
        logits, loss = model(idx, idx)
    assert torch.equal(logits, torch.zeros_like(logits)) and loss.item() == pytest.approx(math.log(96), abs=1e-6)


def test_speedrun_value_embeddings_and_unet_skips_spelled_out():
    """n_layer=4, value_embeds=2, unet: layers 0 and 3 mix table 0 into their values, layers 1 and 2 table 1
    (mirrored); layer 2 adds skip_weights[0] * layer 1's output to its input, layer 3 skip_weights[1] * layer 0's.
    The model's forward against that wiring written out, each block called by hand."""
    model = tiny_speedrun(n_layer=4, value_embeds=2, unet=True)
    assert model.ve_table == [0, 1, 1, 0]
    assert speedrun.Model(speedrun.Config(n_layer=5, value_embeds=2)).ve_table == [0, 1, None, 1, 0]
    idx = torch.randint(0, 96, (2, 16))
    cos, sin = model.rope_cos[:16, None], model.rope_sin[:16, None]
    h, w = model.transformer.h, model.skip_weights
    with torch.no_grad():
        ve0, ve1 = model.transformer.ve[0](idx), model.transformer.ve[1](idx)
        x = rms(model.transformer.wte(idx))
        out0 = h[0](x, cos, sin, ve0)
        out1 = h[1](out0, cos, sin, ve1)
        out2 = h[2](out1 + w[0] * out1, cos, sin, ve1)
        out3 = h[3](out2 + w[1] * out0, cos, sin, ve0)
        expected = 15 * torch.tanh(model.lm_head(rms(out3)) / 15)
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(w, torch.ones_like(w))  # randomized: a swapped pair of weights would show


def test_speedrun_ablation_switches_remove_their_piece():
    """The ablation keys (bench.py time-to-loss --ablate): qk_norm=False feeds the raw rotated q and k to the
    attention (written out here with a softmax), relu2=False is GPT-2's tanh GELU, zero_init=False leaves the output
    projections and the head as randomly initialised as c_q."""
    model = tiny_speedrun(qk_norm=False, relu2=False)
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    h = torch.randn(2, 16, 64)
    cos, sin = model.rope_cos[:16, None], model.rope_sin[:16, None]

    def rotate(x):  # (B, T, n_head, head_dim): x cos + rotate_half(x) sin
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    q, k = rotate((h @ attn.c_q.weight.T).view(2, 16, 4, 16)), rotate((h @ attn.c_k.weight.T).view(2, 16, 4, 16))
    v = (h @ attn.c_v.weight.T).view(2, 16, 4, 16)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4 + torch.full((16, 16), float("-inf")).triu(1)
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 16, 64) @ attn.c_proj.weight.T
    x = torch.randn(3, 5, 64)
    hidden = x @ mlp.c_fc.weight.T
    gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
    with torch.no_grad():
        torch.testing.assert_close(attn(h, cos, sin), y, atol=1e-5, rtol=0)
        torch.testing.assert_close(mlp(x), gelu @ mlp.c_proj.weight.T, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    random_init = speedrun.Model(speedrun.Config(vocab_size=96, n_layer=2, zero_init=False))
    for w in (random_init.lm_head.weight, *(b.attn.c_proj.weight for b in random_init.transformer.h),
              *(b.mlp.c_proj.weight for b in random_init.transformer.h)):
        bound = 3 ** 0.5 * 0.5 * w.shape[1] ** -0.5
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)


def test_speedrun_default_fits_in_nanogpts_parameter_count():
    """The default model (4x128, untied head, vocab 256) has no more parameters than nanoGPT's 4x128 byte-level
    GPT-2 (biases, learned positions for 128 tokens, tied head), counted with every embedding."""
    nanogpt = gpt2.Model(gpt2.Config(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128, bias=True))
    model = speedrun.Model(speedrun.Config(vocab_size=256, block_size=128))
    n = sum(p.numel() for p in model.parameters())
    assert n <= sum(p.numel() for p in nanogpt.parameters()) == 842_496
    c = model.config
    assert n == 2 * 256 * 128 + 4 * (4 * 128 * 128 + 2 * 128 * c.intermediate_size)
    assert model.flops_per_token(128) == 6 * (n - 256 * 128) + 12 * 4 * 128 * 128


def test_speedrun_config_file_trains_the_recipe(tmp_path):
    """config/speedrun.py picks speedrun.py, Muon and byte tokens at T=128; two iterations of it train."""
    rows = run_train(os.path.join(ROOT, "config", "speedrun.py"), "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                     "--sample_tokens=0", "--batch_size=2", out_dir=str(tmp_path), base=[])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "speedrun" and ckpt["train_config"]["optimizer"] == "muon"
    assert ckpt["train_config"]["block_size"] == 128 and ckpt["tokenizer"] == "byte" and "muon" in ckpt["optimizer_state"]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2]


def test_models_without_hugging_face_interop_refuse_it_in_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code, out = run_main(capsys, *TINY_RUN, "--model=speedrun", f"--init_from={tmp_path / 'hf'}", f"--out_dir={tmp_path}")
    assert code == 1 and "error: speedrun.py has no Hugging Face interop (no Model.from_pretrained)" in out, out
    run_train("--model=speedrun", "--max_iters=1", "--n_layer=1", out_dir=str(tmp_path / "run"))
    code, out = run_main(capsys, f"--out_dir={tmp_path / 'run'}", main=export_main)
    assert code == 1 and "error: speedrun.py has no Hugging Face interop (no save_pretrained)" in out, out
    assert "Traceback" not in out and not os.path.exists(tmp_path / "run" / "hf")


# ===================================================================================== every model file, one table
# The tests that hold for every model file, parametrized over one table: a new model file gets all of them by adding
# its row. A row: `build`, a tiny random gaia model; `hf`, a tiny random transformers model of the same architecture
# (None for a file without interop); `tp`, the extra train.py keys for its tensor-parallel run (None: no tp_plan,
# and --tp must say so).

def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=48, n_embd=32, n_layer=2, n_head=4))


def hf_mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM
    return perturbed_mamba(Mamba2ForCausalLM(Mamba2Config(vocab_size=MAMBA_VOCAB, hidden_size=32, num_hidden_layers=2,
                                                          state_size=8, num_heads=8, head_dim=8, n_groups=2, chunk_size=8)))


MODEL_TABLE = {
    "gpt2": dict(build=tiny_gpt2, hf=hf_gpt2, tp=[]),
    "llama": dict(build=tiny_llama, hf=lambda: tiny_hf_llama(n_kv_head=2), tp=["--n_kv_head=2"]),
    "mamba": dict(build=lambda: tiny_mamba(variant="mamba2"), hf=hf_mamba2, tp=None),
    "mla": dict(build=tiny_mla, hf=hf_deepseek, tp=[]),
    "moe": dict(build=tiny_moe, hf=lambda: hf_mixtral(4, 2, 2), tp=["--n_kv_head=2", "--qk_norm=True"]),
    "speedrun": dict(build=lambda: tiny_speedrun(value_embeds=1, unet=True), hf=None, tp=None),
}


TEXT_MODELS = sorted(MODEL_TABLE)

# Models that bring their own data (README: the model contract): `build` as above; `run`, the train.py keys of a
# tiny run on the model's built-in data (its own keys, no text keys).
JEPA_TINY_RUN = ["--img_size=16", "--patch_size=2", "--n_embd=32", "--n_layer=2", "--n_head=4", "--pred_n_embd=16",
                 "--pred_n_layer=1", "--pred_n_head=2", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
                 "--warmup_iters=2", "--learning_rate=1e-3"]
OWN_DATA_TABLE = {
    "jepa": dict(build=tiny_jepa, run=JEPA_TINY_RUN),
    "vla": dict(build=tiny_vla, run=VLA_RUN),
    "vlm": dict(build=tiny_vlm, run=VLM_RUN[1:]),
}
OWN_DATA_MODELS = sorted(OWN_DATA_TABLE)
EVERY_MODEL = {**MODEL_TABLE, **OWN_DATA_TABLE}


def test_the_table_has_a_row_for_every_model_file():
    assert sorted(EVERY_MODEL) == MODELS
    assert [m for m in MODELS if train.brings_own_data(train.load_model_module(m))] == OWN_DATA_MODELS


# ------------------------------------------------------------------------------------- the model file's shape

@pytest.mark.parametrize("model", TEXT_MODELS)
def test_sample_is_the_same_function_in_every_file(model):
    """Each file carries its own copy of sample() (one file, one model); the copies must not drift apart."""
    assert inspect.getsource(train.load_model_module(model).sample) == inspect.getsource(gpt2.sample)


@pytest.mark.parametrize("model", MODELS)
def test_config_rebuilds_from_its_dict_and_the_model_leaves_it_alone(model):
    """Checkpoints store dataclasses.asdict(config) and train.py rebuilds Config(**it): nothing may be lost or
    derived twice, and building the Model must not write into its config."""
    m = EVERY_MODEL[model]["build"]()
    before = dataclasses.asdict(m.config)
    assert type(m.config)(**before) == m.config
    type(m)(m.config)
    assert dataclasses.asdict(m.config) == before


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_hugging_face_round_trip(model, tmp_path):
    """transformers' model -> gaia (sharded safetensors) -> the same logits -> gaia's save_pretrained -> transformers."""
    if MODEL_TABLE[model]["hf"] is None:
        pytest.skip(f"{model}.py has no Hugging Face interop (no transformers architecture to compare with)")
    hf = MODEL_TABLE[model]["hf"]()
    hf_roundtrip(train.load_model_module(model), hf, tmp_path, hf.config.vocab_size, max_shard_size="20KB")


@pytest.mark.parametrize("model", MODELS)
def test_a_directory_without_weights_says_so(model, tmp_path):
    if not hasattr(train.load_model_module(model).Model, "from_pretrained"):
        pytest.skip(f"{model}.py has no Hugging Face interop (test_models_without_hugging_face_interop_refuse_it_in_one_line)")
    EVERY_MODEL[model]["build"]().save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        train.load_model_module(model).Model.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------- decoding and sampling

@pytest.mark.parametrize("model", TEXT_MODELS)
def test_cached_decode_matches_full_forward(model):
    m = EVERY_MODEL[model]["build"]()
    cache = m.make_cache(2, 16)
    assert cache.pos == 0 and isinstance(cache.bytes_per_token, int) and cache.bytes_per_token >= 0
    check_cached_decode(m, m.config.vocab_size, prompt_len=5, new_tokens=24)


@pytest.mark.parametrize("model", [m for m in TEXT_MODELS if "block_size" in config_keys(m)])
def test_generation_past_block_size_slides_the_window(model):
    """Past block_size, every token is predicted from the last block_size tokens (nanoGPT's crop): the logits
    of each step equal a full forward over that cropped window."""
    m = EVERY_MODEL[model]["build"]().eval()
    block_size = m.config.block_size
    prompt = torch.randint(0, m.config.vocab_size, (2, block_size - 5))
    out, step_logits = m.generate(prompt, 12, temperature=0, return_logits=True)
    idx, reference = prompt, []
    with torch.no_grad():
        for _ in range(12):  # the slow reference: a full forward over the cropped context for every token
            logits, _ = m(idx[:, -block_size:])
            reference.append(logits[:, -1])
            idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(step_logits, torch.stack(reference, dim=1), atol=1e-5, rtol=0)
    assert torch.equal(out, idx)


def nucleus_reference(probs, temperature=1.0, top_k=None, top_p=None):
    """The distribution sample() must draw from, written out slowly: probs ** (1 / T) renormalised, then
    the top_k most likely kept, then the most likely kept until the mass before the next one passes top_p."""
    p = [x ** (1 / temperature) for x in probs]
    p = [x / sum(p) for x in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k else order)
    if top_p is not None:
        mass, nucleus = 0.0, set()
        for i in (i for i in order if i in keep):
            if mass > top_p:
                break
            nucleus.add(i)
            mass += p[i] / sum(p[j] for j in keep)
        keep = nucleus
    return [p[i] / sum(p[j] for j in keep) if i in keep else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("model", TEXT_MODELS)
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.5, None, None), (1.0, 2, None),
                                                       (1.0, None, 0.7), (2.0, 3, 0.7)])
def test_sampling_draws_from_the_filtered_distribution(model, temperature, top_k, top_p):
    sample = train.load_model_module(model).sample
    probs = [0.05, 0.5, 0.15, 0.3]  # not sorted: an index mix-up in the top-p un-sort shows
    logits = torch.log(torch.tensor([probs])).expand(40000, 4)  # one row per draw
    torch.manual_seed(0)
    draws = sample(logits, temperature, top_k, top_p).flatten()
    frequency = torch.bincount(draws, minlength=4).double() / len(draws)
    expected = torch.tensor(nucleus_reference(probs, temperature, top_k, top_p), dtype=torch.float64)
    torch.testing.assert_close(frequency, expected, atol=0.012, rtol=0)  # 5 standard errors of 40,000 draws
    assert torch.equal(sample(logits[:2], temperature=0), torch.tensor([[1], [1]]))


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_generate_passes_its_filters_to_sampling(model):
    """top_k=1 at temperature 1 can only pick the most likely token: generate must equal greedy decoding."""
    m = EVERY_MODEL[model]["build"]().eval()
    prompt = torch.randint(0, m.config.vocab_size, (2, 4))
    greedy = m.generate(prompt, 6, temperature=0)
    assert torch.equal(m.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    assert torch.equal(m.generate(prompt, 6, temperature=1.0, top_p=1e-6), greedy)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_bench_decode_runs_for_every_model(model, monkeypatch, capsys):
    """bench.py decode reads every model's cache the same way: make_cache(...).bytes_per_token."""
    out = run_bench(monkeypatch, capsys, ["decode", f"--model={model}", "--context=4", "--new_tokens=3",
                                          "--no_cache_tokens=1", "--repeats=1", "--vocab_size=64", "--n_layer=1"])
    row = re.search(r"^  default\s+([\d,]+)\s+([\d,]+)\s", out, re.M)
    m = train.load_model_module(model)
    assert int(row.group(2).replace(",", "")) == m.Model(m.Config(vocab_size=64, n_layer=1)).make_cache(1, 1).bytes_per_token


# ------------------------------------------------------------------------------------- training with train.py

@pytest.mark.parametrize("model", TEXT_MODELS)
def test_short_run_loss_falls(model, tmp_path):
    rows = run_train(f"--model={model}", "--max_iters=40", "--eval_interval=40", out_dir=str(tmp_path))
    evals = [r for r in rows if "val_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["iter"] == 0 and last["iter"] == 40
    # at init every model predicts near uniformly over the 256 bytes (a wrong init scale shows here)
    assert abs(first["train_loss"] - math.log(256)) < 0.15 and abs(first["val_loss"] - math.log(256)) < 0.15, first
    assert last["train_loss"] < first["train_loss"] - 1.5, (first, last)
    assert last["val_loss"] < first["val_loss"] - 1.5, (first, last)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows if "loss" in r)
    import matplotlib.image
    # loss, lr, tokens/s, one per 2-D metric, one for all the model's scalar metrics (moe's expert_imbalance)
    step = rows[-2]
    standard = {"iter", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu"}
    panels = 3 + sum(isinstance(v, list) for v in step.values()) + any(isinstance(v, float) for k, v in step.items()
                                                                       if k not in standard)
    assert matplotlib.image.imread(tmp_path / "dashboard.png").shape[:2] == (4 * 80, 5 * panels * 80)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_resume_is_bit_identical(model, tmp_path):
    """A run stopped at iter 6 and resumed to 12 logs exactly the losses of an unbroken 12-iter run."""
    has_dropout = "dropout" in config_keys(model)
    common = [f"--model={model}", "--lr_decay_iters=12", "--eval_interval=3"] + (["--dropout=0.1"] if has_dropout else [])
    whole = run_train(*common, "--max_iters=12", out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "c"))
    run_train(*common, "--max_iters=6", out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"))
    resumed = run_train("--init_from=resume", "--max_iters=12", out_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"))
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(losses(whole)) == 12
    assert losses(resumed) == losses(whole)
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]


# ------------------------------------------------------------------------------------- models that bring their own data

@pytest.fixture(scope="session")
def own_data_cache(tmp_path_factory):
    """One cache_dir for every own-data run: built-in data made once."""
    return str(tmp_path_factory.mktemp("own_data_cache"))


def run_own(model, *args, out_dir, cache_dir):
    return run_train(f"--model={model}", *OWN_DATA_TABLE[model]["run"], *args, out_dir=str(out_dir),
                     cache_dir=cache_dir, base=[])


@pytest.mark.parametrize("model", OWN_DATA_MODELS)
def test_own_data_run_logs_scores_draws_and_falls(model, tmp_path, own_data_cache, capsys):
    rows = run_own(model, "--max_iters=30", "--eval_interval=15", out_dir=tmp_path, cache_dir=own_data_cache)
    out = capsys.readouterr().out
    steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30]
    assert steps[-1]["loss"] < steps[0]["loss"] and evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    scores = set(evals[0]) - {"iter", "train_loss", "val_loss"}
    assert scores and all(set(r) - {"iter", "train_loss", "val_loss"} == scores for r in evals)  # every eval scores
    assert all(math.isfinite(r[k]) for r in evals for k in scores)
    assert all(r["samples_per_s"] > 0 and "tokens_per_s" not in r for r in steps)
    assert re.search(r"iter 30: loss [\d.]+, time [\d.]+ms, [\d,]+ samples/s", out), out
    for k in scores:  # the eval line names every score
        assert re.search(rf"step 30: train loss [\d.]+, val loss [\d.]+.*, {k} [\d.]+", out), out
    assert f"picture: {tmp_path / 'picture.png'}" in out and "sample:" not in out
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "picture.png").ndim == 3
    step_scores = any(isinstance(v, float) for k, v in steps[-1].items() if k not in
                      {"iter", "loss", "lr", "grad_norm", "samples_per_s", "tflops", "mfu"})
    panels = 3 + step_scores + 1  # loss, lr, samples/s, the model's metrics, the evaluation scores
    assert matplotlib.image.imread(tmp_path / "dashboard.png").shape[:2] == (4 * 80, 5 * panels * 80)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"] is None


@pytest.mark.parametrize("model", OWN_DATA_MODELS)
def test_own_data_resume_is_bit_identical(model, tmp_path, own_data_cache):
    common = ["--lr_decay_iters=8", "--eval_interval=4"]
    whole = run_own(model, *common, "--max_iters=8", out_dir=tmp_path / "a", cache_dir=own_data_cache)
    run_own(model, *common, "--max_iters=4", out_dir=tmp_path / "b", cache_dir=own_data_cache)
    resumed = run_train("--init_from=resume", "--max_iters=8", out_dir=str(tmp_path / "b"), cache_dir=own_data_cache, base=[])
    losses = lambda rows: [(r["iter"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    evals = lambda rows: [{k: v for k, v in r.items()} for r in rows if "val_loss" in r]
    assert len(losses(whole)) == 8 and losses(resumed) == losses(whole)
    assert evals(resumed) == evals(whole)  # the eval losses and the model's scores too


@pytest.mark.parametrize("model", OWN_DATA_MODELS)
def test_own_data_ddp_two_ranks_equal_one_process_with_twice_the_batch(model, tmp_path, own_data_cache):
    args = [f"--model={model}", *[a for a in OWN_DATA_TABLE[model]["run"] if not a.startswith("--batch_size")],
            "--max_iters=4", "--eval_interval=2", "--lr_decay_iters=4", f"--cache_dir={own_data_cache}"]
    run_train(*args, "--batch_size=8", out_dir=str(tmp_path / "one"), cache_dir=own_data_cache, base=[])
    code, out = torchrun(*args, "--batch_size=4", f"--out_dir={tmp_path / 'ddp'}")
    assert code == 0, out
    assert "4 examples x 1 accumulation steps x 2 data-parallel ranks = 8 samples per iteration" in out, out
    assert_same_curve(curve(tmp_path / "ddp"), curve(tmp_path / "one"))
    evals = lambda d: [r for r in map(json.loads, open(d / "metrics.jsonl")) if "val_loss" in r]
    for a, b in zip(evals(tmp_path / "ddp"), evals(tmp_path / "one"), strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-4) for k in ("iter", "train_loss", "val_loss"))
        # the model's scores count examples (an accuracy): float noise of another thread count may flip a borderline
        # one or two, so they agree within 1%
        assert all(a[k] == pytest.approx(b[k], abs=0.01) for k in a), (a, b)


def test_pair_keys_parse_from_the_command_line_and_bad_pairs_are_one_line():
    model_cfg = train.configure(["--model=jepa", "--target_scale=(0.2,0.3)", "--target_aspect=(1,2)"])[2]
    assert (model_cfg.target_scale, model_cfg.target_aspect) == ((0.2, 0.3), (1.0, 2.0))
    for bad in ("(0.1,0.2,0.3)", "0.2", "(a,0.2)"):
        with pytest.raises(configurator.ConfigError, match=r"target_scale=.* is not a valid tuple\[float, float\]; "
                                                           r"expected e.g. --target_scale=\(3e-4,3e-4\)"):
            train.configure(["--model=jepa", f"--target_scale={bad}"])


def test_train_defaults_of_a_model_file_are_its_defaults_and_still_overridable(monkeypatch, capsys):
    monkeypatch.setattr(jepa, "TRAIN_DEFAULTS", {"batch_size": 48, "max_iters": 7})
    cfg = train.configure(["--model=jepa", "--max_iters=9"])[0]
    assert (cfg.batch_size, cfg.max_iters, cfg.learning_rate) == (48, 9, train.TrainConfig.learning_rate)
    code, out = run_main(capsys, "--model=jepa", "--help")
    assert code == 0 and re.search(r"--batch_size\s+int\s+default 48", out), out
    monkeypatch.setattr(jepa, "TRAIN_DEFAULTS", {"batch_sise": 48})
    code, out = run_main(capsys, "--model=jepa")
    assert code == 1 and "error: jepa.py's TRAIN_DEFAULTS sets batch_sise, which is not a train.py key" in out, out


@pytest.mark.parametrize("model", [m for m in OWN_DATA_MODELS if not hasattr(train.load_model_module(m).Model, "tp_plan")])
def test_own_data_model_without_a_plan_refuses_tp(model, tmp_path, own_data_cache):
    code, out = torchrun(f"--model={model}", *OWN_DATA_TABLE[model]["run"], "--tp=2", "--max_iters=1",
                         f"--out_dir={tmp_path}", f"--cache_dir={own_data_cache}", timeout=120)
    assert code != 0 and len(re.findall(f"error: {model}.py has no tensor-parallel plan", out)) >= 1, out  # see bad_tp


@pytest.mark.parametrize("model", OWN_DATA_MODELS)
@pytest.mark.parametrize("key", train.TEXT_KEYS)
def test_own_data_models_refuse_text_keys(model, key, capsys, tmp_path):
    if key in config_keys(model):
        pytest.skip(f"{model}'s Config has {key}: it means something there")
    value = {"tokenizer": "gpt2", "sample_prompt": "hi", "temperature": "0.5"}.get(key, "64")
    code, out = run_main(capsys, f"--model={model}", f"--{key}={value}", f"--out_dir={tmp_path}")
    assert code == 1 and out.strip() == (f"error: {key} means nothing for {model}: it trains on its own data "
                                         f"({model}.py's load_splits), not on tokenized text; drop --{key} (from the "
                                         f"command line or config file)"), out
    assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.parametrize("model", OWN_DATA_MODELS)
def test_own_data_checkpoint_exports_and_sample_and_bench_refuse(model, tmp_path, own_data_cache, capsys, monkeypatch):
    """The checkpoint exports; bench.py refuses; sample.py refuses a model without generate (jepa), and asks one with
    generate (vlm) about an image: without --image it fails in one line naming the fix, with it it prints an answer."""
    run_own(model, "--max_iters=2", "--eval_interval=2", out_dir=tmp_path, cache_dir=own_data_cache)
    code, out = run_main(capsys, f"--out_dir={tmp_path}", main=sample_main)
    if not callable(getattr(train.load_model_module(model).Model, "generate", None)):
        assert code == 1 and f"error: {model} does not generate text" in out, out
    else:
        assert code == 1 and out.strip() == (f"error: {model} answers questions about an image: pass --image=PATH (an "
                                             f"image file) and --prompt=QUESTION"), out
        from PIL import Image
        Image.fromarray(np.full((20, 24, 3), (220, 40, 40), dtype=np.uint8)).save(tmp_path / "red.png")
        code, out = run_main(capsys, f"--out_dir={tmp_path}", f"--image={tmp_path / 'red.png'}",
                             "--prompt=what colour is the circle?", "--max_new_tokens=4", "--num_samples=2",
                             main=sample_main)
        answers = out.split("---------------\n")
        assert code == 0 and len(answers) == 3 and answers[-1] == "", out  # two answers, each ended by the rule
        assert all(len(a) <= 4 * 4 + 1 for a in answers), out  # at most 4 new tokens each (of <= 4 UTF-8 bytes)
        code, out = run_main(capsys, f"--out_dir={tmp_path}", f"--image={tmp_path / 'missing.png'}", main=sample_main)
        assert code == 1 and out.strip().startswith("error: --image=") and "\n" not in out.strip(), out
    code, out = run_main(capsys, f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'hf'}", main=export_main)
    assert code == 0 and os.path.isfile(tmp_path / "hf" / "config.json"), out
    with pytest.raises(SystemExit, match=f"error: bench.py times text models on random tokens; {model} brings its own"):
        run_bench(monkeypatch, capsys, ["train", f"--model={model}"])


# ------------------------------------------------------------------------------------- tensor parallel (gloo, 2 CPU processes)

TP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import distributed, train
module = train.load_model_module({model!r})
torch.manual_seed(0)
model = module.Model(module.Config(vocab_size=256, **{overrides!r}))
from test_all import randomize_constant_params
randomize_constant_params(model)  # biases and norm gains start at 0 and 1: a TP mix-up of them would hide
layout = distributed.init(distributed.layout_from_env(tp=2, fsdp=False), "cpu")
distributed.validate(model, layout)
model = distributed.parallelize(model, layout, "cpu")
idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
logits, loss = model(idx, idx)
if layout.master:
    torch.save({{"logits": logits.detach(), "loss": loss.detach()}}, {out!r})
dist.barrier()  # no rank tears gloo down while another still uses it
dist.destroy_process_group()
"""


def test_fsdp_curve_sharded_resume_and_resume_on_one_process(single_process_run, tmp_path):
    args = [*DIST_RUN, "--batch_size=4", "--fsdp=True", f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}"]
    code, out = torchrun(*args, "--max_iters=3")
    assert code == 0, out
    assert {"ckpt_dcp", "ckpt_meta.pt"} <= set(os.listdir(tmp_path)) and "ckpt.pt" not in os.listdir(tmp_path)
    code, out = torchrun("--init_from=resume", "--max_iters=5", f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}")
    assert code == 0 and "resuming gpt2" in out, out
    # one process, the same global batch (8 = 2 x 4): the curve goes on as if nothing had changed
    run_train("--init_from=resume", "--max_iters=6", "--batch_size=8", out_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert_same_curve(curve(tmp_path), curve(single_process_run))
    code, out = run_cli(f"--out_dir={tmp_path}", "--max_new_tokens=5", script="sample.py")  # sample.py reads DCP too
    assert code == 0, out


@pytest.mark.parametrize("args, message", [
    (["--tp=3"], "--tp=3 does not divide the 2 processes"),
    (["--tp=2", "--n_head=1", "--n_embd=32"], "--tp=2 cannot split transformer.h.0.attn.c_q \\(1 heads of 32\\)"),
])
def test_bad_tp_fails_fast_on_every_rank(tmp_path, args, message):
    code, out = torchrun(*TINY_RUN, *args, "--max_iters=2", f"--out_dir={tmp_path}", timeout=120)
    assert code != 0
    # every rank checks before any collective, so none hangs (the timeout); torchrun stops the other ranks as soon as
    # one fails, so whether the second one prints its line too is a race
    assert len(re.findall("error: " + message, out)) >= 1, out


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_tensor_parallel_logits_equal_one_process(model, tmp_path):
    module = train.load_model_module(model)
    overrides = {"block_size": 32} if "block_size" in config_keys(model) else {}
    if MODEL_TABLE[model]["tp"] is None:  # such a model must refuse --tp clearly
        assert not hasattr(module.Model, "tp_plan")
        code, out = torchrun(*TINY_RUN, f"--model={model}", "--tp=2", "--max_iters=1", f"--out_dir={tmp_path}")
        assert code != 0 and "has no tensor-parallel plan" in out, out
        return
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT.format(root=ROOT, model=model, overrides=overrides, out=str(tmp_path / "tp.pt")))
    code, out = torchrun(script=str(script))
    assert code == 0, out
    torch.manual_seed(0)
    reference = randomize_constant_params(module.Model(module.Config(vocab_size=256, **overrides)))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = reference(idx, idx)
    tp = torch.load(tmp_path / "tp.pt")
    torch.testing.assert_close(tp["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(tp["loss"], loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", [m for m in TEXT_MODELS if MODEL_TABLE[m]["tp"] is not None])
def test_tensor_parallel_training_follows_one_process(model, tmp_path):
    """gpt2's, llama's and moe's plans split the residual stream and the norms along the sequence, moe's qk_norm
    gains see only a rank's heads, mla's latents are replicated: the gradients must still match one process."""
    args = [*DIST_RUN[len(TINY_RUN):], f"--model={model}", "--batch_size=8", "--max_iters=4", *MODEL_TABLE[model]["tp"]]
    run_train(*args, out_dir=str(tmp_path / "one"), cache_dir=str(tmp_path / "c"))
    code, out = torchrun(*TINY_RUN, *args, "--tp=2", f"--out_dir={tmp_path / 'tp'}", f"--cache_dir={tmp_path / 'c'}")
    assert code == 0, out
    assert_same_curve(curve(tmp_path / "tp"), curve(tmp_path / "one"))


# ------------------------------------------------------------------------------------- bench.py compare

def compare_module():
    """benchmarks/compare.py as a module (bench.py runs it as a script)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "benchmarks", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_here(model):
    """(parameters, non-embedding, active), counted by name here: the embeddings are transformer.wte, .wpe, .ve.* and
    lm_head (a tied head is the same tensor); a routed expert is a slice of a stacked (n_experts, ...) tensor, of which
    a token uses n_experts_per_tok."""
    c = model.config
    params = dict(model.named_parameters())  # a tied weight is listed once
    total = sum(p.numel() for p in params.values())
    embedding = sum(p.numel() for n, p in params.items() if n.split(".")[0] == "lm_head"
                    or n.startswith(("transformer.wte.", "transformer.wpe.", "transformer.ve.")))
    routed = sum(p.numel() for p in params.values() if p.dim() == 3 and p.shape[0] == getattr(c, "n_experts", 0))
    inactive = routed * (1 - c.n_experts_per_tok / c.n_experts) if routed else 0
    return total, total - embedding, total - embedding - inactive


COMPARE_TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
                "--budget=tokens:1k", "--evals=2"]


def test_compare_trains_matched_models_and_draws_the_table(tmp_path, monkeypatch, capsys):
    """bench.py compare end to end at a tiny size: gpt2 (the reference) and moe (matched on active parameters) each
    train through train.py for the token budget; the models that trained are within the tolerance of gpt2's
    non-embedding count (counted here, by name, from the checkpoints' configs); the table's figures are theirs, the
    PNG has its three panels."""
    out = run_bench(monkeypatch, capsys, ["compare", "--models=gpt2,moe", *COMPARE_TINY, f"--out_dir={tmp_path}",
                                          f"--cache_dir={tmp_path / 'c'}"])
    target = counted_here(gpt2.Model(gpt2.Config(n_layer=2, n_head=2, n_embd=32, vocab_size=256)))[2]
    table = (tmp_path / "compare.md").read_text()
    assert table.strip() in out
    for name, module in (("gpt2", gpt2), ("moe", moe)):
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        model = module.Model(module.Config(**ckpt["model_config"]))
        total, non_embedding, active = counted_here(model)
        assert abs(active - target) <= 0.03 * target, (name, active, target)
        assert ckpt["iter_num"] == math.ceil(1000 / (4 * 32))  # the token budget: 8 steps of 4 x 32 tokens
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        seconds = sum(4 * 32 / r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
        c = model.config
        cache = 2 * c.n_layer * getattr(c, "n_kv_head", c.n_head) * (c.n_embd // c.n_head) * 4  # K and V, fp32
        row = re.search(rf"^\| {name} \| [^|]+ \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) s \| ([\d.]+) \| "
                        rf"([\d,]+) \|$", table, re.M)
        figures = [float(g.replace(",", "")) for g in row.groups()]
        assert figures[:3] == [total, non_embedding, round(active)], (name, figures)
        assert figures[3] == pytest.approx(8 * 4 * 32 / seconds, rel=0.01) and figures[4] == pytest.approx(seconds, abs=0.06)
        assert figures[5] == pytest.approx([r["val_loss"] for r in rows if "val_loss" in r][-1], abs=1e-4)
        assert figures[6] == cache
    assert non_embedding > 3 * active  # moe: 8 experts, 2 active
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "compare.png").shape[:2] == (int(4.5 * 70), 15 * 70)


def test_compare_sizes_every_text_model_to_the_target(tmp_path):
    """At the default size every default model's sized Config (what compare passes train.py) lands within the
    tolerance of gpt2 4x128's non-embedding count, counted here; and so does a larger target given by --params."""
    compare = compare_module()
    for argv, target in (([], counted_here(gpt2.Model(gpt2.Config(vocab_size=256)))[2]),
                         (["--params=3M", "--n_layer=6", "--models=llama,mamba,mla"], 3e6)):
        cc, runs, _ = compare.parse([*argv, f"--out_dir={tmp_path}"])
        assert list(runs) == (argv[-1][9:].split(",") if argv else ["gpt2", "llama", "moe", "mla", "mamba", "speedrun"])
        for name, (module, run) in runs.items():
            keys = {k: int(v) for k, v in (a[2:].split("=", 1) for a in run) if k in config_keys(name) and k != "block_size"}
            model = module.Model(module.Config(vocab_size=256, **keys))
            assert abs(counted_here(model)[2] - target) <= cc.tolerance * target, (name, keys, counted_here(model), target)


@pytest.mark.parametrize("args, message", [
    (["--models=gpt2,nope"], "unknown model 'nope'"),
    (["--models=gpt2,jepa"], "compare trains text models on the same tokens; jepa brings its own data"),
    (["--budget=steps:10"], "budget='steps:10' is neither tokens:N nor time:SECONDS"),
    (["--budget=tokens:lots"], "budget='lots' is not a positive number"),
    (["--budget=time:0"], "budget='0' is not a positive number"),
    (["--max_iters=5"], "max_iters is set by compare for every run; use --budget="),
    (["--n_embed=64"], "unknown key n_embed .* did you mean n_embd"),
    (["--models=gpt2", "--n_kv_head=2"], "unknown key n_kv_head"),
    (["--models=llama", "--n_kv_head=3"], "n_kv_head=3 does not divide n_head=4"),
    (["--models=gpt2", "--params=1M", "--tolerance=0.001"], "gpt2 comes no nearer than"),
])
def test_compare_bad_input_gives_one_clear_line(args, message, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_bench(monkeypatch, capsys, ["compare", *args, f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and re.search("^error: .*" + message, err), err


def test_compare_time_budget_sets_the_iterations(tmp_path, monkeypatch, capsys):
    """--budget=time:S runs S / (seconds per iteration, timed beforehand) iterations."""
    compare = compare_module()
    argv = ["--model=gpt2", "--n_layer=1", "--n_embd=32", "--block_size=16", "--batch_size=2", "--max_iters=1"]
    assert 0 < compare.seconds_per_iter(argv) < 5
    monkeypatch.setattr(compare, "seconds_per_iter", lambda argv: 0.01)
    compare.compare(["--models=gpt2", *COMPARE_TINY[:-2], "--budget=time:0.05", f"--out_dir={tmp_path}",
                     f"--cache_dir={tmp_path / 'c'}"])
    assert torch.load(tmp_path / "gpt2" / "ckpt.pt", weights_only=True)["iter_num"] == 5
    assert "Each model: 0.05 s of training," in capsys.readouterr().out



# ------------------------------------------------------------------------------------- kernels.py, op by op

# ------------------------------------------------------------------ the torch paths against references

def kernels_rope_tables(T, D, theta=10000.0):
    """The models' cos and sin buffers, (T, 1, D) float32 in Hugging Face's layout (both halves equal)."""
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2) / D)  # (T, D/2)
    return [torch.cat([f(angle)] * 2, -1)[:, None].float() for f in (torch.cos, torch.sin)]


def test_kernels_rms_norm_torch_is_the_row_formula():
    """rms_norm_torch against x / sqrt(x.x / C + eps) * w written row by row in float64: values and gradients
    (it computes in fp32 whatever x's dtype, so no float64 gradcheck); output dtype promote(weight, x)."""
    torch.manual_seed(0)
    x, w, g = torch.randn(2, 3, 5, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(2, 3, 5)
    y = kernels.rms_norm_torch(x, w, 1e-5)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    rms = torch.stack([row.dot(row).div(5).add(1e-5).sqrt() for row in x64.reshape(-1, 5)]).reshape(2, 3, 1)
    want = x64 / rms * w64
    torch.testing.assert_close(y, want.float())
    for got, ref in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(want, (x64, w64), g.double())):
        torch.testing.assert_close(got, ref.float())
    assert kernels.rms_norm_torch(x.bfloat16(), w, 1e-5).dtype == torch.float32


@pytest.mark.parametrize("bias", [True, False])
def test_kernels_layer_norm_torch_is_the_formula(bias):
    """layer_norm_torch against (x - mean) / sqrt(biased var + eps) * w + b in float64; gradcheck."""
    x, w, b = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 3, 7), (7,), (7,)))
    b = b if bias else None
    mean = x.sum(-1, keepdim=True) / 7
    want = (x - mean) / (((x - mean) ** 2).sum(-1, keepdim=True) / 7 + 1e-5).sqrt() * w + (0 if b is None else b)
    torch.testing.assert_close(kernels.layer_norm_torch(x, w, b, 1e-5), want)
    assert torch.autograd.gradcheck(kernels.layer_norm_torch, (x, w, b, 1e-5))


def test_kernels_rope_and_swiglu_torch_gradients():
    """gradcheck (finite differences, float64) of rope_torch for q and for a k with fewer heads (its values:
    test_moe_rope_turns_pairs_by_position_times_frequency) and of swiglu_torch, whose values are silu spelled out
    as g / (1 + e^-g) times up."""
    cos, sin = (t.double() for t in kernels_rope_tables(5, 8))
    q, k = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 5, 1, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: kernels.rope_torch(q, k, cos, sin),
                                    (q.requires_grad_(), k.requires_grad_()))
    gate, up = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.testing.assert_close(kernels.swiglu_torch(gate, up), gate / (1 + torch.exp(-gate)) * up)
    assert torch.autograd.gradcheck(kernels.swiglu_torch, (gate, up))


def attention_reference(q, k, v, causal, scale=None):
    """softmax(q k^T * scale + mask) v spelled out: k and v repeated per query head, the (T, S) scores held, the
    causal mask top-left aligned (query i sees keys j <= i, as SDPA's is_causal)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("Hk, T, S, scale", [(4, 9, 9, None), (2, 9, 9, 0.3), (1, 9, 9, None), (1, 5, 9, None),
                                             (2, 9, 5, 0.3)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_attention_torch_is_softmax_spelled_out(Hk, T, S, scale, causal):
    """attention_torch (SDPA with enable_gqa) against attention_reference in float64, 4 query heads on 4, 2 or 1
    k/v heads, T != S, a given scale: output and the gradients of q, k and v."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, Hk, S, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 4, T, 6, generator=g, dtype=torch.float64)
    got, want = kernels.attention_torch(q, k, v, causal, scale=scale), attention_reference(q, k, v, causal, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


LCE_C, LCE_V = 24, 37  # odd sizes: no power of two, no multiple of a block


def lce_inputs(shape=(19,), dtype=torch.float32, seed=0, n_ignored=4):
    """x (*shape, C), an LM head weight (V, C), and targets (*shape) with n_ignored of them -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, LCE_C, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(LCE_V, LCE_C, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, LCE_V, shape, generator=g)
    targets.view(-1)[torch.randperm(targets.numel(), generator=g)[:n_ignored]] = -1
    return x, weight, targets


def lce_reference(x, weight, targets, ignore_index=-1):
    """The unfused loss: the whole logits, then F.cross_entropy."""
    logits = F.linear(x, weight).float()
    return F.cross_entropy(logits.view(-1, LCE_V), targets.reshape(-1), ignore_index=ignore_index)


def lce_loss_and_grads(fn, x, weight, targets, **kw):
    loss = fn(x, weight, targets, **kw)
    return [loss, *torch.autograd.grad(loss, (x, weight))]


def assert_all_close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("shape, chunk_size, ignore_index", [((19,), None, -1), ((19,), 1, -1), ((19,), 5, -1),
                                                             ((19,), 64, -1), ((3, 7), 4, -100)])
def test_kernels_linear_cross_entropy_torch_equals_cross_entropy(shape, chunk_size, ignore_index):
    """linear_cross_entropy_torch against F.cross_entropy of the whole logits: loss and the gradients of x and
    the weight, chunks of 1 row, 5 (not dividing 19), 64 (more than N), (B, T, C) inputs with ignore_index -100."""
    x, weight, targets = lce_inputs(shape)
    targets[targets == -1] = ignore_index
    want = lce_loss_and_grads(lce_reference, x, weight, targets, ignore_index=ignore_index)
    got = lce_loss_and_grads(kernels.linear_cross_entropy_torch, x, weight, targets, ignore_index=ignore_index,
                             chunk_size=chunk_size)
    assert_all_close(got, want, rtol=1e-5, atol=1e-6)
    loss = 3 * kernels.linear_cross_entropy_torch(x, weight, targets, ignore_index, chunk_size)  # grad_output 3
    assert_all_close(torch.autograd.grad(loss, (x, weight)), [3 * t for t in want[1:]], rtol=1e-5, atol=1e-6)


def test_kernels_linear_cross_entropy_torch_gradcheck_tied_and_low_precision():
    """linear_cross_entropy_torch: gradcheck in float64; a tied embedding (the weight's grad sums both uses)
    against F.cross_entropy; bf16/fp16 inputs, and fp32 weights under bf16 autocast, against F.cross_entropy
    within bf16 rounding."""
    x, weight, targets = lce_inputs((7,), torch.float64, n_ignored=2)
    assert torch.autograd.gradcheck(lambda a, b: kernels.linear_cross_entropy_torch(a, b, targets, chunk_size=3),
                                    (x, weight))
    x, weight, targets = lce_inputs((2, 9))  # tied: the weight embeds the tokens and is the head
    idx = targets.clamp(min=0).flip(1)
    grads = [torch.autograd.grad(fn(torch.tanh(F.embedding(idx, weight) + x), weight, targets, **kw), weight)[0]
             for fn, kw in ((lce_reference, {}), (kernels.linear_cross_entropy_torch, dict(chunk_size=4)))]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True)):
        x, weight, targets = lce_inputs(dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = lce_loss_and_grads(kernels.linear_cross_entropy_torch, x, weight, targets, chunk_size=5)
            assert_all_close(got, lce_loss_and_grads(lce_reference, x, weight, targets), rtol=2e-2, atol=2e-3)


def test_kernels_linear_cross_entropy_torch_edge_cases():
    """linear_cross_entropy_torch: no counted token gives NaN and zero gradients, as F.cross_entropy; a tensor that
    needs no gradient gets no gradient work (none stored), no_grad gives the plain loss and no graph; chunk sizes."""
    x, weight, targets = lce_inputs(n_ignored=19)
    got, want = (lce_loss_and_grads(f, x, weight, targets) for f in (kernels.linear_cross_entropy_torch, lce_reference))
    assert got[0].isnan() and want[0].isnan()
    assert_all_close(got[1:], want[1:], rtol=0, atol=0)
    x, weight, targets = lce_inputs()
    weight.requires_grad_(False)  # the stored gradients, saved_tensors, are (grad_x, grad_w)
    assert kernels.linear_cross_entropy_torch(x, weight, targets, chunk_size=5).grad_fn.saved_tensors[1] is None
    x.requires_grad_(False)
    weight.requires_grad_(True)
    assert kernels.linear_cross_entropy_torch(x, weight, targets, chunk_size=5).grad_fn.saved_tensors[0] is None
    with torch.no_grad():
        loss = kernels.linear_cross_entropy_torch(x, weight, targets, chunk_size=5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, lce_reference(x, weight, targets))
    assert kernels.lce_chunk_size(8192, 50257) == 320 and kernels.lce_chunk_size(10**6, 128256) == 128
    assert kernels.lce_chunk_size(19, 37) == 19 and kernels.lce_chunk_size(10**6, 10**7) == 64
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        kernels.linear_cross_entropy_torch(x, weight, targets, chunk_size=0)


# ------------------------------------------------------------------ which path runs

@pytest.fixture
def kernels_backend():
    """kernels.set_backend, the backend before the test restored after it."""
    previous = kernels.backend()
    yield kernels.set_backend
    kernels.set_backend(previous)


def test_kernels_dispatch_follows_the_backend(kernels_backend, monkeypatch):
    """set_backend refuses an unknown name, naming the choices. Under auto, torch and cuda the public ops give
    their torch path's result on CPU tensors (gelu_tanh: the C loop's under auto and cuda, where it builds) and never
    enter a Triton function (each replaced here by a trap);
    under triton, CPU tensors outside Triton's interpreter are an error naming TRITON_INTERPRET."""
    with pytest.raises(ValueError, match="'fast' is not one of auto, triton, torch, cuda"):
        kernels_backend("fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    entered = []
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))  # (B, H, T, D), GQA
    cos, sin = kernels_rope_tables(5, 8)
    head, targets = torch.nn.Linear(8, 11, bias=False), torch.randint(0, 11, (2, 5), generator=g)
    ops = {"rms_norm": ((x, w, 1e-5),) * 2, "layer_norm": ((x, w, b, 1e-5),) * 2,
           "rope": ((q.transpose(1, 2), k.transpose(1, 2), cos, sin),) * 2, "swiglu": ((x, q[:, 0]),) * 2,
           "gelu_tanh": ((x,),) * 2, "attention": ((q, k, v, True, 0.0, 0.5),) * 2,
           "linear_cross_entropy": ((x, head, targets), (x, head.weight, targets)),
           "linear_scan": ((x.sigmoid(), x),) * 2}
    for op in ops:
        monkeypatch.setattr(kernels, f"{op}_triton", lambda *args, op=op: entered.append(op), raising=False)
    for name in ("auto", "torch", "cuda"):
        kernels_backend(name)
        for op, (args, torch_args) in ops.items():
            # the one CPU speed path: GPT-2's GELU in C, for fp32 on the CPU under auto and cuda
            expected = kernels.gelu_tanh_c if op == "gelu_tanh" and kernels.use_c(x) else getattr(kernels, f"{op}_torch")
            torch.testing.assert_close(getattr(kernels, op)(*args), expected(*torch_args), rtol=0, atol=0,
                                       msg=f"{name} {op}")
    assert entered == []
    if not kernels.HAS_TRITON:
        with pytest.raises(ValueError, match="needs the triton package"):
            kernels_backend("triton")
        return
    kernels_backend("triton")
    for op, (args, _) in ops.items():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            getattr(kernels, op)(*args)


def test_kernels_linear_cross_entropy_runs_a_hooked_head_as_the_module(kernels_backend):
    """A head with a forward pre-hook (as a tensor-parallel plan or FSDP installs) runs as the module, so the hook
    applies (here it doubles x); a plain head takes the chunked path (LinearCrossEntropy), equal to
    F.cross_entropy of its logits."""
    kernels_backend("auto")
    x, weight, targets = lce_inputs((3, 5))
    head = torch.nn.Linear(LCE_C, LCE_V, bias=False)
    head.weight.data.copy_(weight.detach())
    loss = kernels.linear_cross_entropy(x, head, targets)
    assert loss.grad_fn.name() == "LinearCrossEntropyBackward"
    torch.testing.assert_close(loss, lce_reference(x, head.weight, targets))
    head.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    loss = kernels.linear_cross_entropy(x, head, targets)
    assert loss.grad_fn.name() != "LinearCrossEntropyBackward"
    torch.testing.assert_close(loss, lce_reference(2 * x, head.weight, targets))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_rms_norm_cuda_is_the_formula(kernels_backend):
    """rms_norm_cuda (CUDA C++) against rms_norm_torch, fp32 (to 1e-5) and bf16, bf16 x with fp32 weight, fp16
    (to their rounding), odd widths: values, dtype and the gradients of x and the weight; the cuda backend routes
    rms_norm there."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for x_dtype, w_dtype, shape, tol in [(torch.float32, torch.float32, (5, 37, 768), 1e-5),
                                         (torch.bfloat16, torch.bfloat16, (2, 131, 1000), 2e-2),
                                         (torch.bfloat16, torch.float32, (3, 5000), 2e-2),
                                         (torch.float16, torch.float16, (7, 24), 1e-2)]:
        x = torch.randn(*shape, device="cuda", generator=g).to(x_dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(w_dtype).requires_grad_()
        dy = torch.randn(shape, device="cuda", generator=g).to(torch.promote_types(x_dtype, w_dtype))
        got, want = kernels.rms_norm_cuda(x, w, 1e-5), kernels.rms_norm_torch(x, w, 1e-5)
        assert_all_close([got, *torch.autograd.grad(got, (x, w), dy)],
                         [want, *torch.autograd.grad(want, (x, w), dy)], rtol=tol, atol=tol)
    kernels_backend("cuda")
    assert kernels.rms_norm(x, w, 1e-5).grad_fn.name() == "RMSNormCUDABackward"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_kernels_rms_norm_cuda_without_a_gpu_names_kernels_auto():
    """Without a CUDA GPU, rms_norm_cuda says so and what to use instead."""
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*--kernels=auto"):
        kernels.rms_norm_cuda(torch.randn(2, 8), torch.ones(8), 1e-5)


# ------------------------------------------------------------------ the Triton paths against the torch paths
# Plain functions run by test_triton_kernels_equal_torch_paths in a subprocess, in Triton's interpreter (CPU
# tensors), which TRITON_INTERPRET=1 selects only when set before triton is imported. Odd shapes, ragged blocks.

KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-2),
              torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def outputs_and_grads(f, inputs, grad_outputs=None, seed=1):
    """f(*inputs)'s outputs, then the gradients of its float tensor inputs under grad_outputs (by default one
    random upstream gradient per output, the same for every f)."""
    inputs = [t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
              for t in inputs]
    outs = f(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outputs is None:
        g = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grad_outputs))


def assert_paths_agree(f_triton, f_torch, inputs, tol, grad_outputs=None, what=""):
    """Outputs and every input gradient of the two paths: same dtypes and shapes, values within tol."""
    got, want = (outputs_and_grads(f, inputs, grad_outputs) for f in (f_triton, f_torch))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{what} output/grad {i}: {m}")


def under_backend(name, f):
    """f called under kernels.set_backend(name) (the public ops' dispatch), the backend restored after."""
    def call(*args):
        previous = kernels.set_backend(name)
        try:
            return f(*args)
        finally:
            kernels.set_backend(previous)
    return call


def assert_public_op_takes_triton(op, function, *args, **constants):
    """kernels.<op>(*args, **constants) builds the Triton autograd `function` under the triton backend (and not
    under torch, nor auto on CPU tensors), and its output and the gradients of args equal the torch backend's."""
    def public(backend):
        return under_backend(backend, lambda *args: getattr(kernels, op)(*args, **constants))
    for backend in ("triton", "torch", "auto"):
        out = public(backend)(*(t.detach().requires_grad_() for t in args))
        name = (out[0] if isinstance(out, tuple) else out).grad_fn.name()
        assert (name == f"{function}Backward") == (backend == "triton"), (op, backend, name)
    assert_paths_agree(public("triton"), public("torch"), args, KERNEL_TOL[torch.float32], what=op)


def triton_check_rms_norm_and_layer_norm():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, w_dtype, bias in (((3, 5, 37), dtype, True), ((7, 100), torch.float32, False)):
            x, w = (3 * torch.randn(shape) + 1).to(dtype), 1 + torch.randn(shape[-1]) / 4
            b = torch.randn(shape[-1]).to(dtype) if bias else None
            assert_paths_agree(kernels.rms_norm_triton, kernels.rms_norm_torch, [x, w.to(w_dtype), 1e-6],
                               KERNEL_TOL[dtype], what=f"rms_norm {shape} {dtype} weight {w_dtype}")
            assert_paths_agree(kernels.layer_norm_triton, kernels.layer_norm_torch, [x, w.to(dtype), b, 1e-5],
                               KERNEL_TOL[dtype], what=f"layer_norm {shape} {dtype} bias={bias}")
    x, w, b = torch.randn(37, 6).t(), torch.randn(37), torch.randn(37)  # a non-contiguous x (6, 37)
    assert_public_op_takes_triton("rms_norm", "RMSNormTriton", x, w, eps=1e-5)
    assert_public_op_takes_triton("layer_norm", "LayerNormTriton", x, w, b, eps=1e-5)


def triton_check_rope():
    torch.manual_seed(0)
    B, T, H = 2, 7, 3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cos, sin = kernels_rope_tables(T, 12)
        q, k = torch.randn(B, T, H, 12).to(dtype), torch.randn(B, T, 1, 12).to(dtype)  # one k head (MQA)
        assert_paths_agree(lambda q, k: kernels.rope_triton(q, k, cos, sin),
                           lambda q, k: kernels.rope_torch(q, k, cos, sin), [q, k], KERNEL_TOL[dtype], what=dtype)
        # q and k as non-contiguous views into one fused projection, 2 k heads (GQA), D/2 = 10 not a power of 2
        cos, sin = kernels_rope_tables(T, 20)
        qkv = torch.randn(B, T, (H + 2 * 2) * 20).to(dtype)
        def views(rope):  # q and k: the first two parts of qkv, seen as (B, T, heads, 20)
            return lambda qkv: rope(*[t.unflatten(-1, (-1, 20)) for t in qkv.split([H * 20, 40, 40], -1)[:2]], cos, sin)

        assert_paths_agree(views(kernels.rope_triton), views(kernels.rope_torch), [qkv], KERNEL_TOL[dtype], what=dtype)
    q, k = torch.randn(B, T, 20, 4).transpose(2, 3), torch.randn(B, T, 2, 20)  # q not contiguous
    assert_public_op_takes_triton("rope", "RoPETriton", q, k, cos=cos, sin=sin)


def triton_check_swiglu_and_gelu_tanh():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g, u = (3 * torch.randn(3, 5, 37)).to(dtype), torch.randn(3, 5, 37).to(dtype)
        assert_paths_agree(kernels.swiglu_triton, kernels.swiglu_torch, [g, u], KERNEL_TOL[dtype], what=dtype)
        h = torch.randn(5, 2 * 211).to(dtype)  # gate and up as the two halves of one matmul's output: views
        assert_paths_agree(lambda h: kernels.swiglu_triton(*h.chunk(2, -1)),
                           lambda h: kernels.swiglu_torch(*h.chunk(2, -1)), [h], KERNEL_TOL[dtype], what=dtype)
        assert_paths_agree(kernels.gelu_tanh_triton, kernels.gelu_tanh_torch, [g], KERNEL_TOL[dtype], what=dtype)
    big = torch.tensor([-1e30, -1e4, -30.0, -10.0, 10.0, 30.0, 1e4, 1e30])  # finite gradients: no inf * 0
    with np.errstate(over="ignore"):  # the interpreter's exp(-u) = inf, on purpose: sigmoid(u) = 0
        assert_paths_agree(kernels.gelu_tanh_triton, kernels.gelu_tanh_torch, [big], KERNEL_TOL[torch.float32])
        assert_public_op_takes_triton("gelu_tanh", "GELUTanhTriton", g.float().transpose(0, 2))
    assert_public_op_takes_triton("swiglu", "SwiGLUTriton", g.float().transpose(0, 2), u.float().transpose(0, 2))


def assert_flash_equals_torch(B, H, Hk, T, S, D, causal, dtype=torch.float32, blocks=(None, None), scale=None,
                              tol=KERNEL_TOL[torch.float32]):
    """FlashAttention (given tile sizes) against attention_torch; q, k, v and the upstream gradient as the models
    pass them, (B, T, H, D) buffers seen as (B, H, T, D): not contiguous. fp16/bf16 against the torch path in fp32
    on the same rounded inputs."""
    g = torch.Generator().manual_seed(T * 1000 + D * 10 + Hk)
    q, do = (torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(B, S, Hk, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    sm_scale = 1 / math.sqrt(D) if scale is None else scale
    assert_paths_agree(lambda q, k, v: kernels.FlashAttention.apply(q, k, v, causal, sm_scale, *blocks),
                       lambda q, k, v: kernels.attention_torch(q.float(), k.float(), v.float(), causal,
                                                               scale=scale).to(dtype),
                       [q, k, v], tol, grad_outputs=[do], what=f"{B, H, Hk, T, S, D} causal={causal} {dtype}")


def triton_check_attention_fp32():
    for Hk in (4, 2, 1):  # H / Hk = 1, 2 and n_head
        for causal in (True, False):
            # 32 x 32 tiles: T = 37 is 2 query and 2 key blocks, the second ragged; causal skips one
            assert_flash_equals_torch(2, 4, Hk, 37, 37, 12, causal, blocks=(32, 32))
    assert_flash_equals_torch(1, 4, 2, 37, 37, 64, True)  # the GPU's 64 x 64 tiles, one ragged block
    assert_flash_equals_torch(1, 4, 2, 37, 37, 64, True, blocks=(16, 32))  # BLOCK_M != BLOCK_N, either way
    assert_flash_equals_torch(1, 2, 2, 37, 37, 40, True, blocks=(32, 16), scale=0.3)
    for T, S in ((21, 37), (37, 21)):  # T != S: causal top-left aligned, as SDPA
        for causal in (True, False):
            assert_flash_equals_torch(1, 2, 1, T, S, 12, causal, blocks=(16, 16), scale=0.3)


def triton_check_attention_half_precision_and_limits():
    for D in (12, 64):  # fp16 dots, P and dS rounded to fp16, fp32 accumulation
        for causal in (True, False):
            assert_flash_equals_torch(1, 4, 2, 37, 37, D, causal, torch.float16, tol=dict(rtol=1e-2, atol=1e-2))
    for causal in (True, False):
        assert_flash_equals_torch(1, 4, 1, 37, 37, 40, causal, torch.bfloat16, tol=dict(rtol=3e-2, atol=3e-2))
    assert_flash_equals_torch(1, 2, 1, 37, 37, 256, True)  # D = 256: 32 x 32 tiles
    cfg = kernels._attn_config
    assert cfg(64, torch.bfloat16)["BLOCK_M"] == 64 and cfg(12, torch.float32)["BLOCK_D"] == 16
    assert cfg(256, torch.float16)["BLOCK_M"] == 32 and cfg(256, torch.float16)["BLOCK_D"] == 256
    big = torch.randn(1, 2, 5, 264)
    with pytest.raises(ValueError, match="D <= 256"):
        kernels.attention_triton(big, big, big, True)
    for args in ((big, big, big), (big[..., :8],) * 3 + (True, 0.1)):  # D > 256 or dropout: the torch path runs
        assert under_backend("triton", kernels.attention)(*args).shape == args[0].shape
    q, k, v = torch.randn(1, 4, 37, 12), torch.randn(1, 2, 37, 12), torch.randn(1, 2, 37, 12)  # contiguous
    assert_public_op_takes_triton("attention", "FlashAttention", q, k, v, causal=False, scale=0.3)
    grads = []  # a stride-0 upstream gradient (o.sum())
    for f in (kernels.attention_triton, kernels.attention_torch):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        grads.append(torch.autograd.grad(f(*qkv, True).sum(), qkv))
    assert_all_close(*grads, **KERNEL_TOL[torch.float32])


def triton_check_cross_entropy_rows():
    logits = torch.randn(6, LCE_V, generator=torch.Generator().manual_seed(2)) * 4
    targets, scale = torch.tensor([0, 36, -1, 17, 5, -1]), torch.tensor(0.25)
    for need_grad in (True, False):  # block_v=16 over V=37: three blocks, the last ragged
        got, want = logits.clone(), logits.clone()  # with need_grad, overwritten by the gradient
        assert_all_close([kernels._cross_entropy_rows_triton(got, targets, -1, scale, need_grad, block_v=16),
                          *[got] * need_grad],
                         [kernels._cross_entropy_rows_torch(want, targets, -1, scale, need_grad), *[want] * need_grad],
                         rtol=1e-5, atol=1e-6)


def triton_check_linear_cross_entropy():
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.float16, dict(rtol=1e-2, atol=2e-3)),
                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))):
        x, weight, targets = lce_inputs(dtype=dtype)
        assert_all_close(*(lce_loss_and_grads(fn, x, weight, targets, chunk_size=5)
                           for fn in (kernels.linear_cross_entropy_triton, kernels.linear_cross_entropy_torch)), **tol)
    x, weight, targets = lce_inputs((2, 9), n_ignored=0)  # the default chunk, (B, T, C), every token counted
    assert_all_close(*(lce_loss_and_grads(fn, x, weight, targets)
                       for fn in (kernels.linear_cross_entropy_triton, lce_reference)), rtol=1e-5, atol=1e-6)
    x, weight, targets = lce_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 parameters, bf16 matmuls
        assert_all_close(*(lce_loss_and_grads(fn, x, weight, targets, chunk_size=5)
                           for fn in (kernels.linear_cross_entropy_triton, kernels.linear_cross_entropy_torch)),
                         rtol=1e-5, atol=1e-6)
    x, weight, targets = lce_inputs(n_ignored=19)  # no counted token: NaN and zero gradients
    got = lce_loss_and_grads(kernels.linear_cross_entropy_triton, x, weight, targets, chunk_size=8)
    assert got[0].isnan() and not got[1].any() and not got[2].any()
    x, weight, targets = lce_inputs()
    x.requires_grad_(False)  # the weight's gradient only
    torch.testing.assert_close(*(torch.autograd.grad(fn(x, weight, targets), weight)[0]
                                 for fn in (kernels.linear_cross_entropy_triton, lce_reference)), rtol=1e-5, atol=1e-6)
    head, rows, calls = torch.nn.Linear(LCE_C, LCE_V, bias=False), kernels._cross_entropy_rows_triton, []
    kernels._cross_entropy_rows_triton = lambda *args: calls.append(1) or rows(*args)  # counts the kernel's calls
    try:
        loss = under_backend("triton", kernels.linear_cross_entropy)(x, head, targets)
    finally:
        kernels._cross_entropy_rows_triton = rows
    assert calls and torch.allclose(loss, lce_reference(x, head.weight, targets), rtol=1e-5, atol=1e-6)


def triton_check_linear_scan():
    def inputs(a_shape, b_shape, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = (0.5 + 0.5 * torch.rand(a_shape, generator=g)).to(dtype)  # decays in (0.5, 1], like exp(dt A)
        return a, torch.randn(b_shape, generator=g).to(dtype), torch.randn(b_shape, generator=g).to(dtype)

    for a_shape, b_shape in [((2, 13, 3, 1, 4), (2, 13, 3, 5, 4)),  # selective_scan's broadcast, R = 60 < BLOCK
                             ((2, 13, 3, 5, 4), (2, 13, 3, 5, 4)),  # no broadcast
                             ((1, 9, 1, 131), (2, 9, 2, 131)),      # broadcast over the batch, R = 262: ragged
                             ((3, 1, 7), (3, 1, 7)), ((2, 6), (2, 6))]:  # T = 1; no rest dims
        a, b, dh = inputs(a_shape, b_shape)
        assert_paths_agree(kernels.linear_scan_triton, kernels.linear_scan_torch, [a, b], KERNEL_TOL[torch.float32],
                           grad_outputs=[dh], what=(a_shape, b_shape))
    # a a non-contiguous view (time-major storage), b transposed, the upstream gradient expanded: strides
    a, b, dh = inputs((13, 2, 3, 1, 4), (2, 3, 13, 5, 4))
    a, b = a.transpose(0, 1), b.permute(0, 2, 1, 3, 4)  # (2, 13, 3, 1, 4), (2, 13, 3, 5, 4)
    dh = dh[:, :1].permute(0, 2, 1, 3, 4).expand(b.shape)
    assert_paths_agree(kernels.linear_scan_triton, kernels.linear_scan_torch, [a, b], KERNEL_TOL[torch.float32],
                       grad_outputs=[dh], what="strided")
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 2e-2)):  # fp32 math inside: the torch path in fp32
        a, b, dh = inputs((2, 13, 3, 1, 4), (2, 13, 3, 5, 4), dtype)
        assert_paths_agree(kernels.linear_scan_triton,
                           lambda a, b: kernels.linear_scan_torch(a.float(), b.float()).to(dtype), [a, b],
                           dict(rtol=tol, atol=tol), grad_outputs=[dh], what=dtype)
    assert_public_op_takes_triton("linear_scan", "LinearScanTriton", *inputs((2, 5, 1, 3), (2, 5, 2, 3))[:2])


TRITON_CHECKS = {"norms": ["triton_check_rms_norm_and_layer_norm"],
                 "rope_swiglu_gelu": ["triton_check_rope", "triton_check_swiglu_and_gelu_tanh"],
                 "attention": ["triton_check_attention_fp32", "triton_check_attention_half_precision_and_limits"],
                 "linear_cross_entropy": ["triton_check_cross_entropy_rows", "triton_check_linear_cross_entropy"],
                 "linear_scan": ["triton_check_linear_scan"]}


def run_triton_checks(group):
    """The group's checks, in a process started with TRITON_INTERPRET=1 (below)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Python starts"
    for name in TRITON_CHECKS[group]:
        globals()[name]()


@pytest.mark.parametrize("group", sorted(TRITON_CHECKS))
@pytest.mark.interpreted("run_triton_checks({group!r})")
def test_triton_kernels_equal_torch_paths(group, interpreted):
    """Each op's Triton kernels (forward and backward, in Triton's interpreter on the CPU, in a subprocess) against
    its torch path: outputs and every gradient, fp32 to 1e-5, fp16/bf16 to their stated tolerances, odd shapes and
    small tiles (ragged blocks), non-contiguous inputs, GQA, and the public ops' dispatch to them."""
    interpreted()


def interpreted_call(item):
    """The test_all call a test marked @pytest.mark.interpreted(call) runs in Triton's interpreter, its parameters
    filled in."""
    marker = item.get_closest_marker("interpreted")
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return marker.args[0].format(**params) if marker else None


def interpreted_worker(out_dir, calls):
    """Runs in the background process (TRITON_INTERPRET=1): each call in turn, its outcome (ok, or the traceback)
    written to out_dir/<index>.json as soon as it is known."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Python starts"
    import traceback
    for i, call in enumerate(calls):
        try:
            eval(call, globals())
            outcome = dict(ok=True, error="")
        except BaseException:  # noqa: BLE001 (an assertion or a crash: reported by the test that asked)
            outcome = dict(ok=False, error=traceback.format_exc())
        with open(os.path.join(out_dir, f"{i}.tmp"), "w") as f:
            json.dump(outcome, f)
        os.replace(os.path.join(out_dir, f"{i}.tmp"), os.path.join(out_dir, f"{i}.json"))  # whole, or not there


class InterpretedChecks:
    """Triton's interpreter runs on one core for a couple of minutes in all; the rest of the suite leaves the second
    core half idle. So the selected interpreted checks start in one background process (one import of torch and
    triton) when the session starts, and each marked test waits for its own outcome."""

    def __init__(self, calls, out_dir):
        self.calls, self.out_dir = calls, out_dir
        with open(os.path.join(out_dir, "calls.json"), "w") as f:
            json.dump(calls, f)
        self.log = open(os.path.join(out_dir, "output.txt"), "w")
        code = f"import json, test_all; test_all.interpreted_worker({out_dir!r}, json.load(open({out_dir!r} + '/calls.json')))"
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def outcome(self, call, timeout=900):
        path = os.path.join(self.out_dir, f"{self.calls.index(call)}.json")
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None and not os.path.exists(path):  # died before writing it
                self.log.flush()
                return dict(ok=False, error=f"the interpreter's process exited ({self.proc.returncode}) before this "
                                            f"call's outcome; its output:\n{open(self.log.name).read()[-5000:]}")
            assert time.monotonic() < deadline, f"{call} gave no outcome in {timeout} s"
            time.sleep(0.2)
        with open(path) as f:
            return json.load(f)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session", autouse=True)
def interpreted_checks(request, tmp_path_factory):
    calls = [c for c in map(interpreted_call, request.session.items) if c]
    if not calls or importlib.util.find_spec("triton") is None:
        yield None
        return
    checks = InterpretedChecks(calls, str(tmp_path_factory.mktemp("interpreted")))
    yield checks
    checks.close()


@pytest.fixture
def interpreted(request, interpreted_checks):
    """interpreted(): waits for this test's interpreted call in the background process; fails with its traceback."""
    pytest.importorskip("triton")
    call = interpreted_call(request.node)

    def check():
        outcome = interpreted_checks.outcome(call)
        assert outcome["ok"], f"{call} failed in Triton's interpreter:\n{outcome['error']}"
    return check


# ------------------------------------------------------------------------------------- kernels.py in every model

# one layer each: Triton's interpreter costs about a millisecond per program instance
KERNEL_MODELS = {"gpt2": lambda: tiny_gpt2(n_layer=1), "llama": lambda: tiny_llama(n_layer=1),
                 "moe": lambda: tiny_moe(n_layer=1), "mla": lambda: tiny_mla(n_layer=1),
                 "mamba": lambda: tiny_mamba(variant="mamba2", n_layer=1),
                 "mamba1": lambda: tiny_mamba(variant="mamba1", n_layer=1),
                 "speedrun": lambda: tiny_speedrun(n_layer=1)}
# the Triton autograd Functions each model's training graph must hold when the Triton path runs
KERNEL_FUNCTIONS = {"gpt2": {"LayerNormTriton", "GELUTanhTriton", "FlashAttention", "LinearCrossEntropy"},
                    "llama": {"RMSNormTriton", "RoPETriton", "SwiGLUTriton", "FlashAttention", "LinearCrossEntropy"},
                    "moe": {"RMSNormTriton", "RoPETriton", "SwiGLUTriton", "FlashAttention", "LinearCrossEntropy"},
                    "mla": {"RMSNormTriton", "RoPETriton", "SwiGLUTriton", "LinearCrossEntropy"},
                    "mamba": {"RMSNormTriton", "LinearCrossEntropy"},
                    "mamba1": {"RMSNormTriton", "LinearScanTriton", "LinearCrossEntropy"},
                    "speedrun": {"RoPETriton", "FlashAttention"}}  # its norms have no gain; soft-capped logits


def autograd_functions(tensor):
    """The names of the autograd nodes behind tensor, without the 'Backward' suffix."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {fn.name().removesuffix("Backward") for fn in seen}


def kernels_training_losses(name, backend, steps=20):
    """The losses of `steps` AdamW steps of the tiny `name` model on one random batch (the loss alone, as train.py
    asks for it), under kernels.set_backend(backend); and the autograd functions of the first step."""
    previous = kernels.set_backend(backend)
    try:
        torch.manual_seed(0)
        model = KERNEL_MODELS[name]()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
        losses, functions = [], None
        for _ in range(steps):
            _, loss = model(idx[:, :-1], idx[:, 1:], need_logits=False)
            functions = functions or autograd_functions(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        kernels.set_backend(previous)
    return losses, functions


def triton_check_training(name):
    """Run in Triton's interpreter (below): the Triton path trains like the torch path."""
    want, plain = kernels_training_losses(name, "torch")
    got, fused = kernels_training_losses(name, "triton")
    assert not any(f.endswith("Triton") or f == "FlashAttention" for f in plain), plain
    assert KERNEL_FUNCTIONS[name] <= fused, (name, KERNEL_FUNCTIONS[name] - fused)
    # fp32: the ops agree to ~1e-6; 20 AdamW steps at lr 1e-2 amplify that a little
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert want[-1] < want[0] - 1.0  # and it learns the batch


@pytest.mark.parametrize("name", sorted(KERNEL_MODELS))
@pytest.mark.interpreted("triton_check_training({name!r})")
def test_every_model_trains_the_same_with_triton_kernels(name, interpreted):
    """Every text model, 20 steps from one seed with kernels=torch and with the Triton kernels (forward and
    backward, in Triton's interpreter on the CPU, in a subprocess): the same losses within fp32 rounding, and the
    Triton run's graph holds the model's Triton functions (so the dispatch took them)."""
    interpreted()


if __name__ == "__main__":
    # pytest exits 5 when it collects no test: that is a failure here, never a silent pass
    code = pytest.main([__file__, "-q", *sys.argv[1:]])
    sys.exit(1 if code == pytest.ExitCode.NO_TESTS_COLLECTED else int(code))
