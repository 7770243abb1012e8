"""
Sample text from a trained gaia model or a local Hugging Face model directory.

    python sample.py --out_dir=out --prompt="Once upon a time"
    python sample.py --out_dir=out --prompt=FILE:prompt.txt --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=path/to/hf_llama --model=llama --prompt="Hello"   # the directory's own tokenizer
"""
import contextlib
import os
from dataclasses import dataclass

import torch

import configurator
from configurator import ConfigError
from data import get_tokenizer
from train import (cli, device_rules, device_type, hf_dir_tokenizer, load_checkpoint, load_model_module, load_pretrained,
                   model_from_checkpoint, pick_device, pick_dtype, sampling_rules)


@dataclass
class SampleConfig:
    out_dir: str = "out"            # a training run's folder (ckpt.pt inside)
    init_from: str = "resume"       # resume (from out_dir) | a local Hugging Face model directory
    model: str = "gpt2"             # model file, for init_from=HF directory
    tokenizer: str = ""             # "" = the one the model was trained with (an HF directory's tokenizer.json) | gpt2 | byte | PATH
    prompt: str = "\n"              # text, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8        # 0 = greedy
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        configurator.check_ranges(self, {
            "num_samples": (self.num_samples >= 1, "must be >= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
            **device_rules(self),
            **sampling_rules(self),
        })


@torch.no_grad()
def generate_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, device, autocast=None):
    """Decode max_new_tokens after prompt and return prompt + continuation as text."""
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eot or 0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast or contextlib.nullcontext():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return tokenizer.decode(out[0].tolist())


def text_model(name, cfg):
    """The model file, if its Model generates text; a model without generate() (an image encoder) is refused."""
    module = load_model_module(name)
    if not callable(getattr(module.Model, "generate", None)):
        raise ConfigError(f"{name} does not generate text, so sample.py has nothing to sample; its training run draws "
                          f"its picture at the end ({os.path.join(cfg.out_dir, 'picture.png')})")
    return module


def load(cfg):
    """(model, tokenizer name) from a run's checkpoint or a Hugging Face directory."""
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(cfg.out_dir)
        if cfg.tokenizer and cfg.tokenizer != ckpt["tokenizer"]:  # other ids than the model was trained on
            raise ConfigError(f"{ckpt['path']} was trained with tokenizer={ckpt['tokenizer']!r}, not {cfg.tokenizer!r}; "
                              f"drop --tokenizer")
        return model_from_checkpoint(ckpt, text_model(ckpt["model_name"], cfg), cfg.out_dir), ckpt["tokenizer"]
    model = load_pretrained(text_model(cfg.model, cfg), cfg.init_from)
    return model, cfg.tokenizer or hf_dir_tokenizer(cfg.init_from)


def run(argv):
    cfg = configurator.parse(argv, SampleConfig, "sample.py")
    if cfg is None:
        return
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, tokenizer_name = load(cfg)
    tokenizer = get_tokenizer(tokenizer_name)
    vocab = getattr(model.config, "vocab_size", tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:  # its ids would index past the model's embedding
        raise ConfigError(f"the {tokenizer_name} tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"is {vocab}; pass the tokenizer the model was trained with")
    model.to(device)
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the prompt file {prompt[5:]!r} ({e.strerror}); check --prompt=FILE:path") from None
    autocast = torch.autocast(device_type(device), dtype=getattr(torch, dtype)) if dtype != "float32" else None
    for _ in range(cfg.num_samples):
        print(generate_text(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                            device, autocast))
        print("---------------")


def main(argv=None):
    cli(run, argv)


if __name__ == "__main__":
    main()
