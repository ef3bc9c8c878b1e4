"""One real vLLM engine (CPU, fp32 or bf16) checked against the trainer's log-probs; run by
tests/bupo/test_vllm_real.py.

    python tests/bupo/vllm_worker.py MODEL_DIR OUT_JSON [--tp 1] [--layer 1] [--dtype bfloat16]
    torchrun --nproc_per_node=2 tests/bupo/vllm_worker.py MODEL_DIR OUT_JSON --tp 2     (gloo, rank 0 writes)

Steps, each recorded in OUT_JSON (the test asserts on them): the host RNGs across the engine's start; the max |vLLM
sampling log-prob - trainer log-prob| over the response tokens of 3 prompts x 2 samples at T=1 and T=0.7; the same
after changing every weight (before the sync: `stale_*`, after a full sync: `full_sync`), after changing only the
phase-one weights and a phase-one sync of layers 0..k; a partial module sync (q and k of layer 0 without v), which
must be refused and leave the engine equal to the trainer. Rank r > 0 writes OUT_JSON.r. One vLLM start per process.
"""

import argparse
import copy
import json
import os
import random
import sys

import numpy as np
import torch

from bupo import models, parallel
from bupo.kernels import linear_logprob_entropy
from bupo.rollout.interface import SamplingParams
from bupo.rollout.vllm_engine import VLLMEngine
from bupo.rollout.weight_sync import sync_weights
from bupo.update import compute_logprobs, is_phase_one_param, pack


def rng_draw() -> list:
    return [torch.rand(3).tolist(), random.random(), float(np.random.rand())]


NAIVE: dict[float, float] = {}  # bf16 runs: the plain bf16 model's error at each check, by its sampling seed
FP32_LOGITS: dict[float, float] = {}  # the same with fp32 logits from the bf16 model (the trainer's bf16 kernel)


def max_diff(engine, model, prompts: list[list[int]], temperature: float, seed: int) -> tuple[float, int]:
    """max |sampler - trainer| log-prob over all response tokens of the samples, and the number of tokens. The
    trainer's model is fp32; with a bf16 engine NAIVE[seed] gets the error of a plain bf16 copy of the model (logits
    rounded to bf16) against it on the same tokens, the scale the bf16 checks are measured in, and FP32_LOGITS[seed]
    that of the same bf16 model with fp32 logits (the fused kernel's "torch" backend, as the trainer computes)."""
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=12, seed=seed)
    samples = engine.generate(prompts, params)
    trainer = torch.cat(compute_logprobs(model, samples, layer=None, norm=False, temperature=temperature,
                                         token_budget=4096))
    sampler = torch.tensor([lp for s in samples for lp in s.logprobs])
    assert sampler.shape == trainer.shape and len(sampler) > 0
    if engine.dtype == torch.bfloat16:
        plain = copy.deepcopy(model).to(torch.bfloat16)
        packed = pack(samples, torch.device("cpu"))
        with torch.no_grad():
            h = plain.hidden_states(packed.input_ids, layer=None, cu_seqlens=packed.cu_seqlens)[0, packed.resp_pos]
            naive, _ = linear_logprob_entropy(h, plain.unembedding, packed.labels, temperature=temperature,
                                              backend="naive")
            exact, _ = linear_logprob_entropy(h, plain.unembedding, packed.labels, temperature=temperature,
                                              backend="torch")
        NAIVE[seed] = float((naive.float() - trainer).abs().max())
        FP32_LOGITS[seed] = float((exact - trainer).abs().max())
    return float((trainer - sampler).abs().max()), len(sampler)


@torch.no_grad()
def perturb(model, keep) -> None:
    """Change every parameter that `keep(name)` selects (norm weights too), reproducibly."""
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if keep(name):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the engine's dtype")
    args = ap.parse_args()
    torchrun = "WORLD_SIZE" in os.environ  # the engine sets it (and RANK ...) for a plain process too
    if torchrun:  # vLLM's external launcher joins this (gloo) process group: it must exist before the engine
        parallel.init_distributed("cpu")
    rank = int(os.environ.get("RANK", 0))
    res: dict = {}
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = rng_draw()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    engine = VLLMEngine(args.model_dir, seed=0, dtype=getattr(torch, args.dtype), tensor_parallel_size=args.tp,
                        max_model_len=256, cpu_kvcache_gib=1, bucket_bytes=64 * 1024)
    res["rng_kept"] = rng_draw() == expected
    # the dtype vLLM's LogitsProcessor projects the head in (vllm >= 0.31 reads ModelConfig.head_dtype into it)
    res["head_dtype"] = str(engine.llm.apply_model(lambda m: m.logits_processor.head_dtype)[0])
    model = models.load_pretrained(args.model_dir, dtype=torch.float32)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(rank if args.tp == 1 else 0)  # TP ranks of one engine send equal prompts
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 5, 7)]
    res["start"], res["tokens"] = max_diff(engine, model, prompts, 1.0, seed=1)
    res["start_t07"], _ = max_diff(engine, model, prompts, 0.7, seed=2)

    perturb(model, lambda n: True)
    res["stale_full"], _ = max_diff(engine, model, prompts, 1.0, seed=3)
    sync_weights(model, engine, None)
    res["full_sync"], _ = max_diff(engine, model, prompts, 1.0, seed=3)

    k = args.layer
    perturb(model, lambda n: is_phase_one_param(n, k))
    res["stale_phase_one"], _ = max_diff(engine, model, prompts, 1.0, seed=4)
    res["phase_one_bytes"] = sync_weights(model, engine, k)
    res["phase_one"], _ = max_diff(engine, model, prompts, 1.0, seed=4)

    q = model.model.layers[0].self_attn.q_proj.weight
    partial = [("model.layers.0.self_attn.q_proj.weight", q.detach() + 1.0),
               ("model.layers.0.self_attn.k_proj.weight", model.model.layers[0].self_attn.k_proj.weight.detach() + 1)]
    try:
        engine.update_weights(iter(partial))
        res["partial_error"] = None
    except ValueError as e:
        res["partial_error"] = str(e)
    res["after_refused"], _ = max_diff(engine, model, prompts, 1.0, seed=5)
    res["naive"] = {str(k): v for k, v in NAIVE.items()}
    res["fp32_logits"] = {str(k): v for k, v in FP32_LOGITS.items()}
    print(json.dumps(res), flush=True)
    with open(args.out if rank == 0 else f"{args.out}.{rank}", "w") as f:
        json.dump(res, f)
    engine.close()
    if torchrun:
        parallel.destroy(wait=True)
        parallel.exit_process()


if __name__ == "__main__":
    sys.exit(main())
