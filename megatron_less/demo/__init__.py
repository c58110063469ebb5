"""The embedded demo: a task that needs no download (addition problems generated from a seed), a
tiny Qwen2 model warmed up on it, and `megatron-less demo`, which runs the real trainer on them."""
