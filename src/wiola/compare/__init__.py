"""`wiola compare`: train several models on the same token stream and report them side by side.

Every entrant is trained one after another by the trainer's `train()` with the same data
directory, steps, batch, sequence length, optimizer, schedule and seed. A comparison is a spec
file (YAML or JSON; see `configs/compare/`):

    data:     `dir`, a `wiola prepare` directory, and/or `source` plus prepare options
              (`tokenizer_kind`, `vocab_size`, `val_fraction`, `seed`, `tokenizer`, `doc_separator`,
              `column`, `num_workers`); a source is prepared into `dir` (default OUT/data).
    train:    training options shared by every entrant (the option names of `wiola train`).
    shape:    `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
              (default: `num_attention_heads`), `context`, `dropout`: applied to every entrant.
              The vocabulary and special-token ids always come from the data.
    budget:   default parameter budget of the baselines: an entrant name or a number
              (default: the first `wiola` entrant).
    ablation_widths: `keep` (default: an ablation keeps every width of its base, except that a
              switched MLP is re-matched to the base's parameter count) or `match` (every ablation's
              MLP width is re-matched to the base's parameter count).
    keep_checkpoints: false deletes an entrant's checkpoints/ once it is finished (default true).
    seeds:    a list of train seeds (or `--seeds`): every entrant is trained once per seed into
              OUT/seed-S/, and OUT/results.* give each entrant's mean ± std best validation loss.
    control:  the entrant the others are tested against over the seeds (Welch's t-test, p < 0.05, and
              beside it the paired t-test on the seeds both finished).
    same_budget_llama: true adds `llama@NAME`, a LLaMA of NAME's shape and parameter count (every novelty
              off, SwiGLU width matched, NAME's own training options), for every Wiola entrant or ablation
              NAME more than 2% off the control's parameter count; the seed report tests each against it
              (table "against a same-budget LLaMA"). Two such LLaMAs that would be the same model share one
              run; a listed kind-llama entrant named `llama@NAME` within 2% of NAME is NAME's (flag or not).
    entrants: a list of mappings with a `name` and a `kind`:
      wiola   `config`: a preset name, a config file, or a mapping of WiolaConfig fields (may name
              a `preset`; a preset's MLP widths keep their ratio to hidden_size under `shape`).
              `budget` (optional): match the MLP width (`intermediate_size`) to that budget.
              `ablations`: `all` (each novel component switched off, one at a time) or a list of
              `component` (switch it off) and `component=value` (switch it to value, e.g. on).
              An ablation is named `BASE:component=value` (see `ablation_widths` for its widths) and
              trains with its base's own training options.
      llama | mistral | gpt2
              `LlamaForCausalLM`, `MistralForCausalLM` (sliding window = context // 2 unless set)
              or `GPT2LMHeadModel` of the budget entrant's shape (d, L, H, H_kv, context, dropout;
              embeddings tied as in Wiola), MLP width (`intermediate_size`, GPT-2 `n_inner`)
              matched to the budget (a multiple of 8). `config` (optional): extra config fields.
    any kind  `train` (optional): the entrant's own optimizer options over the spec's `train:` (and over
              `--train`): lr, min_lr, warmup_steps, weight_decay, beta1, beta2, grad_clip (e.g. an lr sweep).

Output in OUT: `runs/NAME/` (one `wiola train` output directory per entrant, with `entrant.json`
and, once finished, `result.json`), `configs/NAME.json` (the model config handed to the trainer),
`results.json`, `results.md` and `val_loss.png`, rewritten after every entrant. With seeds, each
OUT/seed-S/ holds that layout for seed S, and OUT/results.* summarise the seeds (`seeds` module). A second run
of the same command resumes: finished entrants are skipped, a partial run continues from its
`checkpoints/latest`. A changed setting or entrant config is refused rather than mixed in.

Modules: `spec` (the spec: keys, `Spec`, `load_spec`, `prepare_data`), `entrants` (`Entrant`,
parameter counting and width matching, `resolve_entrants`), `runner` (`compare`, `run_entrant`,
peak memory, result rows, `compare_command`) `report` (results.json, results.md, val_loss.png), `seeds` (the summary over
seeds and its tests) and `same_budget` (each entrant against its same-budget LLaMA).
"""

from wiola.compare.entrants import Entrant, built_parameters, match_width, resolve_entrants
from wiola.compare.report import TABLE_HEADER, markdown_report, plot_val_curves, write_reports
from wiola.compare.seeds import seed_rows, seeds_markdown, compare_with_control, paired, welch, write_seed_reports
from wiola.compare.same_budget import compare_with_same_budget, same_budget_markdown, seed_table_rows
from wiola.compare.runner import PeakMemory, compare, compare_command, run_entrant, summarize_run, training_options
from wiola.compare.spec import (
    BASELINES,
    BUDGET_TOLERANCE,
    COMPONENTS,
    DATA_KEYS,
    ENTRANT_KEYS,
    ENTRANT_TRAIN_KEYS,
    KINDS,
    RUNTIME_OPTIONS,
    SAME_BUDGET_TOLERANCE,
    SHAPE_KEYS,
    SPEC_KEYS,
    WIDTH_FIELD,
    WIOLA_SHAPE_FIELDS,
    Spec,
    load_spec,
    prepare_data,
)

__all__ = [
    "BASELINES", "BUDGET_TOLERANCE", "COMPONENTS", "DATA_KEYS", "ENTRANT_KEYS", "ENTRANT_TRAIN_KEYS", "KINDS", "RUNTIME_OPTIONS",
    "SAME_BUDGET_TOLERANCE", "SHAPE_KEYS", "SPEC_KEYS", "TABLE_HEADER", "WIDTH_FIELD", "WIOLA_SHAPE_FIELDS",
    "Entrant", "PeakMemory", "Spec",
    "built_parameters", "compare", "compare_command", "load_spec", "markdown_report", "match_width", "plot_val_curves",
    "prepare_data", "resolve_entrants", "run_entrant", "seed_rows", "seeds_markdown", "summarize_run", "compare_with_control",
    "compare_with_same_budget", "paired", "same_budget_markdown", "seed_table_rows", "training_options", "welch",
    "write_reports", "write_seed_reports",
]
