"""
Sample text from a trained gaia model or a local Hugging Face model directory.

    python sample.py --out_dir=out --prompt="Once upon a time"
    python sample.py --out_dir=out --prompt=FILE:prompt.txt --num_samples=3 --max_new_tokens=300
    python sample.py --init_from=path/to/hf_llama --model=llama --prompt="Hello"   # the directory's own tokenizer
    python sample.py --out_dir=out --image=shapes.png --prompt="what colour is the circle?"  # a vision-language model

A model file that brings its own data and generates (vlm.py) answers a question (--prompt) about an image file
(--image) through its module's answer_image(); it needs no tokenizer from here (its own is in its config).
"""
import contextlib
import os
from dataclasses import dataclass

import torch

import configurator
from configurator import ConfigError
from data import get_tokenizer
from train import (brings_own_data, cli, device_rules, device_type, hf_dir_tokenizer, load_checkpoint, load_model_module,
                   load_pretrained, model_from_checkpoint, pick_device, pick_dtype, sampling_rules)


@dataclass
class SampleConfig:
    out_dir: str = "out"            # a training run's folder (ckpt.pt inside)
    init_from: str = "resume"       # resume (from out_dir) | a local Hugging Face model directory
    model: str = "gpt2"             # model file, for init_from=HF directory
    tokenizer: str = ""             # "" = the one the model was trained with (an HF directory's tokenizer.json) | gpt2 | byte | PATH
    prompt: str = "\n"              # text, or FILE:path to read it from a file (for --image: the question)
    image: str = ""                 # an image file, for a model that reads images (vlm): it answers --prompt about it
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
    """(model, its module, tokenizer name) from a run's checkpoint or a Hugging Face directory. The tokenizer name is
    None for a model that brings its own data (its tokenizer is its own)."""
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(cfg.out_dir)
        if cfg.tokenizer and cfg.tokenizer != ckpt["tokenizer"]:  # other ids than the model was trained on
            raise ConfigError(f"{ckpt['path']} was trained with tokenizer={ckpt['tokenizer']!r}, not {cfg.tokenizer!r}; "
                              f"drop --tokenizer")
        module = text_model(ckpt["model_name"], cfg)
        return model_from_checkpoint(ckpt, module, cfg.out_dir), module, ckpt["tokenizer"]
    module = text_model(cfg.model, cfg)
    model = load_pretrained(module, cfg.init_from)
    return model, module, None if brings_own_data(module) else cfg.tokenizer or hf_dir_tokenizer(cfg.init_from)


def read_prompt(prompt):
    """--prompt's text, or the text of the file it names (FILE:path)."""
    if not prompt.startswith("FILE:"):
        return prompt
    try:
        with open(prompt[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the prompt file {prompt[5:]!r} ({e.strerror}); check --prompt=FILE:path") from None


def answer_images(cfg, model, module, name, autocast):
    """A model that brings its own data and generates (vlm): its answers to --prompt about the --image file."""
    if not cfg.image:
        raise ConfigError(f"{name} answers questions about an image: pass --image=PATH (an image file) and "
                          f"--prompt=QUESTION")
    if not os.path.isfile(cfg.image):
        raise ConfigError(f"--image={cfg.image!r} is not a file; pass --image=PATH of an image (PNG, JPEG, ...)")
    answer_image = getattr(module, "answer_image", None)
    if not callable(answer_image):
        raise ConfigError(f"{name}.py has no answer_image(model, path, question, ...), so sample.py cannot ask it "
                          f"about an image")
    model.eval()
    question = read_prompt(cfg.prompt)
    for _ in range(cfg.num_samples):
        try:
            with autocast or contextlib.nullcontext():
                print(answer_image(model, cfg.image, question, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p))
        except OSError as e:  # PIL cannot read it (UnidentifiedImageError is an OSError)
            raise ConfigError(f"cannot read the image {cfg.image!r} ({e}); pass --image=PATH of an image file") from None
        except ValueError as e:  # e.g. a question that fills the model's context
            raise ConfigError(str(e)) from None
        print("---------------")


def run(argv):
    cfg = configurator.parse(argv, SampleConfig, "sample.py")
    if cfg is None:
        return
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, module, tokenizer_name = load(cfg)
    name = module.__name__
    autocast = torch.autocast(device_type(device), dtype=getattr(torch, dtype)) if dtype != "float32" else None
    if brings_own_data(module):  # it has generate (text_model checked): it answers about an image, no text tokenizer
        model.to(device)
        return answer_images(cfg, model, module, name, autocast)
    if cfg.image:
        raise ConfigError(f"--image means nothing for {name}: it reads text only; drop --image")
    tokenizer = get_tokenizer(tokenizer_name)
    vocab = getattr(model.config, "vocab_size", tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:  # its ids would index past the model's embedding
        raise ConfigError(f"the {tokenizer_name} tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                          f"is {vocab}; pass the tokenizer the model was trained with")
    model.to(device)
    prompt = read_prompt(cfg.prompt)
    for _ in range(cfg.num_samples):
        print(generate_text(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                            device, autocast))
        print("---------------")


def main(argv=None):
    cli(run, argv)


if __name__ == "__main__":
    main()
