"""PackedSequence <-> padded batch in C++ (csrc/cpu/packed_sequence.cpp), as the modules unpack and repack a
PackedSequence on CPU tensors (fusedrnn/nn.py: _unpack / _repack): equal to torch's pad_packed_sequence /
pack_padded_sequence, differentiable both ways (each the other's adjoint), and loud on a malformed
PackedSequence. The modules' packed results against torch.nn are tested in test_modules.py / test_fuzz.py."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import nn as fnn
from fusedrnn._extension import has_extension

pytestmark = pytest.mark.skipif(not has_extension() or not hasattr(torch.ops.fusedrnn, "cpu_packed_to_padded"),
                                reason="needs the C++ extension")

CASES = {  # T, B, trailing dims, enforce_sorted
    "T1-B1": (1, 1, (3,), True),
    "T5-B3-unsorted": (5, 3, (4,), False),
    "T9-B7-unsorted-2d-rows": (9, 7, (2, 3), False),
    "T70-B16-sorted": (70, 16, (5,), True),
    "T200-B5-unsorted": (200, 5, (1,), False),  # several parallel tasks of steps
}


def _packed(T, B, rest, enforce_sorted, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[B // 2] = T
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x = torch.randn((T, B) + rest, generator=g, dtype=torch.float64).to(dtype)
    return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64],
                         ids=["fp64", "fp32", "fp16", "bf16", "int64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_functions(case, dtype):
    T, B, rest, enforce_sorted = CASES[case]
    packed, lengths = _packed(T, B, rest, enforce_sorted, dtype)
    padded, got_lengths = torch.ops.fusedrnn.cpu_packed_to_padded(packed.data, packed.batch_sizes,
                                                                  packed.sorted_indices)
    want, want_lengths = pad_packed_sequence(packed)  # zero padding, the caller's order
    assert padded.dtype == dtype and torch.equal(padded, want)
    assert torch.equal(got_lengths, want_lengths) and torch.equal(got_lengths, lengths)
    data = torch.ops.fusedrnn.cpu_padded_to_packed(want, packed.batch_sizes, packed.sorted_indices)
    assert torch.equal(data, packed.data)


@pytest.mark.parametrize("case", ["T5-B3-unsorted", "T9-B7-unsorted-2d-rows"])
def test_gradients_are_each_others_adjoint(case):
    T, B, rest, enforce_sorted = CASES[case]
    packed, _ = _packed(T, B, rest, enforce_sorted)
    data = packed.data.clone().requires_grad_(True)
    layout = (packed.batch_sizes, packed.sorted_indices)
    unpack = lambda d: fnn._CpuPackedToPadded.apply(d, *layout)[0]  # noqa: E731
    torch.autograd.gradcheck(unpack, (data,))
    torch.autograd.gradgradcheck(unpack, (data,))
    padded = pad_packed_sequence(packed)[0].clone().requires_grad_(True)
    repack = lambda p: fnn._CpuPaddedToPacked.apply(p, *layout)  # noqa: E731
    torch.autograd.gradcheck(repack, (padded,))
    torch.autograd.gradgradcheck(repack, (padded,))
    # past each sequence's end the padded batch takes no gradient
    grad = torch.autograd.grad(repack(padded).sum(), padded)[0]
    ones = PackedSequence(torch.ones_like(packed.data), packed.batch_sizes, packed.sorted_indices,
                          packed.unsorted_indices)
    assert torch.equal(grad, pad_packed_sequence(ones)[0])


def test_modules_take_the_cpp_pair_on_cpu_and_match_lengths():
    torch.manual_seed(0)
    lstm = fusedrnn.LSTM(4, 5, bidirectional=True).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 6, 2])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert fnn._unpack(packed)[2] == "cpu"
    y_packed, (h_p, c_p) = lstm(packed)
    y_len, (h_l, c_l) = lstm(x, lengths=lengths)
    y_unpacked = pad_packed_sequence(y_packed)[0]
    assert torch.equal(y_unpacked, y_len) and torch.equal(h_p, h_l) and torch.equal(c_p, c_l)
    g_packed = torch.autograd.grad(y_packed.data.sum() + h_p.sum(), x)[0]
    g_len = torch.autograd.grad(y_len.sum() + h_l.sum(), x)[0]
    assert torch.equal(g_packed, g_len)


def test_malformed_packed_sequences_raise():
    data = torch.randn(6, 2)
    op = torch.ops.fusedrnn.cpu_packed_to_padded
    with pytest.raises(RuntimeError, match=r"batch_sizes: expected non-increasing values >= 1, got 3 at step 1"):
        op(data, torch.tensor([2, 3, 1]), None)
    with pytest.raises(RuntimeError, match=r"batch_sizes sum to 5 rows, but the data has 6"):
        op(data, torch.tensor([3, 2]), None)
    with pytest.raises(RuntimeError, match=r"batch_sizes: expected a 1-D int64 CPU tensor"):
        op(data, torch.tensor([3, 3], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"sorted_indices: expected a permutation of 0..2, got 1 at position 2"):
        op(data, torch.tensor([3, 3]), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match=r"sorted_indices: expected a permutation of 0..2, got 5 at position 0"):
        op(data, torch.tensor([3, 3]), torch.tensor([5, 1, 0]))
    with pytest.raises(RuntimeError, match=r"padded: expected a batch of 3, got 2"):
        torch.ops.fusedrnn.cpu_padded_to_packed(torch.randn(2, 2, 2), torch.tensor([3, 3]), None)
    with pytest.raises(RuntimeError, match=r"padded: expected 2 time steps \(batch_sizes\), got 4"):
        torch.ops.fusedrnn.cpu_padded_to_packed(torch.randn(4, 3, 2), torch.tensor([3, 3]), None)
    # and through a module: a hand-made PackedSequence with a bad layout
    bad = PackedSequence(torch.randn(6, 4), torch.tensor([2, 3, 1]))
    with pytest.raises(RuntimeError, match=r"non-increasing"):
        fusedrnn.GRU(4, 3)(bad)


# ---------------------------------------------------------------------------------------------------------
# fusedrnn.pack_padded_sequence / pad_packed_sequence: torch's functions, one C++ pass each on the CPU
# ---------------------------------------------------------------------------------------------------------
def _same_packed(a: PackedSequence, b: PackedSequence):
    assert torch.equal(a.data, b.data) and torch.equal(a.batch_sizes, b.batch_sizes)
    for x, y in ((a.sorted_indices, b.sorted_indices), (a.unsorted_indices, b.unsorted_indices)):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("case", list(CASES))
def test_drop_ins_match_torch(case, batch_first):
    T, B, rest, enforce_sorted = CASES[case]
    packed, lengths = _packed(T, B, rest, enforce_sorted)
    padded = pad_packed_sequence(packed, batch_first=batch_first)[0]
    for lens in (lengths, lengths.tolist()):
        _same_packed(fusedrnn.pack_padded_sequence(padded, lens, batch_first, enforce_sorted),
                     pack_padded_sequence(padded, lens, batch_first, enforce_sorted))
    got, got_lengths = fusedrnn.pad_packed_sequence(packed, batch_first=batch_first)
    want, want_lengths = pad_packed_sequence(packed, batch_first=batch_first)
    assert torch.equal(got, want) and torch.equal(got_lengths, want_lengths)
    # a padded batch longer than its longest sequence: the extra steps are dropped, as torch drops them
    longer = torch.cat([padded, torch.ones_like(padded)], 1 if batch_first else 0)
    _same_packed(fusedrnn.pack_padded_sequence(longer, lengths, batch_first, enforce_sorted),
                 pack_padded_sequence(longer, lengths, batch_first, enforce_sorted))


def test_drop_ins_are_differentiable():
    packed, lengths = _packed(6, 4, (3,), False)
    padded = pad_packed_sequence(packed)[0].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda p: fusedrnn.pack_padded_sequence(p, lengths, enforce_sorted=False).data,
                             (padded,))
    data = packed.data.clone().requires_grad_(True)
    repacked = lambda d: fusedrnn.pad_packed_sequence(  # noqa: E731
        PackedSequence(d, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices))[0]
    torch.autograd.gradcheck(repacked, (data,))


def test_drop_ins_defer_to_torch_for_what_they_do_not_take():
    packed, lengths = _packed(5, 3, (2,), False)
    # torch's own errors, word for word
    x = torch.randn(5, 3, 2)
    for bad, kwargs in (([5, 0, 2], {"enforce_sorted": False}), ([2, 5, 3], {})):
        with pytest.raises(RuntimeError) as want:
            pack_padded_sequence(x, bad, **kwargs)
        with pytest.raises(RuntimeError, match=str(want.value)[:40].replace("(", r"\(").replace(")", r"\)")):
            fusedrnn.pack_padded_sequence(x, bad, **kwargs)
    # padding values and total lengths the C++ pass does not produce: torch's results
    for kwargs in ({"padding_value": -1.0}, {"total_length": 8}):
        got, want = fusedrnn.pad_packed_sequence(packed, **kwargs), pad_packed_sequence(packed, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="total_length"):
        fusedrnn.pad_packed_sequence(packed, total_length=2)


def test_drop_ins_take_the_cpp_pass_on_cpu(monkeypatch):
    """With torch's functions disabled, the CPU calls still run: they never went through them."""
    packed, lengths = _packed(7, 4, (3,), False)
    padded = pad_packed_sequence(packed)[0]

    def refuse(*a, **k):
        raise AssertionError("torch's function was called")
    monkeypatch.setattr(torch.nn.utils.rnn, "pack_padded_sequence", refuse)
    monkeypatch.setattr(torch.nn.utils.rnn, "pad_packed_sequence", refuse)
    _same_packed(fusedrnn.pack_padded_sequence(padded, lengths, enforce_sorted=False), packed)
    assert torch.equal(fusedrnn.pad_packed_sequence(packed)[0], padded)
