"""Data toolchain: corpora, tokenizers, token shards and the training batch loader.

Modules (import the one you need; this package imports nothing heavy on its own):

- `corpus`: corpus sources (files, directories, globs, Hugging Face datasets, `shakespeare`)
  as an iterator of documents.
- `shakespeare`: fetches and caches the built-in offline corpus.
- `tokenizer`: trains byte-level BPE or character tokenizers; `wiola tokenizer`.
- `prepare`: corpus to token shards (`train.bin`, `val.bin`, `manifest.json`); `wiola prepare`.
- `encode`: tokenisation of document batches, optionally in worker processes.
- `manifest`: reading and writing `manifest.json`, fingerprints, atomic writes.
- `loader`: `TokenDataset`, the deterministic `RandomBatchSampler` and evaluation batches.
"""
