"""The shipped offline tasks: deterministic, held out from training, well-formed for the harness."""
from __future__ import annotations

import json
import random

import pytest
import yaml

from megatron_upcycle.errors import UserError
from megatron_upcycle.evaluation import code_tasks
from megatron_upcycle.evaluation.task_files import SHIPPED_TASKS, check_task_dir, embedded_split, prepare_tasks


@pytest.fixture(scope="module")
def split():
    return embedded_split()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return prepare_tasks(tmp_path_factory.mktemp("tasks") / "code", log=lambda m: None)


def _items(task_dir, name):
    return [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]


def test_no_item_occurs_in_the_training_split(task_dir, split):
    valid, training_text = split
    assert len(training_text) > 1_000_000 and len(valid) > 10
    for name in SHIPPED_TASKS:
        items = _items(task_dir, name)
        assert 100 <= len(items) <= code_tasks.ITEMS_PER_TASK, (name, len(items))
        for item in items:
            text = code_tasks.item_text(item)
            assert text not in training_text
            # ...nor its last lines, where the answer is
            assert "\n".join(text.rstrip("\n").split("\n")[-code_tasks.WINDOW_LINES:]) not in training_text
            assert item["source"].split(":")[0] in {f.key for f in valid}


def test_items_are_well_formed(task_dir):
    for name, task in SHIPPED_TASKS.items():
        for item in _items(task_dir, name):
            if task.output_type == "multiple_choice":
                choices = item["choices"]
                assert len(choices) == code_tasks.CHOICES and 0 <= item["label"] < len(choices)
                assert len({c.strip() for c in choices}) == len(choices)  # no duplicate answers
            else:
                assert item["target"].isidentifier() and item["target"] in item["context"]

def test_closure_gold_is_the_source_line_and_distractors_mismatch(task_dir, split):
    valid = {f.key: f.text.split("\n") for f in split[0]}
    for item in _items(task_dir, "code_closure"):
        key, line = item["source"].rsplit(":", 1)
        gold = item["choices"][item["label"]]
        assert item["context"].split("\n")[-1] + gold == valid[key][int(line) - 1].rstrip()
        closers = gold.rstrip(":,")
        for choice in item["choices"]:
            # same length, same brackets alphabet: any other sequence closes a bracket it did not open
            assert len(choice) == len(gold) and set(choice.rstrip(":,")) <= set(")]}")
        assert sum(c.rstrip(":,") == closers for c in item["choices"]) == 1


def test_items_are_deterministic(split):
    valid, training_text = split
    files, decontaminator = valid[:4], code_tasks.Decontaminator(training_text)
    for name in SHIPPED_TASKS:
        first = code_tasks.build_items(name, files, decontaminator, seed=7, count=50)
        assert first == code_tasks.build_items(name, files, decontaminator, seed=7, count=50)
        assert first != code_tasks.build_items(name, files, decontaminator, seed=8, count=50) or not first


def test_task_yamls_name_local_data(task_dir):
    assert set(check_task_dir(task_dir)) == set(SHIPPED_TASKS)
    manifest = json.loads((task_dir / "manifest.json").read_text())
    assert manifest["chance"] == {"code_next_line": 0.25, "code_identifier": 0.0, "code_closure": 0.25}
    config = yaml.safe_load((task_dir / "code_next_line.yaml").read_text())
    assert config["dataset_path"] == "json" and config["target_delimiter"] == ""
    assert config["dataset_kwargs"]["data_files"]["test"] == str(task_dir / "code_next_line.jsonl")


def test_a_task_file_with_missing_fields_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"task": "bad", "dataset_path": "json",
                                                       "output_type": "multiple_choice", "doc_to_text": "q"}))
    with pytest.raises(UserError, match=r"bad.yaml: task file lacks doc_to_target, doc_to_choice"):
        check_task_dir(tmp_path)


def test_prepare_refuses_an_existing_directory(tmp_path):
    with pytest.raises(UserError, match="already exists"):
        prepare_tasks(tmp_path)


def test_distractors_come_from_the_same_file():
    text = "\n".join(f"x{i} = compute_{i}(value)" for i in range(40))
    items = code_tasks.next_line_items(code_tasks.CodeFile("f.py", text), random.Random(0))
    lines = set(text.split("\n"))
    assert items and all(set(item["choices"]) <= lines for item in items)


def test_offline_switches_are_set_before_the_harness_is_imported():
    import subprocess
    import sys

    code = ("from megatron_upcycle.evaluation.offline import go_offline; go_offline(); import datasets.config, "
            "huggingface_hub.constants as c; print(datasets.config.HF_DATASETS_OFFLINE, c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
