"""notebooks/rlhf_tiny.ipynb: committed without outputs, its step counts in one cell, and run top to bottom in a
real kernel (nbclient) on smaller step counts, as a user runs it."""

import ast
import json
import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "rlhf_tiny.ipynb")


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters' holds the step counts"
    return cells[0]


def assigned(source: str) -> dict:
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets}


def test_the_committed_notebook_has_no_outputs_and_its_settings_in_one_cell():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    settings = assigned(parameters_cell(nb).source)
    assert settings["SFT_STEPS"] == 100 and settings["PPO_EPISODES"] == 640  # the demo's, as run_pipeline.sh
    # no other cell sets a step count of its own
    for c in code:
        if c is not parameters_cell(nb):
            assert not set(assigned_names(c.source)) & set(settings), c.source


def assigned_names(source: str) -> list[str]:
    return [t.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)]


@pytest.mark.slow
def test_the_notebook_runs_the_whole_chain_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = parameters_cell(nb)
    small = {"OUT": str(tmp_path / "run"), "SEED": 0, "SFT_STEPS": 4, "SFT_VALID": 16, "RM_STEPS": 4,
             "RM_EVAL_PAIRS": 32, "PPO_EPISODES": 32,
             "PPO_EVAL_EVERY": 1, "PPO_EVAL_PROMPTS": 8, "EVAL_PROMPTS": 8, "BEST_OF_N": 2}
    assert set(small) == set(assigned(cell.source))  # every setting replaced, none unknown
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in small.items())
    # Started in notebooks/, as Jupyter starts it; the notebook finds the repository itself.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # SFT loss, PPO panels, the models' comparison, best of n: inline
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "RLHF pipeline summary (seed 0)" in text and "win rate (gold) vs sft" in text
    assert "time          pretrained tiny model" in text and ", evaluate " in text  # every stage timed

    run = tmp_path / "run"
    for path in ("sft/adapter_model.safetensors", "sft_merged/config.json", "rm/config.json",
                 "ppo/adapter_model.safetensors", "final/config.json", "eval/eval.json", "report.md"):
        assert (run / path).is_file(), path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ppo_steps"] == 2 and summary["eval_prompts"] == 8  # the replaced step counts were used
    assert summary["eval_baseline"] == "sft" and summary["eval_final"] == "final"
    assert [h["step"] for h in summary["ppo_held_out"]] == [0, 1, 2]  # the gold judge watched every step
