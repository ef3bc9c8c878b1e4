"""Worker for test_checkpoint.py: resume past a damaged checkpoint under torchrun (every rank must agree).

Usage: torchrun --nproc_per_node=2 tests/bupo/dist_checkpoint_worker.py OUT_DIR
For each kind of damage to the newest of two checkpoints, rank r writes to OUT_DIR/result_rank{r}.json the step it
resumed from (or the error), whether its weights and AdamW moments equal those saved at that step, and whether its
RNG draws after the resume equal its draws after that save.
"""

import json
import sys
from pathlib import Path

import torch
from test_checkpoint import _policy, _same, _snapshot, _train_step

from bupo import checkpoint, parallel


def _cut(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "none": lambda c: None,
    "rank 1's shard truncated": lambda c: _cut(c / "__1_0.distcp"),
    "rank 1's shard zeroed": lambda c: (c / "__1_0.distcp").write_bytes(bytes((c / "__1_0.distcp").stat().st_size)),
    "rank 1's RNG missing": lambda c: (c / "rng_rank1.pt").unlink(),
    "every checkpoint": lambda c: [(p / ".metadata").unlink() for p in c.parent.iterdir()],
}


def scenario(out: Path, info, damage) -> dict:
    model, opt = _policy(info)
    snaps, draws = {}, {}
    for step in (1, 2):
        _train_step(model, opt)
        torch.manual_seed(100 * step + info.rank)  # every rank its own RNG stream
        checkpoint.save(out, step, model, opt, {}, info)
        snaps[step], draws[step] = _snapshot(model, opt), torch.rand(3).tolist()
    if info.is_main:
        damage(out / "checkpoints" / "step_000002")
    parallel.barrier()
    model, opt = _policy(info)
    torch.manual_seed(999)
    try:
        _, state = checkpoint.resume(out, model, opt, info)
    except ValueError as e:
        return {"error": str(e)}
    step = state["step"]
    same = _same(_snapshot(model, opt), snaps[step])
    return {"step": step, "weights": same, "rng": torch.rand(3).tolist() == draws[step]}


def main(out: Path) -> None:
    info = parallel.init_distributed("cpu")
    results = {name: scenario(out / str(i), info, damage) for i, (name, damage) in enumerate(DAMAGE.items())}
    (out / f"result_rank{info.rank}.json").write_text(json.dumps(results))
    parallel.destroy(wait=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    parallel.exit_process()
