"""fusedrnn.bench: the benchmark behind `python -m fusedrnn.bench` (console script `fusedrnn-bench`).

    presets.py    Case, Shape, the presets (quick, deepbench, full, tiny) and the FLOP count per cell
    providers.py  torch.nn (baseline), one provider per fusedrnn backend, register_provider (test hook)
    check.py      correctness of every provider against torch.nn before timing (the test suite's rule)
    timing.py     CUDA events / perf_counter, median and quantiles, peak memory
    runner.py     the loop over cases and providers
    report.py     environment record, table, results.json / results.csv, speedup.png, progress bar
    cli.py        arguments and main()

`python -m fusedrnn.bench --help` lists the options.
"""
from .cli import main  # noqa: F401
from .providers import register_provider, unregister_provider  # noqa: F401
