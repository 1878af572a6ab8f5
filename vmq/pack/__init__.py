"""The packed on-disk format (safetensors): bit packing, save, load, inspect."""
