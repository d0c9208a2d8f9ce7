"""Benchmark code, not the framework: the controlled-sentiment benchmark's ground-truth reward (VADER)
and its prompts and sampled pairs (`alignlab.bench.sentiment`). Nothing in the core package imports
it; its dependency is optional: ``pip install 'alignlab[bench]'`` (``vadersentiment``)."""
