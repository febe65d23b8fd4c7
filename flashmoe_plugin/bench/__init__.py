"""Benchmarks that print JSON, each figure next to its bound measured in the same run
(DESIGN.md section 9). `kernels.run(device, quick)` is what `flashmoe bench --kernels` prints;
kernels_cuda holds the CUDA half. Benchmarks are never timed assertions in tests."""
