"""
Text -> tokens, cached. A .txt file or a folder of .txt files is tokenized once (GPT-2 BPE via tiktoken,
or raw UTF-8 bytes) into a uint16 memmap keyed by the content's hash and the tokenizer, so a second
run on the same data starts at once. With no data given, gaia trains on Python's own documentation
(pydoc_data.topics, shipped with every CPython, tables dropped), so `python train.py` needs no download.
"""
import glob
import hashlib
import json
import os
import re

import numpy as np
import torch


class DataError(ValueError):
    """Missing, empty or unreadable data; its message says what to change."""


# ------------------------------------------------------------------------------------------ tokenizers

class ByteTokenizer:
    name, vocab_size, eot = "byte", 256, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache
            raise DataError(f"could not load the GPT-2 BPE ({type(e).__name__}: {e}); it downloads once, so connect "
                            f"to the internet, point TIKTOKEN_CACHE_DIR at a folder holding its files, "
                            f"or use --tokenizer=byte") from None
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot = self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A local Hugging Face tokenizer (the `tokenizers` package): a tokenizer.json, or a model directory holding
    one, so a Llama or SmolLM directory is fine-tuned and sampled with the tokenizer it was trained with."""

    END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")  # common end-of-document names

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(f"tokenizer={path!r} is a folder without a tokenizer.json; point --tokenizer at a "
                            f"tokenizer.json, or use gpt2 or byte")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("--tokenizer=PATH needs the tokenizers package: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust library raises its own exception type on a bad file
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({e}); point --tokenizer at one") from None
        with open(file, "rb") as f:
            self.name = "hf-" + hashlib.sha256(f.read()).hexdigest()[:12]  # the token cache is keyed by the file's content
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = None
        config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    eos = json.load(f).get("eos_token")
            except ValueError as e:
                raise DataError(f"{config} is not valid JSON ({e}); fix or remove it") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
        ids = [self.tok.token_to_id(t) for t in ([eos] if eos else []) + list(self.END_TOKENS)]
        self.eot = next((i for i in ids if i is not None), None)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def get_tokenizer(name):
    """gpt2 (tiktoken BPE), byte (UTF-8 bytes), or a path: a tokenizer.json or a Hugging Face directory holding one."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if os.path.exists(name):
        return HFTokenizer(name)
    raise DataError(f"unknown tokenizer {name!r}; use --tokenizer=gpt2, --tokenizer=byte, or the path of a "
                    f"tokenizer.json (or of a Hugging Face model directory holding one)")


def token_dtype(vocab_size):
    """uint16 holds ids below 65536 (GPT-2's 50257); larger vocabularies (Llama 3's 128256) need uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ------------------------------------------------------------------------------------------ corpus

def builtin_corpus():
    """Python's documentation topics, shipped with CPython: 405 KB of English prose with some code. Its ASCII tables
    and rules are dropped and its indentation and runs of spaces folded, so a small byte-level model spends its
    few minutes on words rather than on drawing table borders."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    lines = [re.sub(r" {2,}", " ", line.strip()) for line in text.split("\n")
             if not re.match(r"\s*[+|]", line) and not re.search(r"---|===|\*\*\*", line)]
    return [("pydoc_data.topics", re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).encode("utf-8"))]


def read_corpus(path):
    """[(name, bytes)] of a .txt file or of every .txt file below a folder (sorted, so the order is stable)."""
    if not path:
        return builtin_corpus()
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist; pass --data=FILE.txt or --data=FOLDER of .txt files")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise DataError(f"folder {path!r} holds no .txt files; put your text in .txt files there")
    else:
        files = [path]
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if not raw.strip():
            raise DataError(f"data file {f!r} is empty; give it some text or remove it")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data file {f!r} is not UTF-8 text (bad byte at offset {e.start}); "
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {f} > fixed.txt") from None
        docs.append((f, raw))
    return docs


