"""Post-training quantization (PTQ4VM and baselines): quantizers, truncation search, smoothing."""
