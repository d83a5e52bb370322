"""Where each method lives: one module or package per method of METHODS.md (in the
team's shared/ folder), each holding its math, objective, sampling and export.

- `base`: the interface every method implements, and the context it works in.
- `registry`: every method by name; resolves what a method needs and what is stale.
- `sft`: DreamBooth-LoRA per subject (SFO's starting point).
- `sfo`: Subject Fidelity Optimization on CDNS negatives (section 1).
- `jedi`: the joint-image model and zero-shot SFO on it (section 2).
"""

# The command group (`subjectflow concepts learn|show|evaluate|export`) for the method that
# learns named concept sets (`registry.learner()`). It lives here, not in the CLI, so the
# CLI names no method, and costs no import: the registry loads torch and every method.
SETS_COMMAND = "concepts"
