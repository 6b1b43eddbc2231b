"""Runnable examples: `python -m fusedrnn.examples.<name> --help` (calculator, charlm, events, memory)."""
