"""The shipped offline tasks as lm-evaluation-harness task YAMLs + JSONL.

``prepare_tasks(out)`` draws the items (``code_tasks``) from the embedded corpus's
validation files only and writes, into a staging directory renamed at the end::

    OUT/code_next_line.yaml  code_next_line.jsonl
        code_identifier.yaml code_identifier.jsonl
        code_closure.yaml    code_closure.jsonl
        manifest.json        seed, files, counts, random baselines (written last)

The YAMLs read their JSONL with ``dataset_path: json`` (a local file, nothing
downloaded). The default directory is a cache keyed by this interpreter's
version, like the embedded corpus itself.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_upcycle.atomic import staged_directory, write_json_atomic, write_text_atomic
from megatron_upcycle.errors import UserError
from megatron_upcycle.evaluation import code_tasks

SEED = 1234
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShippedTask:
    name: str
    output_type: str          # the harness's: multiple_choice or loglikelihood
    metrics: tuple[str, ...]
    chance: float             # random baseline of the first metric
    about: str


SHIPPED_TASKS = {t.name: t for t in [
    ShippedTask("code_next_line", "multiple_choice", ("acc", "acc_norm"), 0.25,
                f"choose the true next line among {code_tasks.CHOICES} (distractors: lines of the same file)"),
    ShippedTask("code_identifier", "loglikelihood", ("acc",), 0.0,
                "greedy exact match of a line's final identifier, seen earlier in the context"),
    ShippedTask("code_closure", "multiple_choice", ("acc", "acc_norm"), 0.25,
                f"choose the right closing brackets among {code_tasks.CHOICES} sequences of the same length"),
]}
# Keys every task YAML in a task directory must have, and, for multiple choice, doc_to_choice too.
REQUIRED_KEYS = ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target")


def default_task_dir() -> Path:
    from megatron_upcycle.data.config import default_cache_dir

    python = ".".join(map(str, sys.version_info[:2]))
    return Path(default_cache_dir()) / "eval_tasks" / f"code-py{python}-v{FORMAT_VERSION}-seed{SEED}"


def embedded_split() -> tuple[list[code_tasks.CodeFile], str]:
    """(validation files, training text) of the embedded corpus, split as `data prepare --embedded` splits it."""
    from megatron_upcycle.data import corpus
    from megatron_upcycle.data.preparation import EMBEDDED_VALID_FRACTION

    valid, train = [], []
    for source in corpus.stdlib_sources(None):
        text = source.path.read_bytes().decode("utf-8", errors="replace")
        if corpus.is_valid_document(source.key, EMBEDDED_VALID_FRACTION):
            valid.append(code_tasks.CodeFile(source.key, text))
        else:
            train.append(text)
    return valid, "\n\0\n".join(train)


def task_yaml(task: ShippedTask, data_file: Path) -> dict:
    config = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "fewshot_split": "test",  # few-shot examples: other items (the harness leaves the current one out)
        "output_type": task.output_type,
        "doc_to_text": "context",
        "doc_to_target": "label" if task.output_type == "multiple_choice" else "target",
        "target_delimiter": "",  # contexts end where the answer starts (a newline, an indent, a space)
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics],
        "metadata": {"version": float(FORMAT_VERSION), "chance": task.chance, "about": task.about},
    }
    if task.output_type == "multiple_choice":
        config["doc_to_choice"] = "choices"
    return config


def prepare_tasks(out: str | os.PathLike, seed: int = SEED, log=print) -> Path:
    """Write the shipped tasks into ``out`` (must not exist); returns ``out``."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new directory for the tasks")
    files, training_text = embedded_split()
    decontaminator = code_tasks.Decontaminator(training_text)
    with staged_directory(out, "choose a new directory for the tasks") as staging:
        counts = {}
        for task in SHIPPED_TASKS.values():
            items = code_tasks.build_items(task.name, files, decontaminator, seed)
            data_file = out / f"{task.name}.jsonl"
            write_text_atomic(staging / data_file.name, "".join(json.dumps(item) + "\n" for item in items))
            write_text_atomic(staging / f"{task.name}.yaml", yaml.safe_dump(task_yaml(task, data_file), sort_keys=False))
            counts[task.name] = len(items)
            log(f"{task.name}: {len(items)} items (random baseline {task.chance:g}: {task.about})")
        write_json_atomic(staging / MANIFEST, {
            "format_version": FORMAT_VERSION, "seed": seed, "valid_files": [f.key for f in files],
            "python": sys.version.split()[0], "counts": counts,
            "chance": {name: task.chance for name, task in SHIPPED_TASKS.items()},
        })
    return out


def ensure_task_dir() -> Path:
    """The default task directory, prepared on first use (concurrent first uses: one wins the rename)."""
    path = default_task_dir()
    if (path / MANIFEST).exists():
        return path
    try:
        prepare_tasks(path, log=lambda m: None)
    except UserError:
        if not (path / MANIFEST).exists():  # another process renamed its copy in first
            raise
    return path


def check_task_dir(path: Path) -> dict[str, Path]:
    """{task name: YAML path} of a task directory; a UserError naming a YAML with missing fields."""
    if not path.is_dir():
        raise UserError(f"task directory {path} does not exist")
    found = {}
    for yaml_path in sorted(path.glob("*.yaml")):
        try:
            config = yaml.safe_load(yaml_path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(config, dict) or "group" in config or "tag" in config and "task" not in config:
            continue  # groups and tags are the harness's to check
        missing = [k for k in REQUIRED_KEYS if k not in config]
        if config.get("output_type") == "multiple_choice" and "doc_to_choice" not in config:
            missing.append("doc_to_choice")
        if missing:
            raise UserError(f"{yaml_path}: task file lacks {', '.join(missing)}")
        _check_data_files(yaml_path, config)
        found[str(config["task"])] = yaml_path
    return found


def _check_data_files(yaml_path: Path, config: dict) -> None:
    """A local json task's data files exist and their first record has the fields the YAML names."""
    if config.get("dataset_path") != "json":
        return
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise UserError(f"{yaml_path}: dataset_path json needs dataset_kwargs.data_files")
    paths = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
    for name in paths:
        data = Path(name) if Path(name).is_absolute() else yaml_path.parent / name
        if not data.is_file():
            raise UserError(f"{yaml_path}: data file {data} does not exist")
        with open(data) as handle:
            first = handle.readline()
        try:
            record = json.loads(first)
        except ValueError:
            raise UserError(f"{data}:1: not a JSON record") from None
        fields = [config[k] for k in ("doc_to_text", "doc_to_target", "doc_to_choice")
                  if isinstance(config.get(k), str) and "{" not in config[k]]
        lacking = [f for f in fields if f not in record]
        if lacking:
            raise UserError(f"{data}:1: record lacks field(s) {', '.join(lacking)} named by {yaml_path.name}")
