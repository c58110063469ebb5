"""Checkpoints on disk, one module per concern.

files    errors, atomic output folders, JSON, dtype and size parsing (no torch.distributed)
hf       HF Qwen2 folders: validated lazy reader, sharded writer
model    megatron-core torch_dist save/load of the model at any TP/PP layout
convert  HF <-> Megatron conversions, their launcher and the convert-hf / export-hf commands
"""
