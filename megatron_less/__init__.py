"""megatron-less: GRPO + LESS on Megatron-Core."""
__version__ = "0.1.0"
