"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically, and exact resume.

Layout: <out_dir>/checkpoints/step_000010/ holds the DCP shards of {"model", "optim"} (`.metadata` + `*.distcp`),
`trainer_state.json` (step, world size, data-loader position, anything JSON) and `rng_rank{r}.pt` (each rank's
torch / CUDA / numpy / python RNG states as tensors, loaded with weights_only=True, restored exactly). A checkpoint is
written to `step_XXXXXX.tmp/` and renamed when every rank has finished, so a crash never leaves a folder that looks
complete. `resume()` checks the newest folder cheaply (`problem()`: no tensor is read), loads it into fresh state
dicts and applies them only when every rank succeeded; a damaged one is moved aside to `step_XXXXXX.damaged` with a
warning and the next older one is tried.

The run folder around them: `check_resume_config` refuses a rerun into an out_dir that holds another run (its
config.json is compared setting by setting, `saved_settings` reads older layouts), and `export_final` writes the
HF folder `final/`.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from bupo import models, parallel
from bupo.config import Config
from bupo.parallel import DistInfo, barrier

RNG_KEYS = ("torch", "numpy", "numpy_pos", "numpy_gauss", "python", "python_gauss")
# what reading a damaged file raises: JSON, torch.load (RuntimeError for a cut zip archive) and the pickles of DCP's
# .metadata and of torch.load's weights-only unpickler, which raise any of these on flipped bytes (found by fuzzing)
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, TypeError, AttributeError,
                KeyError, IndexError, ImportError, OverflowError, MemoryError)


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


# --- RNG states ---------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG this process draws from, as tensors (no pickled objects): numpy's Mersenne Twister keeps its
    position and cached Gaussian, python's its position (the 625th word) and `gauss_next`."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    assert version == 3, version
    st = {"torch": torch.get_rng_state(),
          "numpy": torch.from_numpy(keys.astype(np.int64)),  # [624] uint32 words
          "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
          "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
          "python": torch.tensor(words, dtype=torch.int64),  # [625]: 624 words + position
          "python_gauss": torch.tensor([] if gauss_next is None else [gauss_next], dtype=torch.float64)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, torch.Tensor]) -> None:
    """Inverse of `rng_state()`: the next draw of every generator is the one that followed the save."""
    torch.set_rng_state(st["torch"])
    pos, has_gauss = st["numpy_pos"].tolist()
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), pos, has_gauss, st["numpy_gauss"].item()))
    gauss_next = st["python_gauss"].tolist()
    random.setstate((3, tuple(st["python"].tolist()), gauss_next[0] if gauss_next else None))
    if torch.cuda.is_available():
        if "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"])
        else:
            warnings.warn("the checkpoint was written without CUDA: the CUDA RNG is not restored (resume is not exact)")


def _read_rng(path: Path) -> dict[str, torch.Tensor]:
    """A file written from `rng_state()`; ValueError unless every state is there with its shape."""
    st = torch.load(path, weights_only=True)
    shapes = {"torch": tuple(torch.get_rng_state().shape), "numpy": (624,), "numpy_pos": (2,), "numpy_gauss": (),
              "python": (625,)}
    if not isinstance(st, dict) or not set(RNG_KEYS) <= st.keys():
        raise ValueError(f"it lacks the RNG states {sorted(set(RNG_KEYS) - set(st if isinstance(st, dict) else ()))}")
    if bad := [k for k, shape in shapes.items() if not isinstance(st[k], torch.Tensor) or st[k].shape != shape]:
        raise ValueError(f"its RNG states {bad} have the wrong shape")
    return st


# --- folders ------------------------------------------------------------------------------------------------------

