"""Tests of the data toolchain: corpora, tokenizers, `wiola prepare` and the batch loader."""
