"""Each example in a tiny configuration, in-process: metrics printed, files written, better than chance."""
import os

import pytest

pytest.importorskip("matplotlib")


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_calculator(tmp_path, capsys):
    from fusedrnn.examples import calculator
    res = calculator.main(["--digits", "1", "--hidden", "48", "--emb", "16", "--steps", "150", "--batch", "64",
                           "--lr", "1e-2", "--test-size", "30", "--eval-every", "150", "--beam", "3",
                           "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "held-out exact match (beam 3)" in out
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    # 1-digit a+b / a-b has 28 possible answers: guessing one gets ~1/28 of them right
    assert res["exact_match"] > 3 / 28, res


def test_charlm(tmp_path, capsys):
    from fusedrnn.examples import charlm
    res = charlm.main(["--max-chars", "8000", "--layers", "1", "--emb", "16", "--hidden", "32", "--seq-len", "32",
                       "--batch", "16", "--epochs", "1", "--steps-per-epoch", "40", "--lr", "1e-2",
                       "--gen-length", "12", "--beam", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "held-out" in out and "bits/char" in out
    assert [name for name, _, _ in res["decodings"]] == ["greedy", "beam 3", "top-k 5", "top-p 0.9"]
    assert all(lp < 0 and lp > -1e9 for _, _, lp in res["decodings"])
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    # chance: a uniform guess over the vocabulary
    assert res["bpc"] < res["uniform_bpc"] - 0.5, res


def test_events(tmp_path, capsys):
    from fusedrnn.examples import events
    res = events.main(["--train-clips", "128", "--test-clips", "32", "--frames", "32", "--hidden", "32",
                       "--layers", "1", "--steps", "80", "--lr", "1e-2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| model | parameters | frame F1 |" in out and "BiLSTM (merge_mode=sum)" in out
    assert [r["model"] for r in res["results"]] == ["MLP", "LSTM", "BiLSTM"]
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    f1 = {r["model"]: r["f1"] for r in res["results"]}
    # chance: predicting each class at its training frequency; too few steps here to rank the models
    assert f1["MLP"] > res["chance_f1"] + 0.1 and f1["BiLSTM"] > res["chance_f1"] + 0.1, (f1, res["chance_f1"])


def test_memory(tmp_path, capsys):
    from fusedrnn.examples import memory
    res = memory.main(["--lengths", "5", "--steps", "150", "--hidden", "16", "--lr", "1e-2", "--test-size", "500",
                       "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| T | rnn_tanh | lstm | gru |" in out and "accuracy" in out
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    # chance: always answering the mean, 1.0 (MSE 1/6, accuracy ~0.078)
    assert all(m[0] < 0.6 * res["chance_mse"] for m in res["mse"].values()), res["mse"]
    assert max(a[0] for a in res["accuracy"].values()) > res["chance"] + 0.1, res["accuracy"]
