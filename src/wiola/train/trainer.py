"""`wiola train`: the training loop.

`train_command` (the CLI entry) resolves options and the model config, then `Trainer`
runs: gradient accumulation over micro-batches, gradient clipping, AdamW with a warmup +
cosine/WSD/constant schedule, periodic validation, checkpoints (`latest` every
`save_every` steps, `best` on a new lowest validation loss, `final` at the end), logs, a
live progress bar and, at the end, the model card `out/README.md` (`wiola.card`). The model is any transformers causal LM; the loop knows nothing of its
internals. Under torchrun every rank runs this file; rank 0 alone writes files.

Before step 1 everything the run needs is checked: the output directory is locked (one writer),
the data directory matches its manifest (split sizes, tokenizer hash) and is share-locked against
`wiola prepare`, the train and val splits are long enough for `--seq-len`, and the tokenizer loads.
On `--resume` the tokens must be the checkpoint's (their content id is stored there) unless
`--allow-new-data` is given, and changed options apply as if the run had started with them: the
lr schedule is recomputed from the new lr/min-lr/warmup/schedule/max-steps and AdamW's betas and
weight decay are replaced (see docs/guarantees.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from wiola import finetune, legacy
from wiola.data.lock import claim_dir, shared_lock
from wiola.data.manifest import content_id
from wiola.data.manifest import verify as verify_data
from wiola.errors import WiolaError
from wiola.train import batches, checkpoint, distributed
from wiola.train.config import (
    TrainConfig,
    architecture_dict,
    build_model,
    check_dist_timeout,
    config_differences,
    make_model_config,
    parse_overrides,
    split_config_source,
)
from wiola.train.metrics import RunLog, extra_metrics, plot_losses, truncate_log
from wiola.train.optim import build_optimizer, build_scheduler
from wiola.train.signals import GracefulStop


@dataclass
class TrainResult:
    """What a run did: steps completed, last losses, where things were written, and why it stopped."""

    step: int
    loss: float | None
    best_val_loss: float | None
    out: Path
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM" when interrupted
    exit_code: int = 0
    device: str | None = None  # what this rank trained on (cpu, cuda:0, ...)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for `auto`; none (fp32) elsewhere unless asked."""
    if name == "bf16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def ensure_writable(out: Path) -> None:
    """Create `out` and prove that files can be written there, or raise a clear WiolaError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise WiolaError(f"output directory {out} is not writable ({exc.strerror or exc})") from exc


class NonFiniteLoss(WiolaError):
    """Training produced a NaN/inf loss or gradient norm."""


class Trainer:
    """One training run on one rank: builds model, optimizer and data from resolved options; `fit` runs it.

    `model_overrides` (the --set values) are only stored in checkpoints, for --resume.
    """

    def __init__(self, *, cfg: TrainConfig, model_config, data_dir: Path, out: Path, dist: distributed.Dist,
                 resume_from: Path | None = None, model_overrides: dict[str, Any] | None = None,
                 data_source: dict[str, Any] | None = None, given_options: dict[str, Any] | None = None,
                 validation: bool = True):
        self.cfg, self.model_config, self.data_dir, self.out, self.dist = cfg, model_config, data_dir, out, dist
        self.data_source = data_source  # identity of the data, checked on --resume
        self.given_options = given_options  # the options before defaults were derived (min_lr None = lr/10)
        self.validation = validation  # False only for data prepared with --val-fraction 0
        self.device = dist.device
        self.amp_dtype = autocast_dtype(cfg.dtype, self.device)
        self.accum = cfg.grad_accum_steps(dist.world_size)
        self.tokenizer_dir = batches.tokenizer_dir(data_dir)
        self.step, self.tokens_seen, self.best_val_loss = 0, 0, math.inf
        self.model_overrides = dict(model_overrides or {})
        self._stop, self._stop_everywhere = GracefulStop(), False  # fit() installs the signal handlers

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = finetune.starting_model(build_model(model_config), cfg, resume_from)  # resume / --init-from / --lora
        self.eos_token_id = getattr(model.config, "eos_token_id", None)
        if cfg.document_mask and self.eos_token_id is None:
            raise WiolaError("--document-mask needs the data's eos token id (none in the manifest or tokenizer)")
        model.to(self.device)
        if cfg.compile:
            model.compile()
        self.model = distributed.wrap_model(model, dist, cfg.distributed)
        self.raw_model = distributed.unwrap(self.model)
        # F3N level sampling: one draw per optimizer step, from (seed, step) — the same on every rank and
        # micro-batch, and exactly the same after --resume
        cfg_model = model.config
        self._f3n_models = [m for m in self.raw_model.modules() if hasattr(m, "set_f3n_levels")] \
            if getattr(cfg_model, "mlp", None) == "f3n" and getattr(cfg_model, "f3n_sampling", "none") != "none" else []
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.train_batches = batches.train_sampler(
            data_dir, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size
        )
        # every rank draws different dropout masks; the data order does not depend on these
        torch.manual_seed(cfg.seed + 1000 * (dist.rank + 1))
        if resume_from is not None:
            self._restore(checkpoint.load_state(resume_from))

    # ------------------------------------------------------------------ state

    def _restore(self, state: dict[str, Any]) -> None:
        legacy.upgrade_optimizer_state(state["optimizer"])  # wiola 0.2.0.dev's GCLA layout
        fresh = distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if fresh and self.dist.is_main:
            shown = ", ".join(fresh[:3]) + (f" and {len(fresh) - 3} more" if len(fresh) > 3 else "")
            print(f"resume: {len(fresh)} parameter(s) had no optimizer state yet (no gradient so far): {shown}; "
                  "they start fresh, as they would have", file=sys.stderr)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        best = state.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            checkpoint.restore_rng(rngs[self.dist.rank])
        self.apply_options()

    def apply_options(self) -> None:
        """Make this run's options, not the restored optimizer's, drive training from the current step.

        `optimizer.load_state_dict` brings back the old lr, betas and weight decay and the scheduler
        its old base lr; they are replaced here so that a changed --lr/--min-lr/--warmup-steps/
        --schedule/--max-steps/--beta1/--beta2/--weight-decay applies exactly as in a run started
        with it (the lr at step k is lr * multiplier(k)), and `trainer_state.json` records what ran.
        """
        cfg, sched = self.cfg, self.scheduler
        for i, group in enumerate(self.optimizer.param_groups):
            group["initial_lr"] = cfg.lr
            group["betas"] = (cfg.beta1, cfg.beta2)
            if i == 0:  # optim.param_groups: group 0 is weight-decayed, group 1 never is
                group["weight_decay"] = cfg.weight_decay
        sched.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        step = sched.last_epoch
        lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def save(self, names: list[str]) -> None:
        """Write checkpoint `names[0]` (and copies as the other names); a collective under FSDP."""
        model_state = distributed.full_model_state(self.model)
        optim_state = distributed.full_optimizer_state(self.model, self.optimizer)
        rngs = distributed.all_gather_object(checkpoint.capture_rng(), self.dist)
        if self.dist.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "world_size": self.dist.world_size,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "data": self.train_batches.state_dict(),
                "rng": rngs,
                "train_config": self.cfg.to_dict(),
                "train_options": self.given_options,
                "model_overrides": self.model_overrides,
                "data_source": self.data_source,
            }
            root = self.out / "checkpoints"
            checkpoint.save(root / names[0], model=self.raw_model, model_state=model_state, trainer_state=state, tokenizer_dir=self.tokenizer_dir)
            for name in names[1:]:
                checkpoint.copy_dir_atomic(root / names[0], root / name)
        distributed.barrier(self.dist)

    def export_final(self) -> None:
        """Make `out/` itself a loadable model: the final checkpoint's model and tokenizer files."""
        if not self.dist.is_main:
            return
        src = self.out / "checkpoints" / "final"
        for item in src.iterdir():
            if item.is_file() and not item.name.startswith("trainer_state"):
                tmp = self.out / f".{item.name}.tmp"
                shutil.copy2(item, tmp)
                os.replace(tmp, self.out / item.name)

    # ------------------------------------------------------------------ steps

    def train_step(self) -> tuple[float, float, dict[str, float]]:
        """One optimizer step over `accum` micro-batches; returns (mean loss over all ranks, grad norm, extras)."""
        self.model.train()
        if self._f3n_models:
            from wiola.train.hf_callbacks import step_levels

            levels = step_levels(self._f3n_models[0].config, self.cfg.seed, self.step)
            for m in self._f3n_models:
                m.set_f3n_levels(levels)
        inputs, labels = (t.to(self.device, non_blocking=True) for t in next(self.train_batches))
        micro = list(zip(inputs.split(self.cfg.micro_batch_size), labels.split(self.cfg.micro_batch_size)))
        loss_sum = torch.zeros((), device=self.device)
        extras: dict[str, float] = {}
        for i, (ids, targets) in enumerate(micro):
            with distributed.gradient_sync(self.model, i == len(micro) - 1), autocast(self.device, self.amp_dtype):
                output = self.model(input_ids=ids, use_cache=False, **self._positions(ids))
                loss = batches.causal_lm_loss(output.logits, targets)
                aux = getattr(output, "aux_loss", None)  # the AGU L1 penalty (agu_l1 > 0): trained on, logged apart
            ((loss if aux is None else loss + aux) / len(micro)).backward()
            loss_sum += loss.detach()
            if aux is not None:
                extras["aux_loss"] = extras.get("aux_loss", 0.0) + float(aux.detach()) / len(micro)
            for key, value in extra_metrics(output).items():
                extras[key] = extras.get(key, 0.0) + value / len(micro)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        # one all-reduce carries the loss and whether any rank was asked to stop
        packed = torch.stack([loss_sum / len(micro), torch.tensor(float(self._stop.requested), device=self.device)])
        distributed.all_reduce_sum(packed, self.dist)
        loss = packed[0].item() / self.dist.world_size
        self._stop_everywhere = packed[1].item() > 0
        norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise NonFiniteLoss(
                f"non-finite {what} ({loss if what == 'loss' else norm}) at step {self.step + 1}; stopped without updating."
                f" The last good checkpoint is {self.out / 'checkpoints' / 'latest'}"
                f"{'' if (self.out / 'checkpoints' / 'latest').exists() else ' (none written yet)'}."
                " Try a lower --lr, more --warmup-steps or --grad-clip."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += labels.numel() * self.dist.world_size
        return loss, norm, extras

    def _positions(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`position_ids` that restart after each eos under --document-mask (documents kept apart)."""
        if not self.cfg.document_mask:
            return {}
        return {"position_ids": batches.document_positions(ids, self.eos_token_id)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss (and bits per byte, when the data has a tokenizer) on the first `eval_batches` batches of val."""
        from wiola.evaluate import evaluate_batches

        eval_iter = batches.eval_batches(
            self.data_dir, "val", batch_size=self.cfg.micro_batch_size, seq_len=self.cfg.seq_len,
            # eval_batches full batches, run micro-batch by micro-batch: the same tokens for any process count
            max_batches=self.cfg.eval_batches * (self.cfg.batch_size // self.cfg.micro_batch_size),
        )
        result = evaluate_batches(self.model, eval_iter, self.device, self.amp_dtype, self.dist, positions=self._positions,
                                  tokenizer=self._byte_tokenizer())
        return result

    def _byte_tokenizer(self):
        """The data's tokenizer, to count the UTF-8 bytes behind the validation tokens (None without one)."""
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir) if self.tokenizer_dir is not None else None
        return self._tokenizer

    def write_card(self) -> None:
        """`out/README.md`: the model card (`wiola.card`), with a short seeded sample from the final weights.

        Under FSDP (sharded weights) or --compile (a decode would recompile) the card goes without a sample.
        A failure here only warns: the model itself is already saved."""
        if not self.dist.is_main:
            return
        from wiola import card

        try:
            sharded = self.dist.world_size > 1 and self.cfg.distributed == "fsdp"
            tokenizer = None if sharded or self.cfg.compile else self._byte_tokenizer()
            model = self.raw_model.get_base_model() if self.cfg.lora else self.raw_model  # LoRA layers sit in the base
            card.write_card(self.out, model=None if tokenizer is None else model, tokenizer=tokenizer)
        except Exception as exc:  # noqa: BLE001
            print(f"wiola train: warning: could not write the model card {self.out / 'README.md'}: {exc}", file=sys.stderr)

    # ------------------------------------------------------------------ loop

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.dist.is_main
        log = RunLog(self.out, enabled=main, tensorboard=cfg.tensorboard)
        result = TrainResult(step=self.step, loss=None, best_val_loss=None, out=self.out, device=str(self.device))
        self._stop_everywhere = False
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True, desc="train")
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        started = time.perf_counter()
        if main:
            log.log({"event": "start", "step": self.step, "world_size": self.dist.world_size, "grad_accum": self.accum,
                     "parameters": sum(p.numel() for p in self.raw_model.parameters()), "device": str(self.device),
                     "threads": torch.get_num_threads(), "trainable_parameters": finetune.trainable_parameters(self.raw_model)})
        try:
            with GracefulStop() as stop:
                self._stop = stop
                interrupted = False
                while self.step < cfg.max_steps:
                    tokens_before = self.tokens_seen
                    loss, norm, extras = self.train_step()
                    result.loss = loss
                    window_loss += loss
                    window_steps += 1
                    window_tokens += self.tokens_seen - tokens_before
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        elapsed = time.perf_counter() - window_start
                        record = {"step": self.step, "loss": window_loss / window_steps, "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": norm, "tokens": self.tokens_seen, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                                  "elapsed_s": time.perf_counter() - started, **extras}
                        log.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
                    names = []
                    if self.validation and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                        measured = self.validate()
                        val = measured["loss"]
                        record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
                        if "bits_per_byte" in measured:
                            record["val_bpb"] = measured["bits_per_byte"]
                        log.log(record)
                        if main:
                            bar.write(f"step {self.step}: val loss {val:.4f}")
                        if val < self.best_val_loss:
                            self.best_val_loss = val
                            names.append("best")
                    interrupted = self._stop_everywhere and self.step < cfg.max_steps
                    if self.step < cfg.max_steps and (interrupted or self.step % cfg.save_every == 0):
                        names.insert(0, "latest")
                    if names:
                        self.save(names)
                    if interrupted:
                        break
                if interrupted:
                    result.stopped_by = stop.name or "signal"
                    result.exit_code = stop.exit_code or 130
                    if main:
                        log.log({"event": "interrupted", "step": self.step, "signal": result.stopped_by})
                        bar.write(f"{result.stopped_by}: saved {self.out / 'checkpoints' / 'latest'} at step {self.step};"
                                  " continue with --resume", file=sys.stderr)
                else:
                    self.save(["final", "latest"])
                    self.export_final()
                    if main:
                        log.log({"event": "done", "step": self.step,
                                 "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss})
        except NonFiniteLoss as exc:
            log.log({"event": "non_finite", "step": self.step + 1, "message": str(exc)})
            raise
        finally:
            bar.close()
            log.close()
            if main:
                plot_losses(self.out / "log.jsonl", self.out / "loss.png")
        if result.stopped_by is None:
            self.write_card()  # after the plot, which the card shows
        result.step = self.step
        result.best_val_loss = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return result


# ---------------------------------------------------------------------- entry points


def train(config: str, data: str, out: str, *, overrides: dict[str, Any] | None = None,
          options: dict[str, Any] | None = None, resume: bool = False, allow_new_data: bool = False,
          allow_changed_base: bool = False) -> TrainResult:
    """Programmatic `wiola train`: resolve everything, run, return a `TrainResult`."""
    data_dir, out_dir = Path(data), Path(out)
    batches.read_manifest(data_dir)  # a missing or malformed data directory fails before anything is created
    main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as stack:
        if main:  # one writer per output directory; prepare cannot rewrite the data meanwhile
            stack.enter_context(claim_dir(out_dir, "wiola train"))
            data_lock = shared_lock(data_dir, "wiola train")
            if data_lock is not None:
                stack.callback(data_lock.release)
        return _train(config, data_dir, out_dir, overrides=overrides, options=options, resume=resume,
                      allow_new_data=allow_new_data, allow_changed_base=allow_changed_base)


def data_identity(data_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies a prepared data directory in a checkpoint (checked on --resume)."""
    splits = manifest["splits"]
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    return {"content": content_id(manifest), "fingerprint": manifest["fingerprint"], "tokenizer_sha256": tok.get("sha256"),
            "train_tokens": splits.get("train", {}).get("num_tokens"), "val_tokens": splits.get("val", {}).get("num_tokens"),
            "path": str(data_dir.resolve())}


def check_data(data_dir: Path, manifest: dict[str, Any], cfg: TrainConfig, model_vocab: int) -> bool:
    """Everything the run will read, checked before step 1; returns whether there is a val split to validate on."""
    verify_data(data_dir, manifest)
    need = cfg.seq_len + 1
    splits = manifest["splits"]
    train_tokens = splits.get("train", {}).get("num_tokens", 0)
    if train_tokens < need:
        raise WiolaError(f"the train split of {data_dir} has {train_tokens} tokens; --seq-len {cfg.seq_len} needs at least {need}")
    val_tokens = splits["val"]["num_tokens"] if "val" in splits else None
    no_val = (manifest.get("options") or {}).get("val_fraction") == 0 and not val_tokens
    if not no_val and (val_tokens is None or val_tokens < need):
        have = "no val split" if val_tokens is None else f"a val split of {val_tokens} tokens"
        raise WiolaError(f"{data_dir} has {have}; validation with --seq-len {cfg.seq_len} needs at least {need} tokens"
                         " (prepare it again with a larger --val-fraction, or lower --seq-len)")
    tok_dir = batches.tokenizer_dir(data_dir)
    from wiola.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > model_vocab:
        raise WiolaError(f"the data's tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {model_vocab}")
    return not no_val


def _given_options(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's options as given (derived defaults as None), also for checkpoints that predate them."""
    if state.get("train_options") is not None:
        return dict(state["train_options"])
    saved = dict(state["train_config"])
    if saved.get("min_lr") is not None and math.isclose(saved["min_lr"], saved["lr"] / 10):
        saved["min_lr"] = None  # the default: it follows a new --lr
    return saved


def _train(config: str, data_dir: Path, out_dir: Path, *, overrides: dict[str, Any] | None,
           options: dict[str, Any] | None, resume: bool, allow_new_data: bool,
           allow_changed_base: bool = False) -> TrainResult:
    manifest = batches.read_manifest(data_dir)
    model_spec, file_options = split_config_source(config)
    ckpt_dir = checkpoint.resolve(out_dir / "checkpoints" / "latest")
    ckpt_state: dict[str, Any] | None = None
    if resume:
        if not (ckpt_dir / checkpoint.STATE_FILE).is_file():
            raise WiolaError(f"--resume: no checkpoint at {ckpt_dir}")
        ckpt_state = checkpoint.load_state(ckpt_dir)
    elif (out_dir / "checkpoints").exists():
        raise WiolaError(f"{out_dir} already holds a training run; pass --resume to continue it, or choose a new --out")
    given = TrainConfig.layered(_given_options(ckpt_state) if ckpt_state else None, file_options, options)
    cfg = given
    if cfg.init_from:  # recorded absolute, so --resume and `wiola merge` find it from anywhere
        cfg.init_from = str(finetune.init_model_dir(cfg.init_from))
    # like the training options, --set overrides of the resumed run stay in force unless given again
    overrides = {**(ckpt_state or {}).get("model_overrides", {}), **(overrides or {})}

    model_config = make_model_config(model_spec, _data_defaults(model_spec, overrides, manifest, data_dir))
    if model_config.vocab_size < manifest["vocab_size"]:
        raise WiolaError(f"model vocab_size {model_config.vocab_size} is smaller than the data's {manifest['vocab_size']}")
    identity = data_identity(data_dir, manifest)
    events: list[dict[str, Any]] = []
    if ckpt_state is not None:
        diffs = config_differences(checkpoint.read_config_dict(ckpt_dir), _json_roundtrip(architecture_dict(model_config)))
        if diffs:
            raise WiolaError(f"--resume: the model config differs from the checkpoint's in {len(diffs)} field(s): " + "; ".join(diffs))
        saved = ckpt_state["train_config"]
        changed = [k for k in TrainConfig.DATA_LAYOUT if saved.get(k) is not None and saved.get(k) != getattr(cfg, k)]
        changed += [k for k in TrainConfig.MODEL_LAYOUT if saved.get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
        if changed:
            raise WiolaError("--resume: cannot change " + ", ".join(f"{k} ({saved[k]} -> {getattr(cfg, k)})" for k in changed))
        old = ckpt_state.get("data_source")
        # the same tokens (content id; a checkpoint from before content ids: the inputs' fingerprint and sizes)
        keys = ("content",) if old is not None and "content" in old else ("fingerprint", "tokenizer_sha256", "train_tokens", "val_tokens")
        if old is not None and any(old.get(k) != identity[k] for k in keys):
            if not allow_new_data:
                raise WiolaError(f"--resume: {data_dir} is not the data this run was trained on ({old.get('path')},"
                                 f" {keys[0]} {str(old.get(keys[0]))[:12]} vs {identity[keys[0]][:12]});"
                                 " pass --allow-new-data to continue on it anyway")
            events.append({"event": "data_changed", "step": int(ckpt_state["step"]), "from": old, "to": identity})
        if cfg.lora:  # the adapter was trained on the weights of --init-from as they were then
            changed_base = finetune.check_base(ckpt_dir, cfg.init_from, allow_changed_base)
            if changed_base is not None:
                events.append({"event": "base_changed", "step": int(ckpt_state["step"]), "base": cfg.init_from, **changed_base})

    check_dist_timeout(cfg.dist_timeout)  # before it is used to join the process group
    d = distributed.setup(cfg.device, cfg.dist_timeout)
    # a lost process (another node killed, crashed or silent for --dist-timeout s) ends this one in one line
    with distributed.peer_failures(d, out_dir / "checkpoints" / "latest"):
        return _train_in_group(d, cfg, model_config, data_dir, out_dir, manifest=manifest, ckpt_state=ckpt_state,
                               ckpt_dir=ckpt_dir, given=given, overrides=overrides, identity=identity, events=events,
                               resume=resume)


def _train_in_group(d: distributed.Dist, cfg: TrainConfig, model_config: Any, data_dir: Path, out_dir: Path, *,
                    manifest: dict[str, Any], ckpt_state: dict[str, Any] | None, ckpt_dir: Path, given: TrainConfig,
                    overrides: dict[str, Any], identity: dict[str, Any], events: list[dict[str, Any]],
                    resume: bool) -> TrainResult:
    """The part of `_train` that runs inside the process group (every rank)."""
    if d.is_main:
        ensure_writable(out_dir)
    distributed.barrier(d)
    cfg = cfg.finalize(d.world_size, model_config.max_position_embeddings)
    from wiola.cpu import cpu_threads

    cpu_threads(cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    validation = check_data(data_dir, manifest, cfg, model_config.vocab_size)
    if ckpt_state is not None:
        before = ckpt_state["train_config"]
        diff = {k: [before.get(k), v] for k, v in cfg.to_dict().items() if k in before and before.get(k) != v}
        events.insert(0, {"event": "resume", "step": int(ckpt_state["step"]), "changed": diff})
    if not validation:
        events.append({"event": "no_validation", "message": f"{data_dir} has no val split (--val-fraction 0): no validation, no best checkpoint"})
        if d.is_main:
            print(f"wiola train: note: {events[-1]['message']}", file=sys.stderr)
    if resume and d.is_main:
        truncate_log(out_dir / "log.jsonl", int(ckpt_state["step"]))
    if events and d.is_main:
        _log_events(out_dir, events)
    _quiet_transformers()
    trainer = Trainer(cfg=cfg, model_config=model_config, data_dir=data_dir, out=out_dir, dist=d,
                      resume_from=ckpt_dir if resume else None, model_overrides=overrides, data_source=identity,
                      given_options=given.to_dict(), validation=validation)
    result = trainer.fit()
    # no try/finally: leaving the group after an error can hang (see distributed.teardown)
    distributed.teardown(d)
    return result


def _log_events(out: Path, events: list[dict[str, Any]]) -> None:
    import json

    with open(out / "log.jsonl", "a") as f:
        for event in events:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")


def _data_defaults(spec: Any, overrides: dict[str, Any], manifest: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """Take vocab size and special-token ids from the data unless the config sets them explicitly."""
    explicit = set(overrides) | (set(spec) if isinstance(spec, dict) else set())
    merged = dict(overrides)
    token_ids = batches.special_token_ids(data_dir, manifest)
    defaults = {"vocab_size": manifest["vocab_size"], **token_ids}
    for key, value in defaults.items():
        if key not in explicit and value is not None:
            merged[key] = value
    return merged


def _json_roundtrip(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def train_command(
    config: str,
    data: str,
    out: str,
    set: list[str] | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    schedule: Literal["cosine", "wsd", "constant"] | None = None,
    decay_fraction: float | None = None,
    weight_decay: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    grad_clip: float | None = None,
    eval_every: int | None = None,
    eval_batches: int | None = None,
    log_every: int | None = None,
    save_every: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: Literal["auto", "fp32", "bf16"] | None = None,
    compile: bool | None = None,
    document_mask: bool | None = None,
    distributed: Literal["ddp", "fsdp"] | None = None,
    tensorboard: bool | None = None,
    threads: int | None = None,
    dist_timeout: float | None = None,
    resume: bool = False,
    allow_new_data: bool = False,
    allow_changed_base: bool = False,
    init_from: str | None = None,
    lora: bool | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    lora_targets: list[str] | None = None,
    engine_cache: bool | None = None,
) -> int:
    """Train a model on prepared token data; `out/` ends as a loadable model with its tokenizer.

    Options left unset come from the config file's `train:` section, then (with --resume)
    from the checkpoint, then from the defaults shown. Under `torchrun --nproc_per_node=N
    -m wiola train ...` each process trains on its share of every batch (DDP or FSDP2).
    Writes out/log.jsonl, out/tensorboard/, out/loss.png, out/checkpoints/{latest,best,final} and a model card
    out/README.md (`wiola card`).
    SIGINT/SIGTERM save `latest` and exit; `--resume` continues exactly from it.
    A run on CPU ends by exporting the final model into the ONNX engine's cache (when onnx, onnxscript and
    onnxruntime are installed), so the first `wiola generate` of OUT on CPU already decodes with onnxruntime.

    Args:
        config: preset name (see `wiola presets`), a JSON/YAML file of model config fields
            (optionally with "preset", or with `model:`/`train:` sections), or a model directory.
        data: directory written by `wiola prepare` (manifest.json, train.bin, val.bin, tokenizer/).
        out: output directory.
        set: model config overrides, key=value with JSON values (e.g. --set hidden_size=128 mlp=swiglu).
        max_steps: optimizer steps in total (default 1000).
        batch_size: sequences per optimizer step over all processes (default 32).
        micro_batch_size: sequences per forward pass on one process; smaller than
            batch_size/processes means gradient accumulation (default batch_size/processes).
        seq_len: tokens per sequence (default the model's max_position_embeddings).
        lr: peak learning rate (default 6e-4).
        min_lr: final learning rate of cosine/wsd decay (default lr/10).
        warmup_steps: linear warmup steps (default min(100, max_steps/10)).
        schedule: cosine, wsd (warmup-stable-decay) or constant after warmup (default cosine).
        decay_fraction: share of the steps spent decaying in the wsd schedule (default 0.2).
        weight_decay: AdamW weight decay of matrices; norms, biases and embeddings get none (default 0.1).
        beta1: AdamW beta1 (default 0.9).
        beta2: AdamW beta2 (default 0.95).
        grad_clip: clip the global gradient norm to this; 0 disables (default 1.0).
        eval_every: validate every N steps (default 250).
        eval_batches: validation batches of batch_size sequences, run in micro-batches (default 10).
        log_every: log line every N steps (default 10).
        save_every: write checkpoints/latest every N steps (default 500).
        seed: seed of weights, data order and dropout (default 1337).
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default auto).
        dtype: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16 (default auto).
        compile: torch.compile the model (default off).
        document_mask: keep the documents of each training window apart: attention and the running means
            (GSA, GCLA, ATM pairing) restart after every eos token, as in a packed batch (default off;
            docs/finetune.md#packing gives its cost and effect).
        distributed: multi-process strategy under torchrun: ddp or fsdp (FSDP2) (default ddp).
        tensorboard: also write TensorBoard logs when tensorboard is installed (default on).
        threads: CPU threads (torch intra-op) per process (default: the physical cores this process may
            use, divided among torchrun's local processes; OMP_NUM_THREADS, when set, wins over the default).
            Give 1 when several trainings share the machine (docs/results.md#side-by-side).
        dist_timeout: under torchrun, seconds any rank waits in a collective (gradient all-reduce,
            barrier, checkpoint gather) for the others before the run fails: a node that stops answering
            ends the run after this long; one that dies ends it at once. Must exceed the longest
            checkpoint write and the first step's compile (default 1800). See docs/guarantees.md#a-lost-node.
        resume: continue the run in `out` from checkpoints/latest. Options given again apply from the
            current step as if the run had started with them (lr schedule recomputed); batch size,
            sequence length, seed, --document-mask and the LoRA/--init-from layout cannot change.
        allow_new_data: with --resume, continue on a data directory other than the checkpoint's
            (recorded in log.jsonl); without it such a resume is refused.
        allow_changed_base: with --resume of a --lora run, continue although the --init-from base's weights
            changed since the adapter was trained (recorded in log.jsonl); without it such a resume is refused.
        init_from: start from the weights of this model directory (a training out/, one of its
            checkpoints/..., or any saved Wiola/LLaMA-style model) with a fresh optimizer, schedule
            and step 0: fine-tuning. CONFIG still gives the architecture (usually the same
            directory); the weights must fit it. Unlike --resume, which continues an interrupted
            run of OUT exactly, this starts a new run. A model directory as CONFIG alone gives only
            the architecture (random weights). See docs/finetune.md.
        lora: train PEFT LoRA adapters on the frozen --init-from weights instead of all weights;
            `wiola merge OUT MERGED` folds them back into a plain model (default off).
        lora_rank: LoRA rank r (default 8).
        lora_alpha: LoRA alpha; the update is scaled by alpha/r (default 16).
        lora_dropout: dropout on the LoRA input (default 0).
        lora_targets: linear layers to adapt, by name suffix (default: all attention and MLP
            projections present: q/k/v/o_proj, output_gate_proj, gate/up/down_proj, bypass_proj,
            wide_up_proj, wide_down_proj, fusion_proj).
        engine_cache: at the end of a run on CPU, export the final model (a LoRA run: base + adapter, merged) into
            the ONNX engine's cache (~/.cache/wiola/onnx, or $WIOLA_ONNX_CACHE), where wiola generate and wiola chat
            (--engine auto) find it: the first generate is on the fast path (about 10-20 s at nano size; needs
            wiola[export]; a failure is a note, not a failed run). --no-engine-cache: not (default: on, unless
            WIOLA_TRAIN_ENGINE_CACHE=0).
    """
    options = {
        "max_steps": max_steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size, "seq_len": seq_len,
        "lr": lr, "min_lr": min_lr, "warmup_steps": warmup_steps, "schedule": schedule, "decay_fraction": decay_fraction,
        "weight_decay": weight_decay, "beta1": beta1, "beta2": beta2, "grad_clip": grad_clip, "eval_every": eval_every,
        "eval_batches": eval_batches, "log_every": log_every, "save_every": save_every, "seed": seed, "device": device,
        "dtype": dtype, "compile": compile, "document_mask": document_mask, "distributed": distributed, "tensorboard": tensorboard, "threads": threads,
        "dist_timeout": dist_timeout,
        "init_from": init_from, "lora": lora, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout, "lora_targets": lora_targets,
    }
    result = train(config, data, out, overrides=parse_overrides(set), options=options, resume=resume,
                   allow_new_data=allow_new_data, allow_changed_base=allow_changed_base)
    if result.stopped_by is None and result.loss is not None and int(os.environ.get("RANK", "0")) == 0:
        best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        print(f"trained {result.step} steps, final loss {result.loss:.4f}{best}; model saved to {result.out}")
    if result.stopped_by is None and result.exit_code == 0:
        from wiola.train.engine_cache import after_training

        after_training(result.out, result.device, engine_cache)
    return result.exit_code
