"""
Export a gaia checkpoint to a Hugging Face directory that transformers loads (config.json + model.safetensors,
plus the run's tokenizer.json when it was trained with one; a byte or GPT-2 BPE run is recorded in config.json
as gaia_tokenizer, which train.py and sample.py read back):

    python export.py --out_dir=out --hf_dir=out/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf')"
"""
import json
import os
import shutil
from dataclasses import dataclass

import configurator
from configurator import ConfigError
from train import cli, load_checkpoint, load_model_module, model_from_checkpoint


@dataclass
class ExportConfig:
    out_dir: str = "out"   # the training run's folder (ckpt.pt inside)
    hf_dir: str = ""       # where to write the Hugging Face directory; "" = out_dir/hf


def run(argv):
    cfg = configurator.parse(argv, ExportConfig, "export.py")
    if cfg is None:
        return
    ckpt = load_checkpoint(cfg.out_dir)
    model = model_from_checkpoint(ckpt, load_model_module(ckpt["model_name"]), cfg.out_dir)
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"{ckpt['model_name']}.py has no Hugging Face interop (no save_pretrained), so there is "
                          f"nothing to export; {ckpt['path']} is the model: python sample.py --out_dir={cfg.out_dir}")
    hf_dir = cfg.hf_dir or os.path.join(cfg.out_dir, "hf")
    try:
        model.save_pretrained(hf_dir)
    except OSError as e:
        raise ConfigError(f"cannot write hf_dir={hf_dir!r} ({e.strerror}); point --hf_dir at a writable folder") from None
    except ValueError as e:  # a setting the Hugging Face architecture cannot express: the model file says which
        raise ConfigError(f"{ckpt['model_name']} cannot be exported to Hugging Face: {e}") from None
    tokenizer = ckpt["tokenizer"]
    if tokenizer is None:  # a model that brings its own data (images): no token ids to record
        print(f"wrote {ckpt['model_name']} (iter {ckpt['iter_num']}) to {hf_dir}")
        return
    source = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
    if os.path.isfile(source):  # a Hugging Face tokenizer travels with the weights
        shutil.copy(source, os.path.join(hf_dir, "tokenizer.json"))
    else:  # byte or gpt2: transformers ignores the key; gaia reads it back
        with open(os.path.join(hf_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump({**config, "gaia_tokenizer": tokenizer}, f, indent=2)
    print(f"wrote {ckpt['model_name']} (iter {ckpt['iter_num']}) to {hf_dir}; tokenizer: {tokenizer}")


def main(argv=None):
    cli(run, argv)


if __name__ == "__main__":
    main()
