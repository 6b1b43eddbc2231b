"""`python -m fusedrnn.demo`: fusedrnn.LSTM next to torch.nn.LSTM with the same weights, results and timings.

A quick look at the drop-in promise on whatever device is here: same state_dict, same outputs and gradients,
which backend ran, and the forward time of both.
"""
from __future__ import annotations

import time

import torch

import fusedrnn


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    T, B, I, H = 32, 8, 64, 128
    ours = fusedrnn.LSTM(I, H, num_layers=2, batch_first=True, device=device)
    theirs = torch.nn.LSTM(I, H, num_layers=2, batch_first=True, device=device)
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes: loads both ways
    x = torch.randn(B, T, I, device=device, requires_grad=True)

    y1, (h1, c1) = ours(x)
    y2, (h2, c2) = theirs(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *ours.parameters()])
    g2 = torch.autograd.grad(y2.square().sum(), [x, *theirs.parameters()])
    grad_err = max((a - b).abs().max().item() for a, b in zip(g1, g2))

    print(f"device {device}, torch {torch.__version__}, fusedrnn {fusedrnn.__version__}")
    print(f"available backends: {fusedrnn.available_backends(device)}")
    print(fusedrnn.explain(ours, x))
    print(f"LSTM(I={I}, H={H}, layers=2) on input [B={B}, T={T}, I={I}]")
    print(f"  fusedrnn.LSTM   output[0, -1, :4] = {y1[0, -1, :4].tolist()}")
    print(f"  torch.nn.LSTM   output[0, -1, :4] = {y2[0, -1, :4].tolist()}")
    print(f"  max |difference|: output {(y1 - y2).abs().max().item():.2e}, h_n {(h1 - h2).abs().max().item():.2e}, "
          f"c_n {(c1 - c2).abs().max().item():.2e}, gradients {grad_err:.2e}")
    with torch.no_grad():
        t_ours = _median_ms(lambda: ours(x))
        t_theirs = _median_ms(lambda: theirs(x))
    print(f"  forward time: fusedrnn {t_ours:.2f} ms, torch.nn {t_theirs:.2f} ms")


if __name__ == "__main__":
    main()
