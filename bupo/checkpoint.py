"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically, and exact resume.

Layout: <out_dir>/checkpoints/step_000010/ holds the DCP shards of {"model", "optim"}, `trainer_state.json`
(step, data-loader position, anything JSON) and `rng_rank{r}.pt` (each rank's RNG states, loaded with
weights_only=True). A checkpoint is written to `step_XXXXXX.tmp/` and renamed when every rank has finished, so a
crash never leaves a folder that looks complete; `latest()` ignores `.tmp` folders.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from bupo.parallel import DistInfo, barrier


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create now the state AdamW creates lazily at a parameter's first step (step 0, zero moments).

    The numbers are identical to lazy creation, but every parameter then has state from the start, so a checkpoint
    taken in phase one (upper layers not stepped yet) has the same structure as one taken later and loads exactly.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if st:
                continue
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state(),
          "numpy": torch.tensor(np.random.get_state()[1].astype(np.int64)),
          "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(x) for x in st["python"].tolist()), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, info: DistInfo, keep: int = 2) -> Path:
    """Write checkpoint `step` (collective: every rank calls it); returns the final folder."""
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step_*") if p.suffix != ".tmp")[:-keep or None]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under out_dir, or None."""
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from `path` (collective); returns trainer_state.json."""
    path = Path(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
