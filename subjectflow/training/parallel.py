"""One training job over several GPUs of a node, torchrun-style: a process per device.

Each optimiser step is split, not enlarged: rank r computes the step's micro-batches
r, r + world, r + 2 world, ... (`train.gradient_accumulation` of them in all), with the
same seeded draws a single process would make for those micro-batches, and the gradients
are summed across ranks before the step. So the model does not depend on how many GPUs
trained it (up to the order floats are summed in), and its id need not name them.

The ranks are subprocesses (`python -m subjectflow.training.parallel`), not
multiprocessing children, so a job launches from inside an engine's daemonic worker too.
They meet over torch.distributed (NCCL on GPUs, gloo on CPU, which the tests use).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .subjects import TuningError

LOG_TAIL = 2000  # characters of a failed rank's output in the error


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job; the default is a job of one."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0  # the one that checkpoints, reports and hands the result back

    def micro_batches(self, accumulation: int) -> range:
        return range(self.rank, accumulation, self.world)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:  # a parameter this rank's micro-batches never reached
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def sum_figures(self, totals: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return totals
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return dict(zip(keys, values.tolist()))


SINGLE = Ranks()


def devices_for(requested: int | str, accumulation: int) -> int:
    """Ranks for a job: `requested` ("auto": every GPU this process sees), at most one per
    micro-batch of a step."""
    available = torch.cuda.device_count() if requested == "auto" else int(requested)
    return max(1, min(available, accumulation))


def run_ranks(target: str, spec: dict[str, Any], world: int, work_dir: Path,
              say: Callable[[str], None] = print) -> None:
    """Run `target` ("module:function", called with (spec, Ranks)) in `world` processes and
    wait for all; rank 0's output goes to `say`, every rank's to work_dir/rank-N.log."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_file = work_dir / "ranks.json"
    spec_file.write_text(json.dumps(spec))
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = work_dir / f"rank-{rank}.log"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", __name__, target, str(spec_file)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    pumps = [threading.Thread(target=_pump, args=(proc, log, say if rank == 0 else None), daemon=True)
             for rank, (proc, log) in enumerate(zip(procs, logs))]
    for pump in pumps:
        pump.start()
    codes = [proc.wait() for proc in procs]
    for pump in pumps:
        pump.join()
    failed = [rank for rank, code in enumerate(codes) if code != 0]
    if failed:
        tail = logs[failed[0]].read_text()[-LOG_TAIL:]
        raise TuningError(f"data-parallel training failed on rank(s) {failed} of {world} "
                          f"(logs in {work_dir}):\n{tail}")


def _pump(proc: subprocess.Popen, log: Path, say: Callable[[str], None] | None) -> None:
    with log.open("w") as out:
        for line in proc.stdout:
            out.write(line)
            if say is not None:
                say(line.rstrip())


def _main(target: str, spec_file: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(json.loads(Path(spec_file).read_text()),
                                                           Ranks(rank, world))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(*sys.argv[1:3])
