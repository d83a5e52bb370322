"""What a user hands to diffusers, the Hub or ComfyUI: one LoRA file that is the whole
policy, its provenance in the safetensors header, and a model card.

A stack of LoRAs loaded together at weight 1 (SFO on its SFT parent) is one LoRA whose
rank is the sum: each layer's down matrices stacked along the rank, its up matrices side
by side, so up·down is the sum of the parts. Every adapter here has alpha = rank (scale
1), and a file without alpha loads with alpha = rank too, so nothing needs rescaling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch

from ..catalog import Catalog
from ..catalog.schemas import METRICS, SAMPLES
from .adapters import WEIGHT_NAME

CARD_SAMPLES = 4


def stacked_lora_bytes(files: list[Path], metadata: dict[str, str]) -> bytes:
    """One diffusers LoRA file equal to `files` loaded together at weight 1."""
    parts = [safetensors.torch.load_file(f) for f in files]
    keys = set(parts[0])
    if any(set(p) != keys for p in parts[1:]):
        raise ValueError("these LoRA files adapt different layers; they cannot be stacked into one")
    merged = {k: torch.cat([p[k] for p in parts], dim=0 if ".down." in k else 1).contiguous() for k in sorted(keys)}
    return safetensors.torch.save(merged, metadata={"format": "pt", **metadata})


def lora_rank(file: Path) -> int:
    tensors = safetensors.torch.load_file(file)
    return next(t.shape[0] for k, t in tensors.items() if ".down." in k)


def artefact_key(row: dict) -> str:
    """An adapters row's id, or a models row's (a shared model)."""
    return row.get("adapter_id") or row["model_id"]


def export_lora_policy(catalog: Catalog, method: str, base: str, trigger: str, rows: list[dict],
                       out: Path, usage: str = "") -> list[Path]:
    """`rows` (base-most first) as one `pytorch_lora_weights.safetensors`, a README model
    card with the latest scores, samples and `usage` (how the method samples, when that is
    more than txt2img), and the samples beside it."""
    out.mkdir(parents=True, exist_ok=True)
    files = [catalog.blob_path(r["file"]) for r in rows]
    ranks = [lora_rank(f) for f in files]
    policy = rows[-1]
    meta = {"subjectflow.method": method, "subjectflow.base_model": base, "subjectflow.trigger": trigger,
            "subjectflow.adapters": json.dumps([artefact_key(r) for r in rows]),
            "subjectflow.ranks": json.dumps(ranks), "subjectflow.subject": policy.get("subject_id") or ""}
    weights = out / WEIGHT_NAME
    weights.write_bytes(stacked_lora_bytes(files, meta))
    samples = _samples(catalog, artefact_key(policy), out)
    card = out / "README.md"
    card.write_text(_card(catalog, method, base, trigger, rows, ranks, samples, usage))
    return [weights, card, *samples]


def _samples(catalog: Catalog, key: str, out: Path) -> list[Path]:
    rows = [r for r in catalog.read(SAMPLES.name).to_pylist() if key in (r["adapter_id"], r["model_id"])]
    (out / "samples").mkdir(exist_ok=True)
    return [Path(shutil.copyfile(catalog.blob_path(r["file"]), out / "samples" / f"{i}.png"))
            for i, r in enumerate(rows[:CARD_SAMPLES])]


def _card(catalog: Catalog, method: str, base: str, trigger: str, rows: list[dict], ranks: list[int],
          samples: list[Path], usage: str) -> str:
    policy, key = rows[-1], artefact_key(rows[-1])
    scores = [m for m in catalog.read(METRICS.name).to_pylist() if m["model_ref"] == key]
    stack = " + ".join(f"{r['method']} r{k}" for r, k in zip(rows, ranks))
    subject = policy.get("subject_id")
    lines = [f"# {subject or 'shared across subjects'} ({method})", "",
             f"- base model: `{base}`", f"- trigger words: `{trigger}`",
             f"- LoRA rank {sum(ranks)} (stacked: {stack})",
             f"- artefacts: {', '.join(artefact_key(r) for r in rows)}", "",
             "```python",
             "pipe.load_lora_weights(\"<this folder>\", weight_name=\"pytorch_lora_weights.safetensors\")",
             "```", ""]
    if usage:
        lines += [usage, ""]
    lines += ["## Training", ""]
    lines += [f"- {r['method']}: {r['steps']} steps, final loss {r['final_loss']:.4f}, params `{r['params']}`"
              for r in rows]
    lines += ["", "## Scores", ""]
    if scores:
        flagged = {m["scorer_kind"] for m in scores} - {"pretrained"}
        lines += [f"- {m['metric']}: {m['value']:.3f} ({m['scorer_kind']} scorer)" for m in scores]
        if flagged:
            lines.append(f"\nScores marked {', '.join(sorted(flagged))} do not come from pretrained scorers.")
    else:
        target = f" --subject {subject}" if subject else ""
        lines.append(f"Not evaluated yet: `subjectflow evaluate{target} --method {method}`.")
    if samples:
        lines += ["", "## Samples", ""] + [f"![sample](samples/{p.name})" for p in samples]
    return "\n".join(lines) + "\n"
