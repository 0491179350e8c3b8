"""Benchmarks: one script per thing measured; results as JSON under bench/results/."""
