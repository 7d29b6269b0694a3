"""`wiola push`: upload a model directory to the Hugging Face Hub, with a generated model card.

What goes up (`upload_files`): the weights (`*.safetensors` and their index), `config.json`,
`generation_config.json`, the modeling files that `trust_remote_code=True` loads (every `*.py` of the
directory: `auto_map` names `configuration_wiola`/`modeling_wiola`, which import the other
`*_wiola.py`), the tokenizer files (`manifest.TOKENIZER_FILES`), the loss plot, `wiola eval --tasks`
results (`lm_eval/*.json`) and `README.md`: the model card of `wiola.card`, regenerated with a short seeded
sample, unless the directory's README.md was written by a person (it lacks the card's marker) and is
then uploaded as it is. A link among those files is refused (it would upload what it points to). Nothing
else leaves the machine: no trainer state, optimizer, logs or checkpoints.

The upload is one commit through huggingface_hub's client (`HfApi.create_repo`, `create_branch` for a
`--revision`, `create_commit`); `HF_ENDPOINT` chooses the server, the token comes from `--token`, else
`HF_TOKEN`, else `hf auth login`. Every failure (no model, not logged in, the Hub unreachable, a refused
token) is one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from wiola.errors import WiolaError

ALWAYS = ("config.json", "generation_config.json", "model.safetensors.index.json", "loss.png")


def upload_files(model_dir: Path) -> dict[str, Path]:
    """{path in the repo: local file} of everything `push` uploads from `model_dir`, README.md excepted."""
    from wiola.data.manifest import TOKENIZER_FILES

    files: dict[str, Path] = {}
    for item in sorted(model_dir.iterdir()):
        if item.name.startswith(".") or not (item.name in ALWAYS or item.name in TOKENIZER_FILES
                                             or item.suffix in (".safetensors", ".py")):
            continue
        if item.is_symlink() or item.is_file():
            files[item.name] = item
    results = model_dir / "lm_eval"
    if results.is_symlink() or results.is_dir():
        files.update({f"lm_eval/{item.name}": item for item in sorted(results.glob("*.json"))})
    links = ["lm_eval"] * results.is_symlink() + [name for name, item in files.items() if item.is_symlink()]
    if links:  # a link would upload whatever it points to
        raise WiolaError(f"{model_dir}: {', '.join(links[:3])}{' ...' if len(links) > 3 else ''} "
                         f"{'is a link' if len(links) == 1 else 'are links'}; push uploads plain files only "
                         "(replace each link with a copy of its file)")
    return files


def check_model_dir(path: str | Path) -> Path:
    """The model directory at `path` (a run's out/ or a checkpoint), refusing what would not load from the Hub."""
    from wiola import legacy
    from wiola.train.checkpoint import _first_line, find_model_dir

    path = Path(path).expanduser()
    if not path.exists():
        raise WiolaError(f"{path}: no such directory")
    if not path.is_dir():
        raise WiolaError(f"{path} is not a model directory (it is a file)")
    model_dir = find_model_dir(path)
    if (model_dir / "adapter_config.json").is_file():
        raise WiolaError(f"{model_dir} holds a LoRA adapter, not a full model; merge it first "
                         f"(wiola merge {path} MERGED) and push MERGED")
    if not any(model_dir.glob("*.safetensors")):
        raise WiolaError(f"{model_dir} is not a model directory (config.json but no *.safetensors weights)")
    try:
        old_layout = legacy.needs_upgrade(model_dir)  # reads the safetensors headers
    except Exception as exc:  # noqa: BLE001 - SafetensorError, truncated or foreign files
        raise WiolaError(f"cannot load a model from {model_dir}: {_first_line(exc)}") from None
    if old_layout:
        raise WiolaError(f"{model_dir} has the GCLA layout of wiola 0.2.0.dev; rewrite it with "
                         f"`wiola convert {model_dir} NEW_DIR` and push NEW_DIR")
    if not (model_dir / "modeling_wiola.py").is_file() and _is_wiola(model_dir):
        raise WiolaError(f"{model_dir} lacks the modeling files (modeling_wiola.py ...) that trust_remote_code loads;"
                         " save it with wiola's save_pretrained (or `wiola convert`) first")
    return model_dir


def _is_wiola(model_dir: Path) -> bool:
    import json

    return json.loads((model_dir / "config.json").read_text()).get("model_type") == "wiola"


def _keeps_own_readme(model_dir: Path) -> bool:
    from wiola.card import MARKER

    readme = model_dir / "README.md"
    return readme.is_file() and MARKER not in readme.read_text(encoding="utf-8", errors="replace")


def _card(model_dir: Path, repo_id: str, *, sample: bool, sample_prompt: str, license: str, device: str
          ) -> tuple[bytes, Path | None]:
    """(README.md to upload, the loss plot it shows when that lives outside `model_dir`, e.g. for checkpoints/best)."""
    from wiola import card

    if _keeps_own_readme(model_dir):
        return (model_dir / "README.md").read_bytes(), None
    info = card.collect(model_dir)
    text = None
    if sample:
        from wiola.train.checkpoint import load_for_inference
        from wiola.train.distributed import resolve_device

        model, tokenizer, _ = load_for_inference(model_dir, resolve_device(device))
        text = (sample_prompt, card.sample_text(model, tokenizer, sample_prompt))
    plot = info.loss_plot if info.loss_plot is not None and info.loss_plot.parent != model_dir else None
    return card.render(info, repo_id=repo_id, sample=text, license=license).encode("utf-8"), plot


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the HTTP stack that mean 'the server could not be reached'."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            if isinstance(getattr(mod, name, None), type):
                errors.append(getattr(mod, name))
    return tuple(errors)


def _hub_error(exc: BaseException, endpoint: str, repo_id: str) -> WiolaError:
    """One line for any failure of the Hub client."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return WiolaError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        reason = {401: "the token was refused (401): log in again with `hf auth login` or pass a valid --token",
                  403: f"the token may not write to {repo_id} (403): it needs write access to that namespace",
                  404: f"{repo_id} was not found (404): check the name, or whether the token can see it"}
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return WiolaError(reason.get(status, f"the Hub answered {status}: {detail}"))
    if isinstance(exc, _transport_errors()):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return WiolaError(f"cannot reach the Hub at {endpoint} ({first}); check the network, or HF_ENDPOINT")
    return WiolaError(f"upload failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")


def push(model_dir: Path, repo_id: str, *, files: dict[str, Path], readme: bytes, token: str, private: bool,
         revision: str | None, commit_message: str, endpoint: str | None = None) -> Any:
    """Create `repo_id` (when missing), the `revision` branch (when given and missing), and commit `files` + README.md."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")  # None: the namespace's default
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model")
    return url, commit


