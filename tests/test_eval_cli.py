"""`upcycle eval`: a tiny real Megatron checkpoint -> verified export -> lm-evaluation-harness, offline."""
from __future__ import annotations

import json

import pytest

from eval_models import tiny_dense_checkpoint
from megatron_upcycle.cli import main

pytest.importorskip("lm_eval")
SHIPPED = "code_next_line,code_identifier,code_closure"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed

    quiet_megatron()
    backend = select_backend()
    init_distributed(backend, ParallelConfig(), seed=1234)
    try:
        return tiny_dense_checkpoint(backend, tmp_path_factory.mktemp("model"))
    finally:
        destroy_distributed()


def _upcycle(capsys, *args):
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_checkpoint_is_exported_and_evaluated(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, stderr = _upcycle(capsys, checkpoint, "--tasks", SHIPPED, "--limit", 6, "--batch-size", 8,
                                    "--out", out)
    assert code == 0, stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in summary["rows"]}
    for task in SHIPPED.split(","):
        acc = rows[(task, "acc")]
        assert 0 <= acc["value"] <= 1 and acc["n"] == 6 and acc["stderr"] is not None
    assert ("code_next_line", "acc_norm") in rows
    # core average: mean over tasks of (acc - chance) / (1 - chance)
    chance = {"code_next_line": 0.25, "code_identifier": 0.0, "code_closure": 0.25}
    expected = sum((rows[(t, "acc")]["value"] - c) / (1 - c) for t, c in chance.items()) / 3
    assert summary["core_average"] == pytest.approx(expected)
    assert rows[("core_average", "acc_above_chance")]["value"] == pytest.approx(expected)
    harness = json.loads((out / "lm_eval_results.json").read_text())
    assert set(harness["results"]) == set(chance) and harness["backend"] == "hf"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "lm_eval_results.json"]  # export removed
    assert not list(tmp_path.glob(".tmp-*"))
    assert "core_average" in stdout


def test_an_hf_directory_is_evaluated_as_it_is(checkpoint, tmp_path, capsys):
    assert main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    code, _, stderr = _upcycle(capsys, tmp_path / "hf", "--tasks", "code_closure", "--limit", 3,
                               "--out", tmp_path / "eval")
    assert code == 0, stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"][0]["n"] == 3


@pytest.mark.parametrize("case", ["unknown task", "not a model", "output exists", "bad task file", "not offline"])
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, case):
    out, model, tasks, extra = tmp_path / "eval", checkpoint, "code_next_line", []
    if case == "unknown task":
        tasks, message = "code_next_lien", "unknown task 'code_next_lien'; did you mean code_next_line"
    elif case == "not a model":
        model = tmp_path / "empty"
        model.mkdir()
        message = "is neither a Hugging Face model directory (config.json) nor a Megatron checkpoint"
    elif case == "output exists":
        out.mkdir()
        message = "already exists"
    elif case == "bad task file":
        bad = tmp_path / "tasks"
        bad.mkdir()
        (bad / "mine.yaml").write_text("task: mine\ndataset_path: json\noutput_type: loglikelihood\n")
        tasks, extra, message = "mine", ["--task-dir", bad], "mine.yaml: task file lacks doc_to_text, doc_to_target"
    else:
        tasks, message = "arc_easy", "task 'arc_easy': its data is not available offline"
    code, stdout, stderr = _upcycle(capsys, model, "--tasks", tasks, "--out", out, *extra)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert out.exists() == (case == "output exists") and not list(tmp_path.glob(".tmp-*"))
    if case == "output exists":
        assert not list(out.iterdir())  # nothing written into it
