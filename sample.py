"""
Sample text from a trained gaia model or a local Hugging Face model directory.

    python sample.py --out_dir=out --prompt="Once upon a time"
    python sample.py --out_dir=out --prompt=FILE:prompt.txt --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=path/to/hf_gpt2 --model=gpt2 --tokenizer=gpt2 --prompt="Hello"
"""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch

import configurator
from configurator import ConfigError
from data import DataError, get_tokenizer
from train import (TrainingError, device_type, load_checkpoint, load_model_module, model_from_checkpoint,
                   pick_device, pick_dtype)


@dataclass
class SampleConfig:
    out_dir: str = "out"            # a training run's folder (ckpt.pt inside)
    init_from: str = "resume"       # resume (from out_dir) | a local Hugging Face model directory
    model: str = "gpt2"             # model file, for init_from=HF directory
    tokenizer: str = ""             # "" = the one the checkpoint was trained with (gpt2 for HF directories)
    prompt: str = "\n"              # text, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8        # 0 = greedy
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"


@torch.no_grad()
def generate_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, device, autocast=None):
    """Decode max_new_tokens after prompt and return prompt + continuation as text."""
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eot or 0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast or contextlib.nullcontext():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return tokenizer.decode(out[0].tolist())


def main(argv):
    files, overrides = configurator.split_args(argv)
    table = configurator.key_table(SampleConfig)
    if "help" in overrides:
        configurator.print_help([("sample.py keys", table)])
        return
    values, _ = configurator.resolve(files, overrides, table)
    cfg = SampleConfig(**values)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(cfg.out_dir)
        model = model_from_checkpoint(ckpt, load_model_module(ckpt["model_name"]), cfg.out_dir)
        tokenizer_name = cfg.tokenizer or ckpt["tokenizer"]
    else:
        model = load_model_module(cfg.model).Model.from_pretrained(cfg.init_from)
        tokenizer_name = cfg.tokenizer or "gpt2"
    model.to(device)
    tokenizer = get_tokenizer(tokenizer_name)
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    autocast = torch.autocast(device_type(device), dtype=getattr(torch, dtype)) if dtype != "float32" else None
    for _ in range(cfg.num_samples):
        print(generate_text(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                            device, autocast))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
