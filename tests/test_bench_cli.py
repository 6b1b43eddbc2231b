"""The benchmark CLI (fusedrnn.bench): argument errors, output files, and that a wrong provider is caught.

These check the harness, not speed: every run here is a tiny shape with few repeats on the CPU.
"""
from __future__ import annotations

import copy
import csv
import json
import os

import pytest
import torch

from fusedrnn import bench
from fusedrnn.bench import cli, presets, report
from fusedrnn.bench.presets import Case, Shape

TINY = ["--shape", "3,2,5,4", "--repeats", "2", "--warmup", "0", "--no-progress"]
REQUIRED = ["device", "device_name", "torch_version", "cuda_version", "commit", "fusedrnn_version", "provider",
            "status", "case", "cell", "seq_len", "batch", "input_size", "hidden", "dtype", "mode"]


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
BAD_ARGS = [
    (["--cell", "lstmx"], "--cell: unknown value 'lstmx'"),
    (["--cell", "lstm,grux"], "--cell: unknown value 'grux'"),
    (["--dtype", "float8"], "--dtype: unknown value 'float8'"),
    (["--preset", "huge"], "--preset: unknown preset 'huge'"),
    (["--mode", "bwd"], "--mode: unknown value 'bwd'"),
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--shape", "1,2,3"], "malformed --shape '1,2,3'"),
    (["--shape", "a,b,c,d"], "malformed --shape 'a,b,c,d'"),
    (["--shape", "4,0,8,8"], "malformed --shape '4,0,8,8'"),
    (["--batch", "0"], "--batch: expected positive integers, got 0"),
    (["--hidden", "x"], "--hidden: expected positive integers, got 'x'"),
    (["--layers", "-1"], "--layers: expected positive integers"),
    (["--repeats", "0"], "--repeats: expected a positive integer"),
    (["--device", "tpu"], "--device"),
    (["--replot", "/nonexistent/results.json"], "--replot: no such file"),
    (["--isa", "sse9"], "--isa: expected one of avx512, avx2, baseline or 'all', got 'sse9'"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--list"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_isa_level_runs_in_a_capped_child(capfd, tmp_path):
    """--isa baseline: the command again in a fresh process with fusedrnn and torch capped to the level."""
    status = cli.main(["--isa", "baseline", "--list", "--shape", "2,1,4,4", "--out", str(tmp_path)])
    out = capfd.readouterr().out
    assert status == 0, out
    assert "== ISA level baseline: FUSEDRNN_CPU_ISA=baseline ATEN_CPU_CAPABILITY=default" in out
    assert "lstm-T2-B1-I4-H4" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_and_backend_say_why(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda", "--list"])
    assert "CUDA is not available here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--backend", "cuda", "--list"])
    err = capsys.readouterr().err
    assert "backend 'cuda' is not available on cpu" in err and "available there:" in err


def test_list_resolves_presets_and_grids(capsys):
    code, out, _ = run_cli(["--list", "--preset", "quick"], capsys)
    assert code == 0
    n = len(presets.PRESETS["quick"].cells) * len(presets.PRESETS["quick"].shapes_for("lstm")) * 2
    assert f"{n} cases" in out and "lstm-T16-B32-I256-H256-L1-float32-fwdbwd" in out
    code, out, _ = run_cli(["--list", "--cell", "rnn_relu", "--mode", "fwd", "--seq-len", "10",
                            "--batch", "1,4", "--hidden", "32", "--input-size", "8", "--layers", "2",
                            "--bidirectional", "--dtype", "bf16", "--backend", "none"], capsys)
    assert code == 0
    assert "2 cases x 1 providers (torch)" in out
    assert "rnn_relu-T10-B4-I8-H32-L2-bi-bfloat16-fwd" in out


def test_flop_count():
    c = Case("lstm", Shape(25, 16, 512, 512), "float32", "fwd")
    assert presets.case_flops(c) == 25 * 2 * 16 * 4 * 512 * (512 + 512)
    assert presets.case_flops(Case("lstm", Shape(25, 16, 512, 512), "float32", "fwdbwd")) == 3 * presets.case_flops(c)
    # second layer of a bidirectional GRU sees 2H inputs; both directions count
    g = Case("gru", Shape(10, 2, 8, 16), "float32", "fwd", layers=2, bidirectional=True)
    per_direction = [2 * 10 * 2 * 3 * 16 * (8 + 16), 2 * 10 * 2 * 3 * 16 * (32 + 16)]  # 2*T*B*G*H*(I_l+H)
    assert presets.case_flops(g) == 2 * sum(per_direction)


def test_reserved_provider_names():
    with pytest.raises(ValueError):
        bench.register_provider("torch", lambda case, module: module)
    with pytest.raises(ValueError):
        bench.register_provider("fusedrnn:x", lambda case, module: module)


# ---------------------------------------------------------------------------------------------------------
# A real (tiny) run with test providers: a correct one, a wrong forward, a wrong gradient, a crashing one
# ---------------------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.5: a provider with a correct forward and a wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    calls: dict = {}

    def counted(name, fn, case):
        def wrapper(x, hx):
            calls[(name, case.id)] = calls.get((name, case.id), 0) + 1
            return fn(x, hx)
        return wrapper

    def good(case, module):
        return copy.deepcopy(module)  # an nn.Module: its parameter gradients are checked too

    def wrong_fwd(case, module):
        m = copy.deepcopy(module)

        def fn(x, hx):
            y, h = m(x, hx)
            return y * 1.001, h  # 0.1%: far above the fp32 tolerance, small enough to look plausible
        return counted("wrong_fwd", fn, case)

    def wrong_grad(case, module):
        m = copy.deepcopy(module)
        return counted("wrong_grad", lambda x, hx: m(_ScaleGrad.apply(x), hx), case)

    def crashing(case, module):
        def fn(x, hx):
            raise RuntimeError("kernel exploded")
        return counted("crashing", fn, case)

    names = {"good": good, "wrong_fwd": wrong_fwd, "wrong_grad": wrong_grad, "crashing": crashing}
    for name, make in names.items():
        bench.register_provider(name, make)
    out = str(tmp_path_factory.mktemp("bench"))
    try:
        code = cli.main(TINY + ["--cell", "lstm,gru", "--mode", "fwd,fwdbwd", "--backend", "reference",
                                "--out", out])
    finally:
        for name in names:
            bench.unregister_provider(name)
    return code, out, calls


def _rows(out):
    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    with open(os.path.join(out, "results.csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return data, csv_rows


def test_output_files_and_fields(tiny_run):
    code, out, _ = tiny_run
    assert code == 3  # a WRONG / ERROR provider makes the exit status 3
    data, csv_rows = _rows(out)
    rows = data["rows"]
    assert data["meta"]["providers"] == ["torch", "fusedrnn:reference", "good", "wrong_fwd", "wrong_grad",
                                         "crashing"]
    assert len(rows) == len(csv_rows) == 4 * 6  # 2 cells x 2 modes, 6 providers
    for r in rows + csv_rows:
        for field in REQUIRED:
            assert r.get(field) not in (None, ""), (field, r)
    assert rows[0]["torch_version"] == torch.__version__
    assert rows[0]["device"] == "cpu"
    if importlib_has("matplotlib"):
        png = os.path.join(out, "speedup.png")
        assert os.path.getsize(png) > 1000
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def importlib_has(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def test_correct_providers_are_timed(tiny_run):
    _, out, _ = tiny_run
    rows, _ = _rows(out)
    for r in rows["rows"]:
        if r["provider"] in ("torch", "fusedrnn:reference", "good"):
            assert r["status"] == "OK", r
            assert r["n_timed"] == 2 and r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["per_step_us"] == pytest.approx(r["median_ms"] * 1e3 / r["seq_len"])
            assert r["seq_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
            assert r["tflops"] > 0 and r["speedup_vs_torch"] > 0
            assert r["flops"] == presets.case_flops(Case(r["cell"], Shape(3, 2, 5, 4), r["dtype"], r["mode"]))
        if r["provider"] == "torch":
            assert r["speedup_vs_torch"] == 1.0


def test_wrong_providers_are_reported_and_never_timed(tiny_run):
    _, out, calls = tiny_run
    rows = _rows(out)[0]["rows"]
    by = {(r["provider"], r["cell"], r["mode"]): r for r in rows}
    for cell in ("lstm", "gru"):
        for mode in ("fwd", "fwdbwd"):
            r = by[("wrong_fwd", cell, mode)]
            assert r["status"] == "WRONG" and "y: max error" in r["detail"], r
            assert "median_ms" not in r
            assert calls[("wrong_fwd", r["case"])] == 1  # the check's call, nothing timed
            r = by[("crashing", cell, mode)]
            assert r["status"] == "ERROR" and "kernel exploded" in r["detail"]
        # the gradient is wrong, the forward is right: caught in fwdbwd only
        assert by[("wrong_grad", cell, "fwd")]["status"] == "OK"
        r = by[("wrong_grad", cell, "fwdbwd")]
        assert r["status"] == "WRONG" and "grad_x: max error" in r["detail"], r
        assert calls[("wrong_grad", r["case"])] == 1


def test_table_and_replot(tiny_run, capsys, tmp_path):
    _, out, _ = tiny_run
    code = cli.main(["--replot", os.path.join(out, "results.csv"), "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert code == 0
    assert "WRONG" in text and "Not timed:" in text and "vs torch" in text
    if importlib_has("matplotlib"):
        assert os.path.exists(tmp_path / "speedup.png")


def test_plot_without_matplotlib_is_skipped_with_a_message(tiny_run, monkeypatch, tmp_path):
    import sys
    _, out, _ = tiny_run
    _, rows = report.read_rows(os.path.join(out, "results.csv"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = report.plot_speedup(str(tmp_path / "p.png"), rows)
    assert "matplotlib is not installed" in why
    assert not (tmp_path / "p.png").exists()


def test_lengths_mode_compares_padded_packed_and_lengths(capsys, tmp_path):
    """--lengths: every column timed (so every path agreed with torch.nn packed first: run_case raises
    otherwise), the table printed, results.json written."""
    assert cli.main(["--lengths", "--device", "cpu", "--cell", "gru", "--mode", "fwd", "--seq-len", "3",
                     "--batch", "2", "--hidden", "4", "--repeats", "3", "--max-seconds", "0.1",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gru-fwd-T3-B2-H4" in out and "lengths=" in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 1 and set(rows[0]["ms"]) == {
        "torch padded", "torch packed", "fusedrnn padded", "fusedrnn lengths=", "fusedrnn packed",
        "fusedrnn packed module", "fusedrnn packed (fusedrnn pack/pad)"}
    assert all(v > 0 for v in rows[0]["ms"].values())


def test_lengths_mode_catches_a_wrong_path(monkeypatch):
    """The agreement check bites: with torch.nn's packed result perturbed, fusedrnn's lengths= result no longer
    matches it and the case is refused before anything is timed."""
    from fusedrnn.bench import lengths
    real = torch.nn.utils.rnn.pad_packed_sequence

    def shifted(*a, **k):  # torch's packed reference, perturbed
        y, n = real(*a, **k)
        return y + 1, n
    monkeypatch.setattr(lengths, "pad_packed_sequence", shifted)
    with pytest.raises(RuntimeError, match="disagrees with torch.nn packed"):
        lengths.run_case("gru", 3, 2, 4, "fwd", 3, 0.1)
