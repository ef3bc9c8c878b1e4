"""Worker for test_sharded_load.py, run by plain python (a world of one) or by torchrun (gloo, CPU).

    dist_load_worker.py equal OUT DIR...   build on meta -> apply_fsdp -> load_sharded each HF folder; rank 0 writes
                                           its full state dict and logits on fixed ids to OUT (a safetensors file)
    dist_load_worker.py memory OUT DIR     per rank, the peak RSS above the start of start-up of the sharded path and
                                           of the old one (load_pretrained, then apply_fsdp), and the anonymous memory
                                           the old one holds between the two: OUT.rank{r}.json
"""

import gc
import json
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bupo import models, parallel


def sharded(path: str, info: parallel.DistInfo):
    model = models.build_meta(path)
    parallel.apply_fsdp(model, info)
    return parallel.load_sharded(model, path, info)


def equal(out: str, dirs: list[str], info: parallel.DistInfo) -> None:
    tensors = {}
    for i, d in enumerate(dirs):
        model = sharded(d, info)
        if model.config.tie_word_embeddings:  # the tie holds on every rank after sharding and loading
            assert model.lm_head.weight is model.model.embed_tokens.weight
        ids = torch.arange(12).remainder(model.config.vocab_size).view(2, 6)  # [B, T]
        logits = model(ids).detach()  # a collective: every rank runs it
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tensors.update({f"{i}/{k}": v.clone() for k, v in sd.items()})  # clone: safetensors refuses shared storage
        tensors[f"{i}/logits"] = logits.clone()
    if info.is_main:
        save_file(tensors, out)


def _status(key: str) -> int:
    """A /proc/self/status size in bytes (VmRSS: resident now; VmHWM: peak resident since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_of(fn) -> tuple[object, int]:
    """fn() and how far the resident set rose above its start while it ran (VmHWM reset via clear_refs)."""
    gc.collect()
    start = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    result = fn()
    return result, _status("VmHWM") - start


def _old_order(path: str, info: parallel.DistInfo) -> tuple[torch.nn.Module, int]:
    """load_pretrained, then apply_fsdp; and RssAnon in between, while the whole replica is held. Anonymous pages only:
    under memory pressure the kernel drops file pages (shared libraries: ~240 MB for a CUDA build of torch) from the
    resident set, which can lower a VmHWM peak by tens of MB but not this."""
    model = models.load_pretrained(path)
    held = _status("RssAnon")
    return parallel.apply_fsdp(model, info), held


def memory(out: str, path: str, info: parallel.DistInfo) -> None:
    models.build_meta(path)  # warm-up: the first meta build imports ~150 MB of modules (sympy, dynamo), once
    model, peak_sharded = _peak_of(lambda: sharded(path, info))
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    del model
    parallel.barrier()
    gc.collect()
    anon = _status("RssAnon")
    (model, held), peak_full = _peak_of(lambda: _old_order(path, info))
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(t.numel() * 4 for _, t in models.iter_safetensors(path))  # as fp32
    rec = {"rank": info.rank, "world": info.world_size, "peak_sharded": peak_sharded, "peak_full": peak_full,
           "held_full": held - anon, "shard_bytes": shard_bytes, "full_bytes": full_bytes, "largest_fp32": largest}
    with open(f"{out}.rank{info.rank}.json", "w") as f:
        json.dump(rec, f)


def main() -> None:
    mode, out, *dirs = sys.argv[1:]
    torch.set_num_threads(1)
    info = parallel.init_distributed("cpu")
    try:
        equal(out, dirs, info) if mode == "equal" else memory(out, dirs[0], info)
    except BaseException:
        parallel.destroy()
        raise
    parallel.destroy(wait=True)


if __name__ == "__main__":
    main()
    parallel.exit_process()
