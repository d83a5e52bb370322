"""The base model kept loaded in this process across tasks, one per device.

A nightly refresh tunes and evaluates subject after subject on the same base model; loading
it for every task (SD 1.5: seconds of disk reads and `from_pretrained` each) made a
6-subject refresh load it 31 times (bench/scaleout.py), 1 with this cache. A task borrows
the parts and gives them back; methods undo what they add (`trained_adapter`, `cross_attention`, `coupled` and
`added_tokens` restore the UNet and text encoder on exit), and the return checks that, since
a leftover would leak one subject's weights into the next: leftover LoRA adapters are
deleted, processors and embeddings put back, and a base whose weights changed (a method that
fine-tunes the UNet itself) is dropped, so the next task loads it fresh.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .loading import ModelParts, load_components, resolve_device, resolve_model_path


def _weights_stamp(path: str) -> tuple:
    """Changes when a weight file is rewritten, even with the same size (a rebuilt model)."""
    return tuple(sorted((f.as_posix(), f.stat().st_mtime_ns) for f in Path(path).rglob("*.safetensors")))


def _modules(parts: ModelParts) -> dict[str, torch.nn.Module]:
    extra = {name: getattr(parts, name) for name in ("text_encoder_2", "text_encoder_3")
             if getattr(parts, name) is not None}
    return {"unet": parts.unet, "text_encoder": parts.text_encoder, "vae": parts.vae, **extra}


def _fingerprint(parts: ModelParts) -> torch.Tensor:
    """One sum per base tensor: cheap (one pass, on the device) and it moves with any training step."""
    with torch.no_grad():
        return torch.stack([p.detach().float().sum() for m in _modules(parts).values()
                            for n, p in m.named_parameters() if "lora_" not in n]).cpu()


@dataclass
class _Resident:
    key: tuple  # (path, weights stamp, device, dtype)
    ref: weakref.ref  # the parts, whoever holds them
    fingerprint: torch.Tensor
    processors: dict
    embedding: torch.nn.Module
    grad_flags: dict[str, list[bool]]
    vocab: int
    idle: ModelParts | None = None  # held here between tasks; None while a task has them

    @property
    def device(self) -> str:
        return self.key[2]


@dataclass
class ResidentModels:
    """Loaded base models by device. `loads` and `hits` count what the cache saved."""

    enabled: bool = True
    loads: int = 0
    hits: int = 0
    evictions: list[str] = field(default_factory=list)  # why a resident base was dropped
    _entries: dict[tuple, _Resident] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def checkout(self, base: str, models_dir: Path, device: str = "auto", precision: str = "auto",
                 say: Callable[[str], None] | None = None) -> ModelParts:
        """The base model on its device, for one task's sole use until `checkin`; `say`
        hears whether it was resident or loaded, and in which process."""
        target, dtype = resolve_device(device, precision)
        path = resolve_model_path(base, models_dir)
        key = (path, _weights_stamp(path), str(target), str(dtype))
        with self._lock:
            self._forget_unreturned()
            resident = self._entries.get(key)
            if self.enabled and resident is not None and resident.idle is not None:
                parts, resident.idle = resident.idle, None
                self.hits += 1
                if say:
                    say(f"base model {base}: resident in process {os.getpid()} ({self.hits} reuses)")
                return parts
            # one base per device: an idle one of another model makes room
            for other in [r for r in self._entries.values() if r.device == str(target) and r.idle is not None]:
                self._drop(other, "another base model was asked for on this device")
            self.loads += 1
        if say:
            say(f"base model {base}: loading in process {os.getpid()}")
        parts = load_components(base, models_dir, target, dtype)
        with self._lock:
            if self.enabled and key not in self._entries:
                self._entries[key] = _Resident(
                    key, weakref.ref(parts), _fingerprint(parts), dict(parts.unet.attn_processors),
                    parts.text_encoder.get_input_embeddings(),
                    {name: [p.requires_grad for p in m.parameters()] for name, m in _modules(parts).items()},
                    len(parts.tokenizer))
        return parts

    def checkin(self, parts: ModelParts) -> None:
        """Give `parts` back as loaded, or drop them when that cannot be made so."""
        with self._lock:
            resident = next((r for r in self._entries.values() if r.idle is None and r.ref() is parts), None)
            if resident is None:
                return  # a private load (the resident copy was busy or the cache is off)
            why = self._restore(resident, parts)
            if why:
                self._drop(resident, why)
            else:
                resident.idle = parts

    def _forget_unreturned(self) -> None:
        """Entries whose borrower let the parts go without returning them (a caller that
        never closed its context): nothing holds that model any more."""
        for key in [k for k, r in self._entries.items() if r.idle is None and r.ref() is None]:
            del self._entries[key]

    def _restore(self, resident: _Resident, parts: ModelParts) -> str | None:
        unet = parts.unet
        if getattr(unet, "peft_config", None):
            unet.delete_adapters(list(unet.peft_config))
        if {n: type(p) for n, p in unet.attn_processors.items()} != {n: type(p) for n, p in resident.processors.items()}:
            unet.set_attn_processor(dict(resident.processors))  # a copy: diffusers pops what it is given
        if parts.text_encoder.get_input_embeddings() is not resident.embedding:
            parts.text_encoder.set_input_embeddings(resident.embedding)
        if getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        for name, module in _modules(parts).items():
            module.eval()
            for p, flag in zip(module.parameters(), resident.grad_flags[name]):
                p.requires_grad_(flag)
        if len(parts.tokenizer) != resident.vocab:
            return "a task added tokens to the shared tokenizer"
        if unet.dtype != parts.vae.dtype:
            return "a task changed the UNet's dtype"
        if not torch.equal(_fingerprint(parts), resident.fingerprint):
            return "a task changed the base weights (a full fine-tune)"
        return None

    def _drop(self, resident: _Resident, why: str) -> None:
        del self._entries[resident.key]
        self.evictions.append(why)
        gc.collect()
        if resident.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            for resident in [r for r in self._entries.values() if r.idle is not None]:
                self._drop(resident, "cleared")


# This process's resident models: a flow's own threads and an engine worker's tasks share it.
RESIDENT = ResidentModels()
