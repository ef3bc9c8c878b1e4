"""Worker for test_update.py: one fixed rollout batch through update_policy, under torchrun or alone.

Usage: python tests/bupo/dist_update_worker.py OUT.safetensors LAYER [filter]   (LAYER = k or 'full')
Writes every parameter after two optimizer steps (rank 0), gathered to full tensors, and the metrics as metadata.
`filter`: the sequences a second rank would hold are inactive (zero-variance filter), so that rank trains on nothing.
`uneven`: only the log-probs of unevenly many sequences per rank (see uneven_logprobs).
`sgd`: plain SGD without clipping, so the weights move by exactly -lr x the gradient: a wrongly scaled gradient
reduction (e.g. a sum where a mean is expected) shows in full, where AdamW's scale invariance would hide it.
"""

import sys

import torch
from safetensors.torch import save_file

from bupo import checkpoint, models, parallel
from bupo.config import AlgoConfig
from bupo.rollout.interface import Rollout
from bupo.update import is_phase_one_param, update_policy

TINY = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": True}


def batch(filtered: bool = False) -> list[Rollout]:
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(8):  # 4 prompts x 2 samples, varied lengths
        p = torch.randint(1, 97, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(1, 97, (2 + (i * 5) % 7,), generator=g).tolist()
        seqs.append(Rollout(p, r, advantage=float(torch.randn((), generator=g)), active=not (filtered and i % 4 >= 2)))
    return seqs


def uneven_logprobs(model, info, out: str) -> None:
    """`uneven`: rank 0 holds 6 sequences (several micro-batches of 12 tokens), rank 1 one: compute_logprobs must
    run as many FSDP forwards on both ranks. Rank 0 writes its log-probs."""
    from bupo.update import compute_logprobs

    mine = batch()[:6] if info.rank == 0 else batch()[6:7]
    logp = compute_logprobs(model, mine, layer=None, norm=False, temperature=1.0, token_budget=12)
    if info.is_main:
        save_file({"logp": torch.cat(logp).contiguous()}, out)
    parallel.destroy(wait=True)


def main(out: str, layer_arg: str, mode: str = "") -> None:
    torch.manual_seed(0)
    info = parallel.init_distributed("cpu")
    model = models.build_model(TINY, dtype=torch.float32, device="cpu")
    layer = None if layer_arg == "full" else int(layer_arg)
    parallel.apply_fsdp(model, info)
    if mode == "uneven":
        return uneven_logprobs(model, info, out)
    if mode == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        checkpoint.init_adamw_state(opt)
    seqs = batch(mode == "filter")
    per = len(seqs) // info.world_size
    mine = [s for m in range(2) for s in seqs[m * 4:(m + 1) * 4][info.rank * (per // 2):(info.rank + 1) * (per // 2)]]
    trainable = [p for n, p in model.named_parameters() if is_phase_one_param(n, layer)] if layer is not None else None
    algo = AlgoConfig(micro_batch_tokens=12, clip_low=0.2, clip_high=0.2, dual_clip=10.0)
    metrics = update_policy(model, opt, mine, algo, info=info, mini_batches=2, layer=layer, norm=False,
                            temperature=1.0, grad_clip=0.0 if mode == "sgd" else 1.0, trainable=trainable)
    full = {n: parallel.full_tensor(p.detach()).clone().contiguous() for n, p in model.named_parameters()}
    if info.is_main:
        save_file(full, out, metadata={k: repr(v) for k, v in metrics.items()})
    parallel.destroy(wait=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
    parallel.exit_process()
