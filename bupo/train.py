"""GRPO / BuPO trainer: `python -m bupo.train --config FILE.toml [--section.field=value ...]`, also under torchrun.

One step: rollout -> reward -> advantages -> old log-probs -> update -> sync -> eval -> checkpoint. Steps count from
1; steps 1..bupo.iterative_steps optimize the internal policy pi^k (phase "internal": layers 0..k run, layers
above k and the final norm are never run nor stepped), later steps the full policy (phase "full").

Reading order: `setup` builds the parts of a run (`Run`: model, optimizer, engine, data, ...) and resumes; `_train`
is the step loop, one `# ---` section per part of the algorithm; the helpers in between are what a section calls.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bupo import checkpoint, models, parallel
from bupo.config import Config, load_config, max_new_tokens
from bupo.data import PromptLoader, arithmetic_rows, load_rows, render_prompts
from bupo.kernels.products import bf16_units
from bupo.loss import group_advantages, zero_variance_groups
from bupo.metrics import MetricsLogger, final_table, peak_mem_gb, plot_curves, read_jsonl, summary_line
from bupo.models.liger import resolve_liger, use_liger
from bupo.reward import REASONS, score_batch
from bupo.rollout.engine import make_engine
from bupo.rollout.interface import Engine, Rollout, SamplingParams, step_seed
from bupo.rollout.weight_sync import sync_weights
from bupo.tokenizer import Tokenizer
from bupo.update import collective_micro_batches, compute_logprobs, filler, is_phase_one_param, pack, update_policy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --- set-up -----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """The parts of a run the step loop works on (built by `setup`)."""

    info: parallel.DistInfo
    out: Path  # trainer.out_dir
    path: Path  # the model folder
    tok: Tokenizer
    model: nn.Module  # the policy: FSDP2-sharded fp32 master weights
    engine: Engine  # samples rollouts from the full policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # steps with every optimizer step
    loader: PromptLoader  # the training prompts, batch after batch
    val_sets: dict[str, list]  # rendered prompts per validation set
    k: int  # the internal layer of phase one, resolved
    trainable: list[nn.Parameter]  # what phase one steps: layers 0..k and the embedding/head
    ref_model: nn.Module | None  # the initial policy, for algo.kl_coef > 0
    logger: MetricsLogger
    start: int  # the first step to run: 1, or the one after the checkpoint resumed from
    log: Callable[[str], None]  # prints on rank 0


def setup(cfg: Config, info: parallel.DistInfo) -> Run:
    """Everything before the first step. Start-up memory order (torchtitan's): the policy is built on the meta device
    from config.json and the settings are checked against it before any weight is read; it is sharded, then each
    rank reads only its shards (a rank never holds a replica of the fp32 master weights); the rollout engine claims
    its memory after that, the reference model last. Resumes from the newest checkpoint in trainer.out_dir."""
    log = (lambda msg: tqdm.write(msg)) if info.is_main else (lambda msg: None)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed + info.rank)
    out = Path(cfg.trainer.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    path = models.resolve_model_path(cfg.model.path, flag="model.path")
    tok = Tokenizer.from_pretrained(path)
    compute_dtype = DTYPES[cfg.model.dtype]  # the same policy on every device: fp32 master weights, see parallel
    model = models.build_meta(path)  # config.json only: validated before any weight is read
    cfg.validate(num_layers=model.config.num_hidden_layers, world_size=info.world_size,
                 tokenizer_vocab=tok.vocab_size, model_vocab=model.config.vocab_size,
                 max_positions=model.config.max_position_embeddings)
    liger = resolve_liger(cfg.model.liger, info.device)
    if liger:  # before FSDP2 and compile wrap the modules
        log(f"[model] liger-kernel fused ops on: {use_liger(model)}")
    train_prompts, val_sets = load_data(cfg, tok, log)
    loader = PromptLoader(train_prompts, cfg.data.batch_size, cfg.trainer.seed)
    parallel.apply_fsdp(model, info, param_dtype=compute_dtype, compile=cfg.model.compile,
                        activation_checkpointing=cfg.model.activation_checkpointing)
    parallel.load_sharded(model, path, info)  # fp32 master weights, this rank's shards only
    # vLLM: one seed per tensor-parallel group, whose ranks run one engine together (requests carry their own seeds)
    engine = make_engine(cfg.rollout.engine, path, device=info.device, dtype=compute_dtype, vocab_size=tok.vocab_size,
                         max_batch_size=cfg.rollout.max_batch_size,
                         seed=cfg.trainer.seed + info.rank // cfg.rollout.tensor_parallel_size,
                         gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                         tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                         max_model_len=cfg.data.max_prompt_length + max_new_tokens(cfg), liger=liger,
                         cpu_kvcache_gib=cfg.rollout.cpu_kvcache_gib)
    k = cfg.bupo.internal_layer
    if k == "auto":
        k = choose_internal_layer(cfg, model, engine, tok, train_prompts, log)
    save_config(cfg, k, out, info, log)
    log(describe_precision(compute_dtype, info.device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    checkpoint.init_adamw_state(optimizer)
    warm = cfg.optim.warmup_steps * (cfg.data.batch_size // cfg.algo.ppo_mini_batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    ref_model = reference_model(path, info, compute_dtype, liger) if cfg.algo.kl_coef > 0 else None
    trainable = [p for n, p in model.named_parameters() if is_phase_one_param(n, k)]
    start = 1
    resumed = checkpoint.resume(out, model, optimizer, info, need=("scheduler", "loader"))
    if resumed is not None:  # the newest complete and readable checkpoint; damaged newer ones are set aside
        ckpt, state = resumed
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        start = state["step"] + 1
        sync_weights(model, engine, None)
        log(f"[resume] from {ckpt} (step {state['step']})")
    logger = MetricsLogger(out, enabled=info.is_main, resume_step=start - 1, wandb=cfg.trainer.wandb,
                           tensorboard=cfg.trainer.tensorboard, config=cfg.to_dict(),
                           wandb_project=cfg.trainer.wandb_project)
    return Run(info=info, out=out, path=path, tok=tok, model=model, engine=engine, optimizer=optimizer,
               scheduler=scheduler, loader=loader, val_sets=val_sets, k=k, trainable=trainable, ref_model=ref_model,
               logger=logger, start=start, log=log)


def describe_precision(compute_dtype: torch.dtype, device: torch.device) -> str:
    """The log line that says how this run computes; on a CPU, whether its bf16 matrix units are used."""
    name = str(compute_dtype).removeprefix("torch.")
    line = f"[model] compute {name} on {device.type}, fp32 master weights and AdamW state, fp32 log-probs"
    if device.type == "cpu" and compute_dtype == torch.bfloat16:
        if bf16_units(torch.empty(0, dtype=torch.bfloat16)):
            line += " (this CPU has bf16 matrix units)"
        else:
            line += " (this CPU or torch has no bf16 matrix units: bf16 is emulated, model.dtype=float32 is faster)"
    elif device.type == "cpu" and compute_dtype == torch.float16:
        line += " (no fp16 matrix units are used on a CPU: model.dtype=bfloat16 or float32 is faster)"
    return line


def load_prompts(cfg: Config, tok: Tokenizer, names: list[str], *, seed: int, log,
                 field: str = "data.train_files") -> dict[str, list]:
    """Rendered prompts per dataset name ('arithmetic' is the built-in task, generated from `seed`); `field` names
    the setting in errors."""
    out = {}
    for name in names:
        if name == "arithmetic":
            rows = arithmetic_rows(cfg.data.arithmetic_size, seed, max_operand=cfg.data.arithmetic_max_operand,
                                   ops=cfg.data.arithmetic_ops, demos=cfg.data.arithmetic_demos)
            stats = {"rows_total": len(rows)}
        else:
            rows, stats = load_rows(name, field)
        prompts, rstats = render_prompts(rows, tok, max_prompt_length=cfg.data.max_prompt_length,
                                         truncation=cfg.data.truncation, enable_thinking=cfg.data.enable_thinking,
                                         template=cfg.data.chat_template or None)
        log(f"[data] {name}: {len(prompts)} prompts ({json.dumps({**stats, **rstats})})")
        out[name] = prompts
    return out


def load_data(cfg: Config, tok: Tokenizer, log) -> tuple[list, dict[str, list]]:
    """The training prompts (all train_files together) and the validation sets (empty unless trainer.val_every)."""
    train_sets = load_prompts(cfg, tok, cfg.data.train_files, seed=cfg.trainer.seed, log=log)
    train_prompts = [p for ps in train_sets.values() for p in ps]
    if not train_prompts:
        raise ValueError(f"data.train_files={cfg.data.train_files}: no usable prompts")
    val_sets = {}
    if cfg.trainer.val_every:
        val_sets = load_prompts(cfg, tok, cfg.data.val_files, seed=cfg.trainer.seed + 1, log=log,
                                field="data.val_files")
        if cfg.data.val_max_prompts:
            val_sets = {k: v[: cfg.data.val_max_prompts] for k, v in val_sets.items()}
    return train_prompts, val_sets


def save_config(cfg: Config, k: int, out: Path, info: parallel.DistInfo, log) -> None:
    """The resolved config (with the resolved internal layer) to out/config.json, after checking that out_dir holds
    no other run (checkpoint.check_resume_config)."""
    resolved = cfg.to_dict()
    resolved["bupo"]["internal_layer_resolved"] = k
    resolved["model"]["dtype_resolved"] = cfg.model.dtype  # what the run computes in (see precision_change)
    checkpoint.check_resume_config(out, resolved, info)
    if info.is_main:
        change = precision_change(out, cfg.model.dtype, info.device)
        if change:
            warnings.warn(change, stacklevel=2)
        (out / "config.json").write_text(json.dumps(resolved, indent=1))
        log("[config] " + json.dumps(resolved))


def precision_change(out: Path, dtype: str, device: torch.device) -> str | None:
    """A warning when out_dir holds a checkpointed run that computed in float32 whatever model.dtype said (versions
    before model.dtype applied to CPUs: their config.json has no model.dtype_resolved) and this CPU run resumes it
    in another dtype: from here on its numbers are that dtype's."""
    if device.type != "cpu" or dtype == "float32" or checkpoint.latest(out) is None:
        return None
    try:
        saved = json.loads((out / "config.json").read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return None
    if "dtype_resolved" in saved:
        return None
    return (f"trainer.out_dir={str(out)!r}: this run was checkpointed by a version that computed in float32 on a CPU "
            f"whatever model.dtype said; it resumes computing in {dtype} (model.dtype applies to CPUs now), so its "
            "later steps are not comparable with its earlier ones. To continue it in float32, start it again in "
            "another trainer.out_dir with --model.dtype=float32")


def reference_model(path: Path, info: parallel.DistInfo, compute_dtype: torch.dtype, liger: bool) -> nn.Module:
    """The frozen initial policy for the KL term, sharded like the policy."""
    ref = models.build_meta(path)
    if liger:
        use_liger(ref)
    parallel.apply_fsdp(ref, info, param_dtype=compute_dtype)
    return parallel.load_sharded(ref, path, info).requires_grad_(False)


def choose_internal_layer(cfg: Config, model, engine, tok: Tokenizer, prompts: list, log) -> int:
    """bupo.internal_layer = 'auto': the boundary layer of the entropy flow on a few training prompts, over the
    tokenizer's vocabulary (the support of the policy that is trained)."""
    from bupo.analysis import boundary_layer, entropy_flow

    picked = prompts[: cfg.bupo.auto_prompts]
    rollouts = engine.generate([p.ids for p in picked],
                               sampling(cfg, tok, step_seed(cfg.trainer.seed, "auto", 0), n=1))
    flow = entropy_flow(model, rollouts, norm=cfg.bupo.norm, temperature=cfg.rollout.temperature,
                        vocab_size=tok.vocab_size)
    parallel.reshard(model)
    k = int(parallel.broadcast_int(boundary_layer(flow)))  # every rank trains the same layer
    log(f"[bupo] internal_layer=auto -> {k} (0-based; paper layer {k + 1}): last layer with mean FFN entropy "
        f"change > 0 over {sum(len(s.response_ids) for s in rollouts)} response tokens")
    return k


# --- what the step's sections call ------------------------------------------------------------------------------------

def sampling(cfg: Config, tok: Tokenizer, seed: int, *, n: int | None = None, max_new_tokens: int | None = None,
             seed_index: tuple[int, ...] = ()) -> SamplingParams:
    """Sampling parameters from [rollout] (the seeding scheme of bupo.rollout.interface: `seed` from step_seed,
    `seed_index` the global index of each prompt)."""
    return SamplingParams(n=n or cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_new_tokens=max_new_tokens or cfg.rollout.max_new_tokens,
                          seed=seed, stop_token_ids=tuple(tok.stop_token_ids), seed_index=seed_index)


def evaluate(cfg: Config, engine, tok: Tokenizer, val_sets: dict, info: parallel.DistInfo, step: int) -> dict:
    """avg@val_n accuracy per validation set. Each rank samples a contiguous share of the prompts, seeded by their
    positions in the set, so the result does not depend on the number of ranks."""
    out = {}
    for name, prompts in val_sets.items():
        lo, hi = len(prompts) * info.rank // info.world_size, len(prompts) * (info.rank + 1) // info.world_size
        params = sampling(cfg, tok, step_seed(cfg.trainer.seed, f"val/{name}", step), n=cfg.trainer.val_n,
                          max_new_tokens=cfg.trainer.val_max_new_tokens or None, seed_index=tuple(range(lo, hi)))
        mine = prompts[lo:hi]
        rollouts = engine.generate([p.ids for p in mine], params)  # also when empty: TP ranks generate together
        truths = [mine[s.prompt_index].row.ground_truth for s in rollouts]
        res = score_batch([tok.decode(s.response_ids) for s in rollouts], truths,
                          in_think=[mine[s.prompt_index].in_think for s in rollouts])
        tot = parallel.all_reduce_dict({"correct": sum(x.score for x in res), "total": len(res)})
        out[f"val/{name}"] = tot["correct"] / max(tot["total"], 1)
    return out


def layer_diagnostics_step(cfg: Config, model, rollouts: list[Rollout], k: int, info: parallel.DistInfo,
                           vocab_size: int) -> dict:
    """Paper Fig. 5 during training: cos(h_k, h_l) and KL(pi^k || pi^l) for every layer l above k and for the final
    policy, averaged over the response tokens of `rollouts` (this rank's part of the step's first trainer.diag_seqs
    rollouts) and over all ranks. Micro-batched by algo.micro_batch_tokens, so the captured layer outputs
    [L, tokens, H] stay within a training micro-batch's size. Every rank must call it (capture is collective under
    FSDP2, and every rank runs as many forwards)."""
    from bupo.analysis import layer_diagnostics

    sums: dict[str, float] = {"tokens": 0}
    for idx in collective_micro_batches(rollouts, cfg.algo.micro_batch_tokens) or [[]]:
        part = [rollouts[i] for i in idx]
        packed = pack(part or [filler()], info.device)  # a rank without rollouts joins the collectives, weightless
        mask = torch.zeros(packed.input_ids.shape, dtype=torch.bool, device=info.device)  # [1, total]
        mask[0, packed.resp_pos] = True  # the positions whose policy produced a response token
        d = layer_diagnostics(model, packed.input_ids, k, cu_seqlens=packed.cu_seqlens, mask=mask,
                              temperature=cfg.rollout.temperature, vocab_size=vocab_size)
        n = d["num_tokens"] if part else 0
        vals = {"diag/cos_final": d["cos_final"], "diag/kl_final": d["kl_final"],
                **{f"diag/cos_l{layer}": c for layer, c in zip(d["layers"], d["cos"])},
                **{f"diag/kl_l{layer}": x for layer, x in zip(d["layers"], d["kl"])}}
        sums["tokens"] += n
        for key, v in vals.items():
            sums[key] = sums.get(key, 0.0) + v * n
    parallel.reshard(model)  # a no-grad pass: the checkpoint and the weight sync must see the fp32 shards again
    sums = parallel.all_reduce_dict(sums)
    return {key: v / sums["tokens"] for key, v in sums.items() if key != "tokens"}  # token-weighted over ranks


def step_record(step: int, phase: str, layer: int | None, rollouts: list[Rollout], results: list,
                rewards: torch.Tensor, zero_var: torch.Tensor, m: dict, lr: float,
                times: dict[str, float], sync_bytes: int, mask_truncated: bool = False) -> tuple[dict, float]:
    """The step's metrics.jsonl record so far (statistics summed over ranks, reduced by name) and the number of
    prompt + response tokens of the step over all ranks. masked_truncated: the truncated responses left out of the
    loss (algo.mask_truncated; 0 when off)."""
    reasons = Counter(x.reason for x in results)
    stats = parallel.all_reduce_dict({
        "reward": float(rewards.sum()), "correct": sum(x.score == 1.0 for x in results), "samples": len(rollouts),
        "response_tokens": sum(len(s.response_ids) for s in rollouts),
        "prompt_tokens": sum(len(s.prompt_ids) for s in rollouts),
        "truncated": sum(not s.finished for s in rollouts), "zero_var": float(zero_var.sum()),
        "masked_truncated": sum(not s.finished for s in rollouts) if mask_truncated else 0,
        "groups": len(zero_var), **{f"reason/{x}": reasons[x] for x in REASONS}})
    total = max(stats["samples"], 1.0)
    record = {"step": step, "phase": phase, "internal_layer": layer,
              "reward_mean": stats["reward"] / total, "accuracy": stats["correct"] / total,
              **{key: m[key] for key in ("loss", "entropy", "grad_norm", "clip_frac", "approx_kl")},
              "response_len_mean": stats["response_tokens"] / total, "truncated_frac": stats["truncated"] / total,
              "zero_var_frac": stats["zero_var"] / max(stats["groups"], 1.0),
              "masked_truncated": int(stats["masked_truncated"]), "lr": lr,
              **{f"reward/{x}": stats[f"reason/{x}"] / total for x in REASONS},
              **{key: m[key] for key in ("kl_ref", "logp_mismatch") if key in m},
              "nonfinite_skipped": int(m["nonfinite_skipped"]),
              **{f"time_{key}": t for key, t in times.items()}, "sync_mb": sync_bytes / 2**20}
    return record, stats["response_tokens"] + stats["prompt_tokens"]


# --- the run ----------------------------------------------------------------------------------------------------------

def run(cfg: Config) -> list[dict]:
    """Train with `cfg`; returns the metrics records (on rank 0). Leaves no process group behind, also on errors."""
    info = parallel.init_distributed(cfg.trainer.device)
    try:
        records = _train(cfg, info)
    except BaseException:
        parallel.destroy()
        raise
    parallel.destroy(wait=True)
    return records


def _train(cfg: Config, info: parallel.DistInfo) -> list[dict]:
    run = setup(cfg, info)
    model, engine, tok = run.model, run.engine, run.tok
    n, mini_batches = cfg.rollout.n, cfg.data.batch_size // cfg.algo.ppo_mini_batch_size
    share = parallel.rank_share(cfg.data.batch_size, cfg.algo.ppo_mini_batch_size, info)  # global batch positions
    sample_positions = [p * n + j for p in share for j in range(n)]  # this rank's rollouts in the global batch
    nonfinite_run = 0  # steps in a row with a skipped (non-finite) optimizer step
    bar = tqdm(range(run.start, cfg.trainer.total_steps + 1), disable=not info.is_main, desc="train", unit="step",
               initial=run.start - 1, total=cfg.trainer.total_steps)
    for step in bar:
        t_step = time.perf_counter()
        phase = "internal" if step <= cfg.bupo.iterative_steps else "full"
        layer = run.k if phase == "internal" else None  # the policy being optimized: pi^k, or the full one
        norm = cfg.bupo.norm and phase == "internal"
        times = {}
        # --- rollout (full policy, this rank's share of the global batch, seeded by global position)
        t0 = time.perf_counter()
        batch = run.loader.next_batch()
        mine = [batch[i] for i in share]
        engine.wake_up()
        rollouts = engine.generate([p.ids for p in mine], sampling(cfg, tok, step_seed(cfg.trainer.seed, "train", step),
                                                                   seed_index=tuple(share)))
        engine.sleep()
        times["rollout"] = time.perf_counter() - t0
        # --- reward
        t0 = time.perf_counter()
        results = score_batch([tok.decode(s.response_ids) for s in rollouts],
                              [mine[s.prompt_index].row.ground_truth for s in rollouts],
                              in_think=[mine[s.prompt_index].in_think for s in rollouts])
        rewards = torch.tensor([x.score for x in results], dtype=torch.float32)
        times["reward"] = time.perf_counter() - t0
        # --- advantages (a prompt's n samples live on one rank; the batch-level estimator needs every reward)
        adv = group_advantages(parallel.all_gather_1d(rewards), n, estimator=cfg.algo.adv_estimator,
                               norm_by_std=cfg.algo.norm_adv_by_std, eps=cfg.algo.adv_eps)
        adv = adv[info.rank * len(rollouts):(info.rank + 1) * len(rollouts)]
        zero_var = zero_variance_groups(rewards, n)
        for i, (s, a) in enumerate(zip(rollouts, adv.tolist())):
            s.advantage = a
            s.active = not (cfg.algo.filter_zero_variance and bool(zero_var[i // n]))
            s.active = s.active and not (cfg.algo.mask_truncated and not s.finished)  # out of the loss and its count
        # --- old log-probs under the policy being optimized (skipped with one update per step and no KL)
        t0 = time.perf_counter()
        lp_kw = dict(layer=layer, norm=norm, temperature=cfg.rollout.temperature,
                     token_budget=cfg.algo.micro_batch_tokens, vocab_size=tok.vocab_size)
        if mini_batches > 1 or cfg.algo.tis_cap:
            for s, lp in zip(rollouts, compute_logprobs(model, rollouts, **lp_kw)):
                s.old_logp = lp
        if run.ref_model is not None:
            for s, lp in zip(rollouts, compute_logprobs(run.ref_model, rollouts, **lp_kw)):
                s.ref_logp = lp
        times["logprob"] = time.perf_counter() - t0
        # --- update (the logged lr is the one the step's first optimizer update uses: the scheduler steps after it)
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        m = update_policy(model, run.optimizer, rollouts, cfg.algo, info=info, mini_batches=mini_batches,
                          layer=layer, norm=norm, temperature=cfg.rollout.temperature, grad_clip=cfg.optim.grad_clip,
                          trainable=run.trainable if phase == "internal" else None, scheduler=run.scheduler,
                          vocab_size=tok.vocab_size)
        times["update"] = time.perf_counter() - t0
        nonfinite_run = nonfinite_run + 1 if m["nonfinite_skipped"] else 0
        if m["nonfinite_skipped"]:
            warnings.warn(f"step {step}: {int(m['nonfinite_skipped'])} of {mini_batches} optimizer steps skipped: "
                          "the loss or the gradient norm was not finite (weights and optimizer state unchanged)")
        # --- sync weights to the rollout engine (phase one: only layers 0..k and the head changed)
        t0 = time.perf_counter()
        sync_bytes = sync_weights(model, engine, layer)
        times["sync"] = time.perf_counter() - t0
        # --- metrics (sums over ranks, reduced by name; the paper's Fig. 5 diagnostics every diag_every steps)
        record, tokens = step_record(step, phase, layer, rollouts, results, rewards, zero_var, m, lr, times,
                                     sync_bytes, cfg.algo.mask_truncated)
        if cfg.trainer.diag_every and step % cfg.trainer.diag_every == 0:  # every rank: capture is collective
            first = [s for s, i in zip(rollouts, sample_positions) if i < cfg.trainer.diag_seqs]
            record.update(layer_diagnostics_step(cfg, model, first, run.k, info, tok.vocab_size))
        # --- eval
        if cfg.trainer.val_every and (step % cfg.trainer.val_every == 0 or step == cfg.trainer.total_steps):
            record.update(evaluate(cfg, engine, tok, run.val_sets, info, step))
        record["time_step"] = time.perf_counter() - t_step
        record["tokens_per_s"] = tokens / record["time_step"]
        record["peak_mem_gb"] = peak_mem_gb(info.device)
        run.logger.log(record)
        run.log(summary_line(record))
        if cfg.optim.max_nonfinite_steps and nonfinite_run >= cfg.optim.max_nonfinite_steps:
            raise FloatingPointError(
                f"step {step}: {nonfinite_run} steps in a row had a non-finite loss or gradient norm and were skipped "
                f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); lower optim.lr or check the data, "
                f"then resume from the last checkpoint in {run.out}")
        # --- checkpoint
        if cfg.trainer.save_every and (step % cfg.trainer.save_every == 0 or step == cfg.trainer.total_steps):
            checkpoint.save(run.out, step, model, run.optimizer, {"loader": run.loader.state_dict(),
                                                                  "scheduler": run.scheduler.state_dict()},
                            info, keep=cfg.trainer.keep_checkpoints)
    return finish(cfg, run)


def finish(cfg: Config, run: Run) -> list[dict]:
    """After the last step: final/ (trainer.export), the curves (trainer.plot) and the table of the steps; returns
    the metrics records (on rank 0)."""
    getattr(run.engine, "close", lambda: None)()  # vLLM leaves its process groups before parallel.destroy ends ours
    run.logger.close()
    if cfg.trainer.export:
        checkpoint.export_final(run.model, run.tok, run.out, run.info)
    records = read_jsonl(run.out / "metrics.jsonl") if run.info.is_main else []
    if run.info.is_main:
        if cfg.trainer.plot:
            plot_curves(records, run.out / "curves.png",
                        title=f"{run.path.name}: s_inter={cfg.bupo.iterative_steps}, k={run.k}")
        print(final_table(records))
    return records


def main(argv: list[str] | None = None) -> None:
    """The command: a user error (config, data, model folder, out_dir) ends in one `error: ...` line naming the field,
    file or row, exit code 1 (bupo.cli.run_main; BUPO_TRACEBACK=1 shows the traceback); a bug keeps its traceback."""
    from bupo.cli import run_main

    run_main(lambda: run(load_config(argv)))
    parallel.exit_process()  # a finished torchrun rank leaves without the interpreter's teardown (see there)


if __name__ == "__main__":
    main()
