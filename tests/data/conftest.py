"""Fixtures for the data tests: small corpora on disk and one small trained BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from wiola.data.tokenizer import save_tokenizer, train_tokenizer

# Varied documents: prose, verse, code, Unicode (accents, CJK, emoji, RTL), odd whitespace,
# and text that looks like a special token.
DOCUMENTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Ça va? Très bien, merci. Übermäßig große Straße. ¿Qué tal? Ελληνικά κείμενα.\n",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。\n",
    "emoji 🤖🎭🚀 and symbols ∑∫√≈≠ and RTL עברית العربية\n",
    "def f(x):\n\treturn x ** 2  # tabs\tand  double  spaces\r\nwindows line\r\n",
    "A literal <|eos|> and <|bos|> inside the text must stay text.\n",
    "   leading and trailing spaces   \n\n\n",
    "Numbers 0123456789 3.14159 1e-9 -42 and punctuation !@#$%^&*()[]{};:'\",.<>/?\\|`~\n",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 3,
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n",
    "Combining marks: e\u0301 a\u0308 n\u0303, zero width\u200bspace, BOM-like \ufeff inside.\n",
]


def write_text_corpus(root: Path, documents: list[str] = DOCUMENTS) -> Path:
    """One .txt file per document (doc00.txt, doc01.txt, ...) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(documents):
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8", newline="")
    return root


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return write_text_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400) trained on DOCUMENTS, saved with save_pretrained."""
    tokenizer = train_tokenizer(DOCUMENTS * 3, kind="bpe", vocab_size=400, min_frequency=2)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "bpe")
