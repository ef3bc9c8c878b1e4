"""Benchmarks of the trainer: `bupo bench step` (bupo.bench.step: phase-one vs full update step) and `bupo bench
rollout` (bupo.bench.rollout: the samplers side by side). The kernel microbenchmarks live with the kernels
(`bupo bench kernels` = bupo.kernels.bench)."""