def tokenize_to_cache(docs, tokenizer, cache_dir, chunk_bytes=1 << 20):
    """Tokenize docs into {cache_dir}/{hash}-{tokenizer}.bin (uint16, or uint32 for large vocabularies) once; later
    calls reuse it. Returns (path, number of tokens)."""
    h = hashlib.sha256()
    for name, raw in docs:
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    key = f"{h.hexdigest()[:20]}-{tokenizer.name}"
    path = os.path.join(cache_dir, key + ".bin")
    dtype = token_dtype(tokenizer.vocab_size)
    if os.path.exists(path):
        return path, os.path.getsize(path) // np.dtype(dtype).itemsize
    try:
        return write_token_cache(docs, tokenizer, path, dtype, chunk_bytes)
    except OSError as e:
        raise DataError(f"cannot write the token cache {path} ({e.strerror}); point --cache_dir at a writable folder") from None


def write_token_cache(docs, tokenizer, path, dtype, chunk_bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    total = sum(len(raw) for _, raw in docs)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({tokenizer.name})", disable=total < (8 << 20))
    tmp = f"{path}.{os.getpid()}.tmp"
    n = 0
    with open(tmp, "wb") as out:
        for _, raw in docs:
            text = raw.decode("utf-8")
            # ~1 MB chunks that end after a newline (so no word is cut), encoded 16 at a time on tiktoken's threads
            chunks, start = [], 0
            while start < len(text):
                end = text.find("\n", start + chunk_bytes)
                end = len(text) if end < 0 else end + 1
                chunks.append(text[start:end])
                start = end
            for i in range(0, len(chunks), 16):
                batch = chunks[i:i + 16]
                ids = [t for ids in tokenizer.encode_batch(batch) for t in ids]
                np.asarray(ids, dtype=dtype).tofile(out)
                n += len(ids)
                bar.update(sum(len(c.encode("utf-8")) for c in batch))
            if tokenizer.eot is not None:  # documents are separated by <|endoftext|>, as in GPT-2's training
                np.asarray([tokenizer.eot], dtype=dtype).tofile(out)
                n += 1
    bar.close()
    os.replace(tmp, path)  # atomic: a crash mid-way leaves no half-written cache behind
    return path, n


class Batches:
    """Random windows of block_size + 1 tokens from one split, drawn with their own torch.Generator:
    its state is the data position, saved in checkpoints so a resumed run draws the same batches.
    A model file that brings its own data defines a Batches of the same shape (README: the model contract)."""

    def __init__(self, tokens, block_size, batch_size, seed, rank=0, world=1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.position = self.generator.get_state()

    def next(self):
        """(x, y) on the CPU: inputs and their next-token targets, (batch_size, block_size) int64 each."""
        T = self.block_size
        self.position = self.generator.get_state()  # the state that draws this batch: what a checkpoint stores
        # every data-parallel rank draws the global batch and keeps its slice: the global batch, and so the
        # training run, is the same for any number of ranks (and a checkpoint resumes on any world size)
        starts = torch.randint(len(self.tokens) - T, (self.batch_size * self.world,), generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        window = torch.from_numpy(np.stack([self.tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def seek(self, position):
        """The next next() draws the batch that position drew."""
        self.generator.set_state(position)
        self.position = position


def load_splits(path, tokenizer, cache_dir, block_size, val_fraction=0.1):
    """(train tokens, val tokens) as memmaps, the last val_fraction of the corpus held out."""
    file, n = tokenize_to_cache(read_corpus(path), tokenizer, cache_dir)
    tokens = np.memmap(file, dtype=token_dtype(tokenizer.vocab_size), mode="r")
    split = int(n * (1 - val_fraction))
    train, val = tokens[:split], tokens[split:]
    for name, part in (("train", train), ("val", val)):
        if len(part) < block_size + 1:
            raise DataError(f"the {name} split has {len(part)} tokens, fewer than block_size+1={block_size + 1} "
                            f"({n} tokens in all from {path or 'the built-in corpus'}); "
                            f"add data or lower --block_size")
    return train, val
