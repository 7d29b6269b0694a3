"""Training checkpoints: atomic directories that are also ordinary pretrained models.

A checkpoint directory (`out/checkpoints/{latest,best,final}`) holds

* `config.json`, `model.safetensors`, `generation_config.json` (from `save_pretrained`)
  and the tokenizer files, so `from_pretrained`, `wiola eval` and `wiola generate` load it;
* `trainer_state.pt`: optimizer and scheduler state, the data sampler's position, every
  rank's RNG states (python, numpy, torch, cuda), the step, the best validation loss and
  the training options; `trainer_state.json` repeats the scalars for people.

Files get the mode the umask gives new files (0644 usually; safetensors alone would write the weights
0600). Writes are atomic: everything goes into a temporary sibling directory, each file and the
directory are fsynced, then the old checkpoint is moved aside, the new one renamed into
place and the old one deleted. A crash at any point leaves either the previous or the new
checkpoint loadable (`resolve` also recovers the moved-aside copy if the crash fell
between the two renames).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from wiola import legacy
from wiola.errors import WiolaError

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def default_file_mode(folder: Path) -> int:
    """The mode a new file gets in `folder` under this process's umask (0644 under the usual 022): found by
    creating one, which unlike reading `os.umask` is safe while other threads create files."""
    probe = Path(folder) / f".mode-probe-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def umask_modes(folder: Path) -> None:
    """Give every file in `folder` the mode other new files get (safetensors writes its files 0600, so an
    engine running as another user could not read the weights)."""
    mode = default_file_mode(folder)
    for item in Path(folder).iterdir():
        if item.is_file() and not item.is_symlink() and item.stat().st_mode & 0o777 != mode:
            os.chmod(item, mode)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Create directory `path` atomically: `write(tmp)` fills a temporary sibling first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        write(tmp)
        umask_modes(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = _aside(path)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside)
        else:  # a crash fell between the renames last time: the aside copy is the real one
            os.replace(aside, path)
    if path.exists():
        os.replace(path, aside)
    os.replace(tmp, path)
    _fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """The checkpoint directory to read at `path`, recovering a moved-aside copy if needed."""
    path = Path(path)
    if not path.exists() and _aside(path).is_dir():
        os.replace(_aside(path), path)
    return path


def copy_dir_atomic(src: Path, dst: Path) -> None:
    """Atomically make `dst` an independent copy of checkpoint `src` (real copies, no links:
    damaging one checkpoint's files never damages another's)."""

    def write(tmp: Path) -> None:
        for item in src.iterdir():
            if item.is_file() and not item.is_symlink():
                shutil.copy2(item, tmp / item.name)

    atomic_write_dir(dst, write)


def copy_tokenizer(tokenizer_dir: Path | None, dst: Path) -> None:
    """Copy the tokenizer files next to a model so AutoTokenizer loads them from there.

    Only the allowlisted tokenizer files are copied, by name (`manifest.TOKENIZER_FILES`): nothing
    else in the folder travels with the model, and no data file can overwrite a model file.
    """
    from wiola.data.manifest import tokenizer_files

    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        return
    for item in tokenizer_files(tokenizer_dir):
        if (dst / item.name).exists():
            raise WiolaError(f"tokenizer file {item.name} would overwrite a model file in {dst}")
        shutil.copyfile(item, dst / item.name)


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, gauss = state["python"][0], state["python"][2]
    random.setstate((version, tuple(state["python"][1]), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------- save / load


def save(
    path: Path,
    *,
    model: torch.nn.Module,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None,
) -> None:
    """Write a full training checkpoint to `path` atomically (call on rank 0 only)."""

    aliases = tied_aliases(model)
    model_state = {k: v for k, v in model_state.items() if k not in aliases}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=model_state)
        copy_tokenizer(tokenizer_dir, tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        summary = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, type(None)))}
        summary["train_config"] = trainer_state.get("train_config")
        summary["data_source"] = trainer_state.get("data_source")  # for the model card (wiola.card)
        summary["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2) + "\n")

    atomic_write_dir(path, write)


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` (optimizer, scheduler, sampler, RNG, step, ...)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise WiolaError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or hostile pickles all mean "damaged"
        raise WiolaError(f"{file} is damaged or not a wiola trainer state; it cannot be resumed from"
                         f" ({_first_line(exc)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise WiolaError(f"{file} is not a wiola trainer state")
    return state


def _first_line(exc: BaseException) -> str:
    """The first line of an error message (torch's unpickling errors go on to advise weights_only=False)."""
    text = str(exc).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(exc).__name__)[:300]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of checkpoint `path` (all safetensors shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise WiolaError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, truncated files
            raise WiolaError(f"{file} is damaged: {_first_line(exc)}") from None
    return state


def read_config_dict(path: Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise WiolaError(f"{path}: no config.json")
    return json.loads(file.read_text())


def find_model_dir(path: str | Path) -> Path:
    """A directory with config.json: `path` itself, or a training run's newest checkpoint."""
    path = resolve(path)
    if (path / "config.json").is_file():
        return path
    for name in ("final", "latest"):
        candidate = resolve(path / "checkpoints" / name)
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise WiolaError(f"{path} holds no model (no config.json, and no checkpoints/final or checkpoints/latest)")


def load_for_inference(path: str | Path, device: torch.device, allow_changed_base: bool = False):
    """(model in eval mode on `device`, tokenizer, model dir) for any checkpoint or trained output directory.

    A LoRA run loads as its base plus the adapter, merged; a base whose weights changed since the adapter was
    trained is refused unless `allow_changed_base` (`wiola.finetune.check_base`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import wiola  # noqa: F401  (registers the wiola model type with the Auto classes)
    from wiola.compat_wiola import NO_HUB_KERNELS

    hf_logging.disable_progress_bar()

    model_dir = find_model_dir(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a load report of missing keys becomes our one-line error below
    try:
        if (model_dir / "adapter_config.json").is_file():  # a `wiola train --lora` run: base + adapter, merged
            from wiola.finetune import load_lora_model

            model, info = load_lora_model(model_dir, allow_changed_base=allow_changed_base)[0].merge_and_unload(), {}
        elif legacy.needs_upgrade(model_dir):
            model, info = legacy.load_upgraded(model_dir, torch.float32), {}
            print(f"note: {model_dir} has the GCLA layout of wiola 0.2.0.dev (dead layer-0 tensors); upgraded in memory, "
                  f"`wiola convert {model_dir} NEW_DIR` rewrites it", file=sys.stderr)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True,
                                                                 **NO_HUB_KERNELS)
    except WiolaError:  # already one line (a moved or changed LoRA base)
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, truncated files, bad configs
        raise WiolaError(f"cannot load a model from {model_dir}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    aliases = tied_aliases(model)
    missing = [k for k in info.get("missing_keys") or [] if k not in aliases]
    bad = missing + list(info.get("mismatched_keys") or [])
    if bad:  # transformers only warns and leaves those weights random
        raise WiolaError(f"{model_dir}: the weights are incomplete ({len(bad)} tensor(s) missing or of the wrong shape,"
                         f" e.g. {', '.join(str(k) for k in bad[:3])}); refusing to use random weights")
    from wiola.data.tokenizer import VOCABULARY_FILES, has_vocabulary

    if not has_vocabulary(model_dir):
        raise WiolaError(f"cannot load the tokenizer from {model_dir}: it has no vocabulary ({', '.join(VOCABULARY_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise WiolaError(f"cannot load the tokenizer from {model_dir}: {_first_line(exc)}") from None
    return model.to(device).eval(), tokenizer, model_dir


def load_weights_into(model: torch.nn.Module, path: Path) -> None:
    """Load checkpoint weights into an unwrapped model; only tied aliases (e.g. the LM head) may be absent."""
    state = load_weights(path)
    legacy.upgrade_state_dict(state)  # a checkpoint of wiola 0.2.0.dev's GCLA layout resumes too
    result = model.load_state_dict(state, strict=False)
    aliases = tied_aliases(model)
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise WiolaError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier one (a tied LM head); saved once."""
    aliases, seen = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases
