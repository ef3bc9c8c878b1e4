"""GRPO / BuPO trainer: `python -m bupo.train --config FILE.toml [--section.field=value ...]`, also under torchrun.

One step: rollout -> reward -> advantages -> old log-probs -> update -> sync -> eval -> checkpoint. Steps count from
1; steps 1..bupo.iterative_steps optimize the internal policy pi^k (phase "internal": layers 0..k run, layers
above k and the final norm are never run nor stepped), later steps the full policy (phase "full").
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import models
from bupo import checkpoint, parallel, weight_sync
from bupo.config import Config, load_config
from bupo.data import PromptLoader, arithmetic_rows, load_rows, render_prompts
from bupo.loss import group_advantages, zero_variance_groups
from bupo.metrics import MetricsLogger, peak_mem_gb, plot_curves, read_jsonl, summary_line
from bupo.reward import REASONS, score_batch
from bupo.rollout import BuiltinEngine, SamplingParams, step_seed
from bupo.tokenizer import Tokenizer
from bupo.update import Seq, compute_logprobs, pack, phase_one_names, update_policy
from models.liger import resolve_liger, use_liger

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --- setup helpers ------------------------------------------------------------------------------------------------

def load_prompts(cfg: Config, tok: Tokenizer, names: list[str], *, seed: int, log) -> dict[str, list]:
    """Rendered prompts per dataset name ('arithmetic' is the built-in task, generated from `seed`)."""
    out = {}
    for name in names:
        if name == "arithmetic":
            rows = arithmetic_rows(cfg.data.arithmetic_size, seed, max_operand=cfg.data.arithmetic_max_operand,
                                   ops=cfg.data.arithmetic_ops, demos=cfg.data.arithmetic_demos)
            stats = {"rows_total": len(rows)}
        else:
            rows, stats = load_rows(name)
        prompts, rstats = render_prompts(rows, tok, max_prompt_length=cfg.data.max_prompt_length,
                                         truncation=cfg.data.truncation, enable_thinking=cfg.data.enable_thinking,
                                         template=cfg.data.chat_template or None)
        log(f"[data] {name}: {len(prompts)} prompts ({json.dumps({**stats, **rstats})})")
        out[name] = prompts
    return out


def make_engine(cfg: Config, path: Path, info: parallel.DistInfo, tok: Tokenizer, compute_dtype: torch.dtype,
                liger: bool = False):
    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "builtin"
        if info.device.type == "cuda":
            try:
                import vllm  # noqa: F401
                kind = "vllm"
            except ImportError:
                warnings.warn("rollout.engine='auto': vllm is not installed, falling back to the built-in engine")
    if kind == "vllm":
        from bupo.vllm_engine import VLLMEngine
        # one seed per tensor-parallel group: its ranks run one engine together (requests carry their own seeds)
        return VLLMEngine(str(path), seed=cfg.trainer.seed + info.rank // cfg.rollout.tensor_parallel_size,
                          dtype=compute_dtype,
                          gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                          tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                          max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                          vocab_size=tok.vocab_size)
    sampler_model = models.load_pretrained(path, dtype=compute_dtype, device=info.device)
    if liger:
        use_liger(sampler_model)
    return BuiltinEngine(sampler_model, max_batch_size=cfg.rollout.max_batch_size, vocab_size=tok.vocab_size)


def sync_weights(model, engine, k: int | None) -> int:
    """Stream full tensors to the rollout engine in bounded buckets (only layers 0..k and the head when k is given,
    cast to the engine's dtype before the FSDP all-gather when it has one); returns the bytes sent."""
    sent = 0

    def tensors():
        nonlocal sent
        for bucket, nbytes in weight_sync.iter_full_tensors(model, weight_sync.sync_names(model, k),
                                                            dtype=getattr(engine, "dtype", None)):
            sent += nbytes
            yield from bucket

    engine.update_weights(tensors())
    return sent


def sampling(cfg: Config, tok: Tokenizer, seed: int, *, n: int | None = None, max_new_tokens: int | None = None,
             seed_index: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(n=n or cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_new_tokens=max_new_tokens or cfg.rollout.max_new_tokens,
                          seed=seed, stop_token_ids=tuple(tok.stop_token_ids), seed_index=seed_index)


def validate(cfg: Config, engine, tok: Tokenizer, val_sets: dict, info: parallel.DistInfo, step: int) -> dict:
    """avg@val_n accuracy per validation set. Each rank samples a contiguous share of the prompts, seeded by their
    positions in the set, so the result does not depend on the number of ranks."""
    out = {}
    for name, prompts in val_sets.items():
        lo, hi = len(prompts) * info.rank // info.world_size, len(prompts) * (info.rank + 1) // info.world_size
        params = sampling(cfg, tok, step_seed(cfg.trainer.seed, f"val/{name}", step), n=cfg.trainer.val_n,
                          max_new_tokens=cfg.trainer.val_max_new_tokens or None, seed_index=tuple(range(lo, hi)))
        mine = prompts[lo:hi]
        samples = engine.generate([p.ids for p in mine], params)  # also when empty: TP ranks generate together
        truths = [mine[s.prompt_index].row.ground_truth for s in samples]
        res = score_batch([tok.decode(s.response_ids) for s in samples], truths)
        tot = parallel.all_reduce_dict({"correct": sum(r.score for r in res), "total": len(res)})
        out[f"val/{name}"] = tot["correct"] / max(tot["total"], 1)
    return out


def layer_diagnostics_step(cfg: Config, model, seqs: list[Seq], k: int, info: parallel.DistInfo,
                           vocab_size: int) -> dict:
    """Paper Fig. 5 during training: cos(h_k, h_l) and KL(pi^k || pi^l) for every layer l above k and for the final
    policy, averaged over the response tokens of `seqs` (this rank's part of the step's first trainer.diag_seqs
    rollouts) and over all ranks. Every rank must call it (capture is collective under FSDP2)."""
    from bupo.analysis import layer_diagnostics

    packed = pack(seqs or [Seq([0], [0])], info.device)  # a rank without rollouts joins the collectives, weightless
    mask = torch.zeros(packed.input_ids.shape, dtype=torch.bool, device=info.device)  # [1, total]
    mask[0, packed.resp_pos] = True  # the positions whose policy produced a response token
    d = layer_diagnostics(model, packed.input_ids, k, cu_seqlens=packed.cu_seqlens, mask=mask,
                          temperature=cfg.rollout.temperature, vocab_size=vocab_size)
    n = d["num_tokens"] if seqs else 0
    vals = {"diag/cos_final": d["cos_final"], "diag/kl_final": d["kl_final"],
            **{f"diag/cos_l{layer}": c for layer, c in zip(d["layers"], d["cos"])},
            **{f"diag/kl_l{layer}": x for layer, x in zip(d["layers"], d["kl"])}}
    parallel.reshard(model)  # a no-grad pass: the checkpoint and the weight sync must see the fp32 shards again
    sums = parallel.all_reduce_dict({"tokens": n, **{key: v * n for key, v in vals.items()}})
    return {key: sums[key] / sums["tokens"] for key in vals}  # token-weighted means over ranks


def choose_internal_layer(cfg: Config, model, engine, tok: Tokenizer, prompts: list, log) -> int:
    """bupo.internal_layer = 'auto': the boundary layer of the entropy flow on a few training prompts."""
    from bupo.analysis import boundary_layer, entropy_flow

    picked = prompts[: cfg.bupo.auto_prompts]
    samples = engine.generate([p.ids for p in picked], sampling(cfg, tok, step_seed(cfg.trainer.seed, "auto", 0), n=1))
    flow = entropy_flow(model, [(s.prompt_ids, s.response_ids) for s in samples], norm=cfg.bupo.norm,
                        temperature=cfg.rollout.temperature)
    parallel.reshard(model)
    k = int(parallel.broadcast_int(boundary_layer(flow)))  # every rank trains the same layer
    log(f"[bupo] internal_layer=auto -> {k} (0-based; paper layer {k + 1}): last layer with mean FFN entropy "
        f"change > 0 over {sum(len(s.response_ids) for s in samples)} response tokens")
    return k


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
    one it cannot resume, so it would start over on top of them."""
    earlier = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if checkpoint.latest(out) is None:
        if not earlier:
            return None
        return (f"trainer.out_dir={str(out)!r} holds an earlier run's outputs ({', '.join(earlier)}) and no "
                "checkpoint to resume from; a new run there would overwrite them. Use another trainer.out_dir, or "
                "delete those to start over")
    try:
        saved = json.loads((out / "config.json").read_text())
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise ValueError("not an object of [section] objects")
    except (OSError, ValueError) as e:  # missing, unreadable, or not JSON
        return (f"trainer.out_dir={str(out)!r} holds checkpoints but no readable config.json to check this run's "
                f"settings against ({type(e).__name__}: {e}). Restore it, or use another trainer.out_dir")
    saved = saved_settings(saved)
    diffs = [f"{sec}.{key}: {saved[sec][key]!r} -> {value!r}"
             for sec, fields in resolved.items() if sec != "trainer"
             for key, value in fields.items() if saved.get(sec, {}).get(key, value) != value]
    diffs += [f"{sec}.{key}: {saved[sec][key]!r} -> (unset)" for sec in saved if sec != "trainer"
              for key in saved[sec] if key not in resolved.get(sec, {})]
    if diffs:
        return (f"trainer.out_dir={str(out)!r} holds a checkpointed run with other settings "
                f"({'; '.join(diffs)}); a rerun there resumes it. Use another trainer.out_dir or delete it")
    return None


def check_resume_config(out: Path, resolved: dict, info: parallel.DistInfo) -> None:
    """Raise `resume_refusal` on every rank (collective). Rank 0 alone reads out_dir, before it writes config.json
    there, so no rank can mistake that file for an earlier run's."""
    why = parallel.broadcast_object(resume_refusal(out, resolved) if info.is_main else None)
    if why is not None:
        raise ValueError(why)


def export_final(model, tok: Tokenizer, out: Path, info: parallel.DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        models.save_pretrained(model, out / "final", state_dict=sd)
        tok.save(out / "final")
    parallel.barrier()


# --- the run --------------------------------------------------------------------------------------------------------

def run(cfg: Config) -> list[dict]:
    """Train with `cfg`; returns the metrics records (on rank 0). Leaves no process group behind, also on errors."""
    info = parallel.init_distributed(cfg.trainer.device)
    try:
        return _train(cfg, info)
    finally:
        parallel.destroy()


def _train(cfg: Config, info: parallel.DistInfo) -> list[dict]:
    log = (lambda msg: tqdm.write(msg)) if info.is_main else (lambda msg: None)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed + info.rank)
    out = Path(cfg.trainer.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    path = models.resolve_model_path(cfg.model.path, flag="model.path")
    tok = Tokenizer.from_pretrained(path)
    compute_dtype = DTYPES[cfg.model.dtype] if info.device.type == "cuda" else torch.float32
    # Start-up memory order (torchtitan's): the policy is built on the meta device from config.json, sharded, then
    # each rank reads only its shards; the rollout engine claims its memory after that, the reference model last.
    # A rank never holds a replica of the fp32 master weights.
    model = models.build_meta(path)  # config.json only: validated before any weight is read
    cfg.validate(num_layers=model.config.num_hidden_layers, world_size=info.world_size,
                 tokenizer_vocab=tok.vocab_size, model_vocab=model.config.vocab_size)
    liger = resolve_liger(cfg.model.liger, info.device)
    if liger:  # before FSDP2 and compile wrap the modules
        log(f"[model] liger-kernel fused ops on: {use_liger(model)}")
    train_sets = load_prompts(cfg, tok, cfg.data.train_files, seed=cfg.trainer.seed, log=log)
    train_prompts = [p for ps in train_sets.values() for p in ps]
    if not train_prompts:
        raise ValueError(f"data.train_files={cfg.data.train_files}: no usable prompts")
    val_sets = {}
    if cfg.trainer.val_every:
        val_sets = load_prompts(cfg, tok, cfg.data.val_files, seed=cfg.trainer.seed + 1, log=log)
        if cfg.data.val_max_prompts:
            val_sets = {k: v[: cfg.data.val_max_prompts] for k, v in val_sets.items()}
    loader = PromptLoader(train_prompts, cfg.data.batch_size, cfg.trainer.seed)
    parallel.apply_fsdp(model, info, param_dtype=compute_dtype, compile=cfg.model.compile,
                        activation_checkpointing=cfg.model.activation_checkpointing)
    parallel.load_sharded(model, path, info)  # fp32 master weights, this rank's shards only
    engine = make_engine(cfg, path, info, tok, compute_dtype, liger)
    k = cfg.bupo.internal_layer
    if k == "auto":
        k = choose_internal_layer(cfg, model, engine, tok, train_prompts, log)
    resolved = cfg.to_dict()
    resolved["bupo"]["internal_layer_resolved"] = k
    check_resume_config(out, resolved, info)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(resolved, indent=1))
        log("[config] " + json.dumps(resolved))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    checkpoint.init_adamw_state(optimizer)
    warm = cfg.optim.warmup_steps * (cfg.data.batch_size // cfg.algo.ppo_mini_batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    ref_model = None
    if cfg.algo.kl_coef > 0:
        ref_model = models.build_meta(path)
        if liger:
            use_liger(ref_model)
        parallel.apply_fsdp(ref_model, info, param_dtype=compute_dtype)
        ref_model = parallel.load_sharded(ref_model, path, info).requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if phase_one_names(n, k)]
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
                           tensorboard=cfg.trainer.tensorboard, config=cfg.to_dict())
    n, s_inter = cfg.rollout.n, cfg.bupo.iterative_steps
    share = parallel.rank_share(cfg.data.batch_size, cfg.algo.ppo_mini_batch_size, info)  # global batch positions
    sample_positions = [p * n + j for p in share for j in range(n)]  # this rank's rollouts in the global batch
    nonfinite_run = 0  # steps in a row with a skipped (non-finite) optimizer step
    mini_batches = cfg.data.batch_size // cfg.algo.ppo_mini_batch_size
    bar = tqdm(range(start, cfg.trainer.total_steps + 1), disable=not info.is_main, desc="train", unit="step",
               initial=start - 1, total=cfg.trainer.total_steps)
    for step in bar:
        t_step = time.perf_counter()
        phase = "internal" if step <= s_inter else "full"
        layer = k if phase == "internal" else None
        norm = cfg.bupo.norm and phase == "internal"
        # --- rollout (full policy, this rank's share of the global batch, seeded by global position)
        t0 = time.perf_counter()
        batch = loader.next_batch()
        mine = [batch[i] for i in share]
        engine.wake_up()
        samples = engine.generate([p.ids for p in mine], sampling(cfg, tok, step_seed(cfg.trainer.seed, "train", step),
                                                                  seed_index=tuple(share)))
        engine.sleep()
        time_rollout = time.perf_counter() - t0
        # --- reward
        t0 = time.perf_counter()
        results = score_batch([tok.decode(s.response_ids) for s in samples],
                              [mine[s.prompt_index].row.ground_truth for s in samples])
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        time_reward = time.perf_counter() - t0
        # --- advantages (a prompt's n samples live on one rank; the batch-level estimator needs every reward)
        all_rewards = parallel.all_gather_1d(rewards)
        adv_all = group_advantages(all_rewards, n, estimator=cfg.algo.adv_estimator,
                                   norm_by_std=cfg.algo.norm_adv_by_std, eps=cfg.algo.adv_eps)
        adv = adv_all[info.rank * len(samples):(info.rank + 1) * len(samples)]
        zero_var = zero_variance_groups(rewards, n)
        seqs = [Seq(s.prompt_ids, s.response_ids, advantage=float(a),
                    sampler_logp=torch.tensor(s.logprobs, dtype=torch.float32),
                    active=not (cfg.algo.filter_zero_variance and bool(zero_var[i // n])))
                for i, (s, a) in enumerate(zip(samples, adv.tolist()))]
        # --- old log-probs under the policy being optimized (skipped with one update per step and no KL)
        t0 = time.perf_counter()
        lp_kw = dict(layer=layer, norm=norm, temperature=cfg.rollout.temperature,
                     token_budget=cfg.algo.micro_batch_tokens, vocab_size=tok.vocab_size)
        if mini_batches > 1 or cfg.algo.tis_cap:
            for s, lp in zip(seqs, compute_logprobs(model, seqs, **lp_kw)):
                s.old_logp = lp
        if ref_model is not None:
            for s, lp in zip(seqs, compute_logprobs(ref_model, seqs, **lp_kw)):
                s.ref_logp = lp
        time_logprob = time.perf_counter() - t0
        # --- update
        t0 = time.perf_counter()
        m = update_policy(model, optimizer, seqs, info=info, layer=layer, norm=norm,
                          temperature=cfg.rollout.temperature, mini_batches=mini_batches,
                          token_budget=cfg.algo.micro_batch_tokens, clip_low=cfg.algo.clip_low,
                          clip_high=cfg.algo.clip_high, dual_clip=cfg.algo.dual_clip,
                          entropy_coef=cfg.algo.entropy_coef, kl_coef=cfg.algo.kl_coef,
                          grad_clip=cfg.optim.grad_clip, tis_cap=cfg.algo.tis_cap,
                          trainable=trainable if phase == "internal" else None, scheduler=scheduler,
                          vocab_size=tok.vocab_size)
        time_update = time.perf_counter() - t0
        nonfinite_run = nonfinite_run + 1 if m["nonfinite_skipped"] else 0
        if m["nonfinite_skipped"]:
            warnings.warn(f"step {step}: {int(m['nonfinite_skipped'])} of {mini_batches} optimizer steps skipped: "
                          "the loss or the gradient norm was not finite (weights and optimizer state unchanged)")
        # --- sync weights to the rollout engine (phase one: only layers 0..k and the head changed)
        t0 = time.perf_counter()
        sync_bytes = sync_weights(model, engine, layer)
        time_sync = time.perf_counter() - t0
        # --- metrics (sums over ranks, reduced by name)
        reasons = Counter(r.reason for r in results)
        stats = parallel.all_reduce_dict({
            "reward": float(rewards.sum()), "correct": sum(r.score == 1.0 for r in results), "samples": len(samples),
            "response_tokens": sum(len(s.response_ids) for s in samples),
            "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
            "truncated": sum(not s.finished for s in samples), "zero_var": float(zero_var.sum()),
            "groups": len(zero_var), **{f"reason/{r}": reasons[r] for r in REASONS}})
        total = max(stats["samples"], 1.0)
        record = {"step": step, "phase": phase, "internal_layer": k if phase == "internal" else None,
                  "reward_mean": stats["reward"] / total, "accuracy": stats["correct"] / total,
                  **{key: m[key] for key in ("loss", "entropy", "grad_norm", "clip_frac", "approx_kl")},
                  "response_len_mean": stats["response_tokens"] / total, "truncated_frac": stats["truncated"] / total,
                  "zero_var_frac": stats["zero_var"] / max(stats["groups"], 1.0), "lr": scheduler.get_last_lr()[0],
                  **{f"reward/{r}": stats[f"reason/{r}"] / total for r in REASONS},
                  **{key: m[key] for key in ("kl_ref", "logp_mismatch") if key in m},
                  "nonfinite_skipped": int(m["nonfinite_skipped"]),
                  "time_rollout": time_rollout, "time_reward": time_reward, "time_logprob": time_logprob,
                  "time_update": time_update, "time_sync": time_sync, "sync_mb": sync_bytes / 2**20}
        if cfg.trainer.diag_every and step % cfg.trainer.diag_every == 0:  # every rank: capture is collective
            first = [s for s, i in zip(seqs, sample_positions) if i < cfg.trainer.diag_seqs]
            record.update(layer_diagnostics_step(cfg, model, first, k, info, tok.vocab_size))
        # --- eval
        if cfg.trainer.val_every and (step % cfg.trainer.val_every == 0 or step == cfg.trainer.total_steps):
            record.update(validate(cfg, engine, tok, val_sets, info, step))
        record["time_step"] = time.perf_counter() - t_step
        record["tokens_per_s"] = (stats["response_tokens"] + stats["prompt_tokens"]) / record["time_step"]
        record["peak_mem_gb"] = peak_mem_gb(info.device)
        logger.log(record)
        log(summary_line(record))
        if cfg.optim.max_nonfinite_steps and nonfinite_run >= cfg.optim.max_nonfinite_steps:
            raise FloatingPointError(
                f"step {step}: {nonfinite_run} steps in a row had a non-finite loss or gradient norm and were skipped "
                f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); lower optim.lr or check the data, "
                f"then resume from the last checkpoint in {out}")
        # --- checkpoint
        if cfg.trainer.save_every and (step % cfg.trainer.save_every == 0 or step == cfg.trainer.total_steps):
            checkpoint.save(out, step, model, optimizer, {"loader": loader.state_dict(),
                                                          "scheduler": scheduler.state_dict()},
                            info, keep=cfg.trainer.keep_checkpoints)
    logger.close()
    if cfg.trainer.export:
        export_final(model, tok, out, info)
    records = read_jsonl(out / "metrics.jsonl") if info.is_main else []
    if info.is_main:
        if cfg.trainer.plot:
            plot_curves(records, out / "curves.png", title=f"{path.name}: s_inter={s_inter}, k={k}")
        print(final_table(records))
    return records


def final_table(records: list[dict]) -> str:
    """Markdown table of the run: one row per step."""
    cols = ("step", "phase", "reward_mean", "accuracy", "entropy", "response_len_mean", "time_step")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command: a user error (config, data, model folder, out_dir) ends in one `error: ...` line naming the field,
    file or row, exit code 1 (bupo.cli.run_main; BUPO_TRACEBACK=1 shows the traceback); a bug keeps its traceback."""
    from bupo.cli import run_main

    run_main(lambda: run(load_config(argv)))


if __name__ == "__main__":
    main()
