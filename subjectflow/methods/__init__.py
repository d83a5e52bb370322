"""Where each method lives: one module or package per method of METHODS.md (in the
team's shared/ folder), each holding its math, objective, sampling and export.

- `base`: the interface every method implements, and the context it works in.
- `registry`: every method by name; resolves what a method needs and what is stale.
- `sft`: DreamBooth-LoRA per subject (SFO's starting point).
- `sfo`: Subject Fidelity Optimization on CDNS negatives (section 1).
- `jedi`: the joint-image model and zero-shot SFO on it (section 2).
"""
