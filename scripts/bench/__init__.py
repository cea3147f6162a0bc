"""Benchmarks. Each module is a command (`python -m scripts.bench.NAME --help`) that prints a table and, with
--json-out, writes a report with the device, the commit, the date and the command that reproduces it
(`harness.report`). Every GPU figure is held against one baseline measured in the same run: a torch
device-to-device copy (`harness.torch_copy_rate`), the rate the hardware actually reaches.

  decode        decode tok/s of the one-jit generate program (dense / sparse, batch sizes, engine options)
  ab            one decode benchmark run alternately on two checkouts (a change against the commit before it)
  ffn           one FFN layer at decode: the dense XLA FFN against the sparse kernels (+ compaction, predictor)
  gemv          decode products: XLA's against the Pallas GEMV over tiles
  build         predictor construction time for a model shape
  transformers  transformers (eager, static cache + compile) on the same random weights as `decode`
  torch_bridge  the torch executor on a CUDA / NPU device: parity with JAX, and its speed
  bytes         bytes a decode step reads, and the sparse byte ceiling, from a `decode` report
  trace         per-kernel GPU time from a jax.profiler trace
"""
