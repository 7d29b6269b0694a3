"""Tokenizers: train a byte-level BPE or a character tokenizer; save, load and hash them.

Both kinds are built with Hugging Face `tokenizers` and saved with `save_pretrained`, as a
directory that `transformers.AutoTokenizer.from_pretrained` loads as a fast tokenizer.

- `bpe`: byte-level BPE (GPT-2 style pre-tokenisation, no normaliser), so that
  `decode(encode(text)) == text` for any Unicode text. Special tokens `<|bos|>`, `<|eos|>`,
  `<|pad|>` (ids 0, 1, 2).
- `char`: one token per Unicode code point seen in the training text (sorted), plus
  `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|unk|>` (ids 0-3); characters not seen in training
  encode as `<|unk|>`, everything else round-trips exactly. `vocab_size` does not apply.

Encoding adds no special tokens; `wiola prepare` appends `<|eos|>` after each document. Both kinds
carry the default chat template of `wiola.data.chat` (`chat_template.jinja`).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

from wiola.errors import WiolaError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
HF_PREFIX = "hf:"


def train_tokenizer(texts: Iterable[str], kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 2, show_progress: bool = False) -> "PreTrainedTokenizerFast":
    """Train a tokenizer of `kind` on `texts` and return it as a transformers fast tokenizer.

    Args:
        texts: the training documents (iterated once).
        kind: `bpe` (byte-level BPE) or `char` (one token per character).
        vocab_size: target vocabulary size for `bpe`, special tokens included (at least 259).
        min_frequency: minimum count of a pair for a `bpe` merge.
        show_progress: show the `tokenizers` training progress bar.
    """
    counted = _Counting(texts)
    if kind == "bpe":
        backend = _train_bpe(counted, vocab_size, min_frequency, show_progress)
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    elif kind == "char":
        backend = _train_char(counted)
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    else:
        raise WiolaError(f"unknown tokenizer kind {kind!r}; use bpe or char")
    if counted.count == 0:
        raise WiolaError("no text to train the tokenizer on")
    from transformers import PreTrainedTokenizerFast

    from wiola.data.chat import CHAT_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE, **special)


class _Counting:
    """Wraps an iterable of texts and counts the non-empty ones as they pass."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if text:
                self.count += 1
                yield text


def _train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, show_progress: bool) -> "Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [BOS, EOS, PAD]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise WiolaError(f"vocab size {vocab_size} is too small for byte-level BPE (at least {len(alphabet) + len(specials)})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _train_char(texts: Iterable[str]) -> "Tokenizer":
    from tokenizers import Tokenizer, decoders, models

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    specials = [BOS, EOS, PAD, UNK]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(chars):
        vocab.setdefault(char, len(vocab))
    # A BPE model without merges and without pre-tokeniser maps each character to its id.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", path: str | Path) -> Path:
    """Save with `save_pretrained` and return the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path


VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")  # a local tokenizer folder holds one


def has_vocabulary(folder: Path) -> bool:
    """Whether a local folder holds a tokenizer's vocabulary. transformers 5.0 loads a folder without one as a
    default GPT-NeoX tokenizer, silently, so Wiola checks first."""
    return any((folder / name).is_file() for name in VOCABULARY_FILES)


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerFast":
    """Load a fast tokenizer from a local directory, or from the Hub as `hf:NAME`."""
    name = str(path)
    if name.startswith(HF_PREFIX):
        name = name[len(HF_PREFIX):]
    elif not Path(name).expanduser().is_dir():
        raise WiolaError(f"tokenizer not found: {name} is not a directory (Hugging Face Hub tokenizers: hf:NAME)")
    else:
        name = str(Path(name).expanduser())
        if not has_vocabulary(Path(name)):
            raise WiolaError(f"could not load a tokenizer from {path}: it has no vocabulary ({', '.join(VOCABULARY_FILES)})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise WiolaError(f"could not load a tokenizer from {path}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise WiolaError(f"{path} is not a fast tokenizer (it needs a tokenizer.json)")
    return tokenizer


def tokenizer_hash(path: str | Path, follow_links: bool = False) -> str:
    """sha256 over the names and contents of the tokenizer files of a directory.

    Only the allowlisted tokenizer files count (`wiola.data.manifest.TOKENIZER_FILES`), so the
    same tokenizer hashes the same in a data directory and next to a model's weights."""
    from wiola.data.manifest import tokenizer_files

    digest = hashlib.sha256()
    for file in sorted(tokenizer_files(path, follow_links), key=lambda p: p.name):
        digest.update(file.name.encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def tokenizer_command(corpus: str, out: str, kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8192,
                      min_frequency: int = 2, column: str = "text", split: str = "train", streaming: bool = False,
                      doc_separator: str | None = None) -> dict[str, Any]:
    """Train a tokenizer on a corpus and save it as a directory that AutoTokenizer loads.

    Byte-level BPE round-trips any Unicode text; a character tokenizer has one token per
    character of the corpus plus <|unk|>. Both have <|bos|>, <|eos|> and <|pad|>.

    Args:
        corpus: corpus source: shakespeare, a .txt/.jsonl/.parquet file, a directory, a glob, or hf:NAME[:CONFIG].
        out: directory to save the tokenizer in.
        kind: bpe (byte-level BPE) or char (one token per character).
        vocab_size: vocabulary size for bpe, special tokens included.
        min_frequency: minimum pair count for a bpe merge.
        column: text column of .jsonl/.parquet files and datasets.
        split: split of a Hugging Face dataset.
        streaming: stream a Hugging Face dataset.
        doc_separator: regular expression that splits .txt files into documents.
    """
    from wiola.data.corpus import Corpus

    source = Corpus(corpus, column=column, split=split, streaming=streaming, doc_separator=doc_separator)
    documents = 0

    def texts() -> Iterator[str]:
        nonlocal documents
        for doc in source:
            documents += 1
            yield doc.text

    tokenizer = train_tokenizer(texts(), kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                                show_progress=sys.stderr.isatty())
    path = save_tokenizer(tokenizer, out)
    summary = {"path": str(path), "kind": kind, "vocab_size": len(tokenizer), "documents": documents,
               "replaced_bytes": source.replaced_bytes}
    print(f"saved a {kind} tokenizer with {len(tokenizer)} tokens to {path} "
          f"(trained on {documents} documents; {source.replaced_bytes} invalid UTF-8 bytes replaced)")
    return summary
