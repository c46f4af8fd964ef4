"""Speed and memory benchmarks of grpo_kernels against its peers (see bench/RESULTS.md)."""
