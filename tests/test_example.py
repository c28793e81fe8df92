"""The training example runs end to end (CPU, tiny sizes) and logs finite losses and metrics."""

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_msa_layer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_msa_layer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_runs_and_logs(tmp_path):
    example = _load_example()
    history = example.main([
        "--device", "cpu", "--seqlen", "384", "--steps", "3", "--warmup-steps", "1", "--log-every", "1",
        "--d-model", "32", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "64", "--index-dim", "64",
        "--block-size", "64", "--topk", "2", "--pairs", "6", "--sample-queries", "16", "--out", str(tmp_path),
    ])
    assert [row["step"] for row in history] == [1, 2, 3]
    assert [row["kl_support"] for row in history] == ["dense", "selected", "selected"]
    for row in history:
        for key in ("lm", "kl", "acc", "recall", "overlap"):
            assert math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["recall"] <= 1.0 + 1e-5 and 0.0 <= row["overlap"] <= 1.0
        assert row["kl"] >= -1e-6
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "run.json").exists()


def test_recall_task_batches_place_pairs_and_answers():
    import torch

    example = _load_example()
    gen = torch.Generator().manual_seed(3)
    batch = example.make_batch(2, 256, 5, 64, 64, 256, gen, "cpu")
    x, pos, ans = batch["x"], batch["answer_pos"], batch["answers"]
    for b in range(2):
        for p, a in zip(pos[b].tolist(), ans[b].tolist()):
            marker = x[b, p].item()
            assert p >= 128 and marker < 64
            first = (x[b, :128] == marker).nonzero().flatten().tolist()
            assert len(first) == 1 and x[b, first[0] + 1].item() == a  # the value follows the marker
