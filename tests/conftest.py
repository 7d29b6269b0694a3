"""Suite-wide settings: tiny models run fastest single-threaded (thread start-up dominates their ops)."""

import atexit
import os
import shutil
import tempfile

import torch

torch.set_num_threads(1)

# the ONNX engine's export cache and ledger (`wiola.decode.onnx_backend`): a private one for the session (subprocesses
# included), so that no test decodes from, or adds to, the user's ~/.cache/wiola/onnx
os.environ["WIOLA_ONNX_CACHE"] = tempfile.mkdtemp(prefix="wiola-onnx-tests-")
atexit.register(shutil.rmtree, os.environ["WIOLA_ONNX_CACHE"], True)
# `wiola train` on CPU ends by exporting its model into that cache (`wiola.train.engine_cache`): seconds per run, and the
# suite trains many; off here (subprocesses included), on in the tests of that feature (tests/train/test_engine_cache.py)
os.environ["WIOLA_TRAIN_ENGINE_CACHE"] = "0"
# ONNX exports of the any-length trace alone (graph format 2): the one-token body doubles each export's time, and
# the suite exports dozens of tiny models. The shared `exports` fixture (tests/export/conftest.py) and the tests of
# the one-token body itself turn it back on (`wiola.export.to_onnx.one_token_body`).
os.environ["WIOLA_ONNX_ONE_TOKEN_BODY"] = "0"
