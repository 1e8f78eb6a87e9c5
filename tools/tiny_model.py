"""A tiny LlamaForCausalLM directory built locally, with no hub access and no weights.

The tokenizer is a byte-level BPE trained on Python's own stdlib sources; ``config.json`` is
written by hand, so neither torch nor transformers is needed. vLLM serves it with
``--load-format dummy`` (random weights, so random text). All files sit at the top level, so
the directory doubles as a Hugging Face repo for a fake hub.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Bump when anything below changes what gets written: it is part of the build hash.
BUILDER_VERSION = 1
SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, END_ID = 0, 1, 2, 3, 7
MAX_CORPUS_FILES = 300
MARKER_NAME = "kvroute_build.json"

# `<s><|role|>content<|end|>\n ... <|assistant|>`; content may be a string or a list of
# {"type": "text"} parts (vLLM then detects the "openai" content format).
CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def model_config(vocab_size: int) -> dict[str, Any]:
    """config.json: head_dim 32 is the smallest head size vLLM's CPU attention accepts."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }


def default_corpus() -> list[Path]:
    """The first 300 top-level ``*.py`` files of this Python's stdlib, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))[:MAX_CORPUS_FILES]


def build_hash(vocab_size: int, corpus: Sequence[Path]) -> str:
    """Hash of everything the output depends on: builder version, vocab, tokenizers, corpus."""
    import tokenizers  # dev-only dependency: keep tools importable without it

    digest = hashlib.sha256()
    digest.update(f"{BUILDER_VERSION}|{vocab_size}|{tokenizers.__version__}".encode())
    for path in corpus:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def is_built(out_dir: Path, expected_hash: str) -> bool:
    """True when ``out_dir`` holds a build with this hash and its files are unchanged."""
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text())
        files: dict[str, str] = marker["files"]
        if marker["build_hash"] != expected_hash:
            return False
        return all(_file_sha256(out_dir / name) == sha for name, sha in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_tiny_model(
    out_dir: Path, *, vocab_size: int = 2048, corpus: Sequence[Path] | None = None
) -> Path:
    """Write the tiny model into ``out_dir`` (created) and return it; a no-op if already built.

    Deterministic for the same corpus, vocab size and ``tokenizers`` version. Files are written
    to a scratch folder first and moved in, the marker last, so a crash never looks finished.
    """
    out_dir = out_dir.expanduser().absolute()
    files = list(corpus) if corpus is not None else default_corpus()
    if not files:
        raise ValueError("no corpus files to train the tokenizer on")
    expected = build_hash(vocab_size, files)
    if is_built(out_dir, expected):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=out_dir.parent))
    try:
        _write_files(scratch, vocab_size, files)
        written = sorted(p.name for p in scratch.iterdir())
        for name in written:
            os.replace(scratch / name, out_dir / name)
        marker = {
            "build_hash": expected,
            "builder_version": BUILDER_VERSION,
            "files": {name: _file_sha256(out_dir / name) for name in written},
        }
        (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _write_files(folder: Path, vocab_size: int, corpus: Sequence[Path]) -> None:
    tokenizer = _train_tokenizer(vocab_size, corpus)
    (folder / "tokenizer.json").write_text(tokenizer + "\n")
    _write_json(folder / "config.json", model_config(vocab_size))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 4096,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": list(SPECIAL_TOKENS[4:]),
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "additional_special_tokens": list(SPECIAL_TOKENS[4:]),
        },
    )
    # <|end|> closes every turn, so it also stops generation, as in chat models.
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_ID], "pad_token_id": PAD_ID},
    )


def _train_tokenizer(vocab_size: int, corpus: Sequence[Path]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in corpus]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}")
    return str(tokenizer.to_str(pretty=True))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny local Llama model directory.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, vocab_size=args.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