def push_command(
    checkpoint: str,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    sample_prompt: str = "",
    sample: bool = True,
    license: str = "apache-2.0",
    device: str = "cpu",
    dry_run: bool = False,
) -> int:
    """Upload a model directory to the Hugging Face Hub with a generated model card (README.md).

    Uploads the weights, config, the modeling files that `trust_remote_code=True` loads, the tokenizer, the
    loss plot and a model card (architecture and switches, parameters, data, tokens seen, validation loss and
    bits per byte, a sample, how to load it). Trainer state, logs and checkpoints stay local. A README.md
    that you wrote yourself (without the generated card's marker line) is uploaded unchanged.

    Args:
        checkpoint: a model directory (a training `out/`, or one of its checkpoints/...).
        repo: the Hub repository, `user/name` or `org/name`; created when missing.
        private: create the repository private (an existing repository keeps its visibility).
        revision: branch to commit to, created from main when missing (default main).
        token: a Hub token with write access (default: HF_TOKEN, else the `hf auth login` token).
        commit_message: message of the upload commit.
        sample_prompt: prompt of the card's sample ("" starts from the start-of-text token).
        sample: generate the card's sample (a few seconds on CPU; --no-sample skips loading the model).
        license: license identifier for the card's metadata.
        device: where to run the sample: cpu, cuda, cuda:N, mps or auto.
        dry_run: list the files and print the card that would be uploaded; nothing is sent.
    """
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise WiolaError(f"REPO must be `user/name` or `org/name`, got {repo!r}")
    model_dir = check_model_dir(checkpoint)
    files = upload_files(model_dir)
    readme, plot = _card(model_dir, repo, sample=sample, sample_prompt=sample_prompt, license=license, device=device)
    if plot is not None:
        files["loss.png"] = plot
    if dry_run:
        print(f"would upload to {repo}{f' (branch {revision})' if revision else ''}{', private' if private else ''}:")
        for name, path in files.items():
            print(f"  {name:<32} {path.stat().st_size:>14,} bytes")
        kept = " (your own, unchanged)" if _keeps_own_readme(model_dir) else " (generated model card)"
        print(f"  {'README.md':<32} {len(readme):>14,} bytes{kept}")
        return 0

    from huggingface_hub import get_token

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = token or get_token()
    if not token:
        raise WiolaError("not logged in to the Hugging Face Hub: run `hf auth login`, set HF_TOKEN, or pass --token")
    from huggingface_hub import constants

    where = endpoint or constants.ENDPOINT
    message = commit_message or f"Upload {model_dir.name} with wiola push"
    total = sum(p.stat().st_size for p in files.values()) + len(readme)
    print(f"uploading {len(files) + 1} files ({total:,} bytes) to {repo} at {where} ...", file=sys.stderr)
    try:
        url, commit = push(model_dir, repo, files=files, readme=readme, token=token, private=private,
                           revision=revision, commit_message=message, endpoint=endpoint)
    except WiolaError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client failure becomes one line
        raise _hub_error(exc, where, repo) from None
    print(f"pushed {model_dir} to {url} (commit {commit.oid[:12]}{f', branch {revision}' if revision else ''})")
    return 0
