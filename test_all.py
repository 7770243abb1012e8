"""
Every gaia test. `python test_all.py` runs them (pytest underneath); extra arguments go to pytest,
e.g. `python test_all.py -k llama -x`.

Each test checks behaviour against an independent reference: Hugging Face transformers holding the
same weights, a slow loop written here, or a formula; never against gaia's own output.
"""
import importlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


# ------------------------------------------------------------------------------------- shared helpers

def hf_roundtrip(module, hf_model, tmp_path, vocab_size, seq_len=24, atol=1e-4):
    """The reference model (random init, transformers) saved with save_pretrained must load into gaia's
    `module.Model` with logits within atol in fp32; gaia's save_pretrained must load back into
    transformers with the same logits. Returns gaia's model."""
    torch.manual_seed(0)
    hf_model = hf_model.float().eval()
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "gaia"
    hf_model.save_pretrained(hf_dir)
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


if __name__ == "__main__":
    # pytest exits 5 when it collects no test: that is a failure here, never a silent pass
    code = pytest.main([__file__, "-q", *sys.argv[1:]])
    sys.exit(1 if code == pytest.ExitCode.NO_TESTS_COLLECTED else int(code))
