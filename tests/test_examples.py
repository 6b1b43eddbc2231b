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


def test_classify(tmp_path, capsys):
    from fusedrnn.examples import classify
    res = classify.main(["--models", "rnn", "gru", "--max-docs", "60", "--max-tokens", "24", "--emb", "16",
                         "--hidden", "32", "--vocab", "300", "--epochs", "4", "--batch", "16", "--lr", "1e-2",
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| model | parameters (torch.nn) | Keras equivalent | held-out accuracy | train s |" in out
    assert len(res["labels"]) == 10 and all(os.path.isfile(p) and _png(p) for p in res["files"])
    rows = {r["model"]: r for r in res["results"]}
    # Keras' SimpleRNN has one bias vector (torch.nn two: one hidden-size vector more); GRU(reset_after) two
    assert rows["SimpleRNN"]["params"] - rows["SimpleRNN"]["keras_params"] == 32
    assert rows["GRU"]["params"] == rows["GRU"]["keras_params"]
    # chance: 1 in 10 packages
    assert max(r["accuracy"] for r in res["results"]) > res["chance"] + 0.1, res["results"]


def test_classify_lengths_ignore_padding():
    import torch
    from fusedrnn.examples.classify import Classifier
    torch.manual_seed(0)
    for kind in ("rnn", "lstm", "gru", "deep"):
        model = Classifier(kind, 50, 8, 12, 16, 0.0).eval()
        x = torch.randint(2, 50, (2, 7))
        short = model(x[:, :4], torch.tensor([4, 4]))
        padded = model(torch.cat([x[:, :4], torch.zeros(2, 3, dtype=torch.long)], 1), torch.tensor([4, 4]))
        assert torch.allclose(short, padded, atol=1e-5), kind


def test_autoencoder(tmp_path, capsys):
    from fusedrnn.examples import autoencoder
    res = autoencoder.main(["--length", "24", "--hidden", "32", "--code", "8", "--steps", "80", "--batch", "32",
                            "--lr", "1e-2", "--test-size", "100", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| decoder | held-out MSE | / mean predictor's |" in out and "ROC AUC" in out
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    assert all(0.0 <= a <= 1.0 for a in res["auc"].values())
    # the teacher-forced decoder sees the previous true frame: it must beat predicting the mean frame
    assert res["mse"]["conditioned, teacher-forced"] < 0.8 * res["mean_mse"], res["mse"]


def test_autoencoder_roc_auc():
    import torch
    from fusedrnn.examples.autoencoder import roc_auc
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert roc_auc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0.0
    assert roc_auc(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.3])) == 0.625  # one tie, counted half


def test_ctc_decoders():
    import math
    import torch
    from fusedrnn.examples.ctc import edit_distance, greedy_decode, prefix_beam_decode
    # best path: a a _ a b b _ -> "a a b" (repeats merge unless a blank separates them)
    path = torch.tensor([1, 1, 0, 1, 2, 2, 0])
    lp = torch.full((7, 3), -10.0).scatter(1, path[:, None], 0.0).log_softmax(-1)
    assert greedy_decode(lp, 7) == [1, 1, 2] and prefix_beam_decode(lp, 7, 4) == [1, 1, 2]
    # two frames, P(blank) = 0.4 each, P(a) = 0.6 each... best path is "a" either way; make the best path wrong:
    # P(_)=0.6, P(a)=0.4 per frame: best path "" (0.36) but "a" = 0.4*0.4 + 2*0.4*0.6 = 0.64
    lp = torch.tensor([[math.log(0.6), math.log(0.4)]] * 2)
    assert greedy_decode(lp, 2) == [] and prefix_beam_decode(lp, 2, 4) == [1]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2


def test_ctc(tmp_path, capsys):
    from fusedrnn.examples import ctc
    res = ctc.main(["--symbols", "4", "--noise", "0.3", "--min-symbols", "2", "--max-symbols", "4", "--hidden",
                    "32", "--layers", "1", "--models", "rnn", "bilstm", "--steps", "150", "--batch", "16",
                    "--lr", "1e-2", "--test-size", "40", "--beam", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| model (1 layers of 32) | parameters | LER greedy | LER beam 4 | train s |" in out
    assert [r["model"] for r in res["results"]] == ["RNN-tanh", "BiLSTM"]
    assert all(os.path.isfile(p) and _png(p) for p in res["files"])
    # chance: emitting nothing (or guessing) has a label error rate of 1 or more
    assert res["results"][-1]["beam_ler"] < 0.5, res["results"]
