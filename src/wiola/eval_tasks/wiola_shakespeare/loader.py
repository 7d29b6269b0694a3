"""Loads the shipped `wiola_shakespeare` lm-eval task's questions (`wiola_shakespeare.jsonl` beside this file).

lm-eval imports this file by path (`custom_dataset: !function loader.load` in the YAML), so the data is found
from any working directory, and nothing is downloaded or cached.
"""

import json
from pathlib import Path


def load(**_options):
    """A DatasetDict with one `test` split: id, play, context, choices (4 endings), answer (index of the true one)."""
    from datasets import Dataset, DatasetDict

    path = Path(__file__).with_name("wiola_shakespeare.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