def _step(path: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def _finished(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place (not `.tmp`, not `.damaged`), oldest first."""
    done = [p for p in root.glob("step_*") if p.is_dir() and _step(p) is not None]
    return sorted(done, key=_step)


def latest(out_dir: str | Path) -> Path | None:
    """The newest finished checkpoint folder under out_dir (not checked for damage: see `problem`), or None."""
    done = _finished(Path(out_dir) / "checkpoints")
    return done[-1] if done else None


def save(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict, info: DistInfo, keep: int = 2) -> Path:
    """Write checkpoint `step` (collective: every rank calls it); keep the newest `keep` >= 1; returns the folder."""
    assert keep >= 1, keep  # Config.validate refuses trainer.keep_checkpoints < 1
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if info.is_main:
        for stale in root.glob("step_*.tmp"):  # this step's, or one a crash left behind
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": info.world_size,
                                                            **trainer_state}, indent=1))
    barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _finished(root)[:-keep]:
            if old != final:
                shutil.rmtree(old)
    barrier()
    return final


# --- checks and loading -------------------------------------------------------------------------------------------

def problem(path: str | Path, need: tuple[str, ...] = ()) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, or None. Cheap (no tensor is read): trainer_state.json
    parses and holds `step` (and the keys in `need`), `.metadata` loads, every shard file it references exists and
    is long enough, and every rank's RNG file loads."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except _READ_ERRORS as e:
        return f"trainer_state.json is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or state.get("step") != _step(path):
        return f"trainer_state.json does not hold step={_step(path)}"
    world = state.get("world_size", 1)
    if not isinstance(world, int) or world < 1:
        return f"trainer_state.json has world_size={world!r}"
    if missing := [k for k in need if k not in state]:
        return f"trainer_state.json lacks {', '.join(missing)}"
    try:
        md = FileSystemReader(str(path)).read_metadata()
        storage = {(str(s.relative_path), int(s.offset) + int(s.length)) for s in md.storage_data.values()}
    except FileNotFoundError:
        return ".metadata is missing"
    except _READ_ERRORS as e:
        return f".metadata is unreadable ({type(e).__name__}: {e})"
    for name, end in sorted(storage):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < end:
            return f"{name} is truncated ({f.stat().st_size} bytes, the metadata needs {end})"
    for r in range(world):
        try:
            _read_rng(path / f"rng_rank{r}.pt")
        except FileNotFoundError:
            return f"rng_rank{r}.pt is missing"
        except _READ_ERRORS as e:
            return f"rng_rank{r}.pt is unreadable ({type(e).__name__}: {e})"
    return None


def _fresh(obj):
    """The same nested state dict with new, uninitialized tensors (DTensors stay DTensors with the same sharding)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fresh(v) for v in obj]
    return obj


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
         need: tuple[str, ...] = ()) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint `path` (collective); returns trainer_state.json.

    Rank 0 checks the folder (`problem`) for every rank. The shards are read into fresh state dicts (a transient
    second copy of this rank's model and optimizer shards) and applied only when every rank read its part, so a
    ValueError naming the folder and what is wrong leaves model, optimizer and RNG as they were.
    """
    path = Path(path)
    why = parallel.broadcast_object(problem(path, need) if info.is_main else None)
    if why is not None:
        raise ValueError(f"checkpoint {path}: {why}")
    fresh = _fresh({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)})
    state, rng = {}, None
    try:
        dcp.load(fresh, checkpoint_id=str(path))  # raises on every rank when any rank failed
    except CheckpointException as e:
        why = "reading the shards failed (" + "; ".join(f"rank {r}: {type(x).__name__}: {x}"
                                                       for r, (x, _) in e.failures.items()) + ")"
    if why is None:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            if info.rank < state.get("world_size", 1):
                rng = _read_rng(path / f"rng_rank{info.rank}.pt")
        except _READ_ERRORS as e:  # rank 0 read these files a moment ago: only a race gets here
            why = f"rank {info.rank}: {type(e).__name__}: {e}"
    failed = int(parallel.all_reduce(torch.tensor([float(why is not None)]), op="max").item())
    if failed:
        raise ValueError(f"checkpoint {path}: {why or 'another rank could not read it'}")
    set_model_state_dict(model, fresh["model"])
    set_optimizer_state_dict(model, optimizer, fresh["optim"])
    if rng is not None:
        set_rng_state(rng)
    saved_world = state.get("world_size", 1)
    if info.is_main and saved_world != info.world_size:
        warnings.warn(f"checkpoint {path} was written by {saved_world} ranks, resuming with {info.world_size}: "
                      f"ranks {saved_world}.. keep their seeded RNG (resume is not exact)")
    return state


def resume(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
           need: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
    """Load the newest checkpoint under out_dir that is complete and readable (collective): (its folder, its
    trainer_state), or None when there is none. Each newer, damaged one is renamed `step_XXXXXX.damaged` with a
    warning naming it; when none loads: ValueError naming every one and why."""
    root = Path(out_dir) / "checkpoints"
    # rank 0's listing, newest first: every rank tries the same folders in the same order
    candidates = parallel.broadcast_object(list(reversed(_finished(root))) if info.is_main else None)
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            state = load(path, model, optimizer, info, need)
        except ValueError as e:
            bad.append((path, str(e)))
            continue
        if info.is_main:
            for p, why in bad:
                aside = _free_name(p.with_name(p.name + ".damaged"))
                p.rename(aside)
                warnings.warn(f"{why}; moved it to {aside.name} and resumed from the older {path.name}")
        return path, state
    if bad:
        raise ValueError(f"trainer.out_dir={str(out_dir)!r}: no checkpoint can be resumed from ("
                         + "; ".join(why for _, why in bad) + "). Use another trainer.out_dir, or delete the "
                         "damaged checkpoints (or the whole folder) to start over")
    return None


def _free_name(p: Path) -> Path:
    i = 1
    while p.exists():
        i += 1
        p = p.with_name(re.sub(r"\.damaged\d*$", f".damaged{i}", p.name))
    return p


# --- the run folder ---------------------------------------------------------------------------------------------------

RUN_OUTPUTS = ("config.json", "metrics.jsonl", "final", "checkpoints", "curves.png", "tensorboard", "wandb")


def saved_settings(saved: dict) -> dict:
    """A config.json written by an earlier version, in today's layout: renamed fields under their new names, and
    fields added since then at their defaults (the value the earlier run used, since the field did not exist)."""
    saved = {sec: dict(fields) for sec, fields in saved.items()}
    if "tis_cap" in saved.get("rollout", {}):  # moved to [algo]
        saved.setdefault("algo", {}).setdefault("tis_cap", saved["rollout"].pop("tis_cap"))
    for sec, fields in Config().to_dict().items():
        for key, default in fields.items():
            saved.setdefault(sec, {}).setdefault(key, default)
    return saved


def resume_refusal(out: Path, resolved: dict) -> str | None:
    """Why a run with `resolved` settings must not start in `out`, or None. A rerun into a folder holding an earlier
    run's outputs resumes it or is refused, never overwrites them: with a checkpoint it must be the same experiment
    (every setting outside [trainer], which may extend or re-time a run, matches the saved config.json); without
    one it cannot resume, so it would start over on top of them. The exception: a start of the same experiment that
    recorded no step (stopped or crashed during step 1: config.json and an empty metrics.jsonl, no final/) is
    started again."""
    earlier = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if latest(out) is None:
        if not earlier or (_recorded_no_step(out, earlier) and _same_settings(out, resolved)):
            return None
        return (f"trainer.out_dir={str(out)!r} holds an earlier run's outputs ({', '.join(earlier)}) and no "
                "checkpoint to resume from; a new run there would overwrite them. Use another trainer.out_dir, or "
                "delete those to start over")
    try:
        diffs = _setting_diffs(out, resolved)
    except (OSError, ValueError) as e:  # missing, unreadable, or not JSON
        return (f"trainer.out_dir={str(out)!r} holds checkpoints but no readable config.json to check this run's "
                f"settings against ({type(e).__name__}: {e}). Restore it, or use another trainer.out_dir")
    if diffs:
        return (f"trainer.out_dir={str(out)!r} holds a checkpointed run with other settings "
                f"({'; '.join(diffs)}); a rerun there resumes it. Use another trainer.out_dir or delete it")
    return None


def _recorded_no_step(out: Path, earlier: list[str]) -> bool:
    """out holds only what a run writes before its first step ends: config.json, no metrics record, no export."""
    if not set(earlier) <= {"config.json", "metrics.jsonl", "tensorboard", "wandb"} or "config.json" not in earlier:
        return False
    metrics = out / "metrics.jsonl"
    return not metrics.exists() or not metrics.read_text().strip()


def _same_settings(out: Path, resolved: dict) -> bool:
    try:
        return not _setting_diffs(out, resolved)
    except (OSError, ValueError):  # an unreadable config.json is no evidence of the same experiment
        return False


def _setting_diffs(out: Path, resolved: dict) -> list[str]:
    """The settings outside [trainer] in which `resolved` differs from out/config.json, as 'sec.key: old -> new'.
    OSError or ValueError when config.json is missing, unreadable or not an object of [section] objects."""
    saved = json.loads((out / "config.json").read_text())
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ValueError("not an object of [section] objects")
    saved = saved_settings(saved)
    diffs = [f"{sec}.{key}: {saved[sec][key]!r} -> {value!r}"
             for sec, fields in resolved.items() if sec != "trainer"
             for key, value in fields.items() if saved.get(sec, {}).get(key, value) != value]
    diffs += [f"{sec}.{key}: {saved[sec][key]!r} -> (unset)" for sec in saved if sec != "trainer"
              for key in saved[sec] if key not in resolved.get(sec, {})]
    return diffs


def check_resume_config(out: Path, resolved: dict, info: DistInfo) -> None:
    """Raise `resume_refusal` on every rank (collective). Rank 0 alone reads out_dir, before it writes config.json
    there, so no rank can mistake that file for an earlier run's."""
    why = parallel.broadcast_object(resume_refusal(out, resolved) if info.is_main else None)
    if why is not None:
        raise ValueError(why)


def export_final(model: nn.Module, tok, out: Path, info: DistInfo) -> None:
    """Write out/final/: the full (gathered) weights as an HF folder and the tokenizer `tok` (collective)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        models.save_pretrained(model, out / "final", state_dict=sd)
        tok.save(out / "final")
    parallel.barrier()
