"""Per-subject tuning: the shared training loop, LoRA adapters, and each method's objective."""
