"""The trainer end to end on a tiny random Llama with the real SmolLM2 tokenizer: metrics contract, phase switch,
upper layers untouched in phase one, exact resume, HF export, clear errors."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import TIMING, strip_timing, train_args

from bupo import models
from bupo.config import load_config
from bupo.train import main, run

REQUIRED = {"step", "phase", "reward_mean", "accuracy", "loss", "entropy", "grad_norm", "clip_frac", "approx_kl",
            "response_len_mean", "truncated_frac", "nonfinite_skipped"} | TIMING


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, run(load_config(train_args(tiny_model, out, 4)))


def test_metrics_contract_and_phase_switch(straight):
    out, records = straight
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
    assert [r["phase"] for r in records] == ["internal", "internal", "full", "full"]
    assert all(r["entropy"] > 0 for r in records)
    saved = json.loads((out / "config.json").read_text())
    assert saved["bupo"]["internal_layer"] == 1 and saved["trainer"]["total_steps"] == 4


def test_resume_equals_no_resume(tiny_model, tmp_path, straight):
    out_a, rec_a = straight
    out_b = tmp_path / "b"
    run(load_config(train_args(tiny_model, out_b, 2)))  # stops after the step-2 checkpoint
    assert (out_b / "checkpoints" / "step_000002").is_dir()
    rec_b = run(load_config(train_args(tiny_model, out_b, 4)))  # resumes at step 3
    assert strip_timing(rec_b) == strip_timing(rec_a)
    wa, wb = load_file(out_a / "final" / "model.safetensors"), load_file(out_b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_are_complete_and_pruned(straight):
    out, _ = straight
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]  # keep_checkpoints = 2, no .tmp left behind
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and "loader" in state


def test_export_loads_in_transformers(straight, tiny_model):
    transformers = pytest.importorskip("transformers")
    out, _ = straight
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", **{dtype_kw: torch.float32})
    ours = models.load_pretrained(out / "final")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    torch.testing.assert_close(hf(ids).logits, ours(ids))
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert tok.decode(tok.encode("2 + 3 = 5")) == "2 + 3 = 5"
    # phase one left layers 2, 3 bit-identical; phase two moved them (weight decay at least)
    init = models.load_pretrained(tiny_model)
    final = dict(ours.named_parameters())
    for n, p in init.named_parameters():
        assert not torch.equal(p, final[n]), f"{n} never moved"


def test_phase_one_only_keeps_upper_layers_bit_identical(tiny_model, tmp_path):
    out = tmp_path / "p1"
    run(load_config(train_args(tiny_model, out, 2)))
    init = dict(models.load_pretrained(tiny_model).named_parameters())
    after = dict(models.load_pretrained(out / "final").named_parameters())
    for n, p in init.items():
        lower = n.startswith("model.embed_tokens") or n.startswith(("model.layers.0.", "model.layers.1."))
        assert torch.equal(p, after[n]) != lower, n


@pytest.mark.parametrize("override, field", [
    ("--bupo.internal_layer=4", "bupo.internal_layer"),
    ("--bupo.iterative_steps=9", "bupo.iterative_steps"),
    ("--algo.clip_high=-1", "algo.clip_high"),
    ("--model.liger=on", "model.liger"),  # liger's kernels need CUDA
])
def test_bad_config_exits_with_field_name(tiny_model, tmp_path, capsys, override, field):
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, tmp_path / "bad", 4) + [override])
    assert field in str(e.value)


def test_liger_hooks_go_on_policy_sampler_and_reference(tiny_model, tmp_path, monkeypatch):
    """Where CUDA + liger-kernel would turn liger on, every model the trainer builds gets the hooks (before FSDP2)."""
    import bupo.train as train_mod

    seen = []

    def record(model, enabled=True):
        assert not hasattr(model, "_fsdp_param_group") and "FSDP" not in type(model).__name__
        seen.append(model)
        return {}

    import bupo.rollout.engine as rollout_mod

    monkeypatch.setattr(train_mod, "resolve_liger", lambda mode, device: mode == "auto")
    monkeypatch.setattr(train_mod, "use_liger", record)
    monkeypatch.setattr(rollout_mod, "use_liger", record)  # the built-in sampler (bupo.rollout.engine.make_engine)
    run(load_config(train_args(tiny_model, tmp_path / "l", 1, **{"algo.kl_coef": 0.01, "bupo.iterative_steps": 1})))
    assert len(seen) == 3 and len({id(m) for m in seen}) == 3  # policy, built-in sampler's copy, reference
    seen.clear()
    run(load_config(train_args(tiny_model, tmp_path / "off", 1, **{"model.liger": "off", "bupo.iterative_steps": 1})))
    assert seen == []


@pytest.mark.parametrize("budget", [4096, 5])  # one packed micro-batch; one per sequence
def test_layer_diagnostics_step_is_the_token_mean_over_packed_responses(tiny_model, budget):
    """Packed rollouts + response mask == each sequence on its own, weighted by its response tokens, however the
    rollouts are split into micro-batches."""
    from bupo.analysis import layer_diagnostics
    from bupo.parallel import DistInfo
    from bupo.rollout.interface import Rollout
    from bupo.train import layer_diagnostics_step

    model = models.load_pretrained(tiny_model)
    cfg = load_config(["--trainer.diag_seqs=2", "--rollout.temperature=0.8", f"--algo.micro_batch_tokens={budget}"])
    seqs = [Rollout([5, 9, 31], [7, 8, 2, 6]), Rollout([11], [3, 4])]  # the caller picks the step's first diag_seqs
    got = layer_diagnostics_step(cfg, model, seqs, 1, DistInfo(0, 1, 0, torch.device("cpu")), vocab_size=40000)
    assert set(got) == {"diag/cos_final", "diag/kl_final", "diag/cos_l2", "diag/kl_l2", "diag/cos_l3", "diag/kl_l3"}
    parts = []
    for s in seqs[:2]:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        mask[0, len(s.prompt_ids) - 1:-1] = True  # positions predicting the response tokens
        parts.append(layer_diagnostics(model, ids, 1, mask=mask, temperature=0.8, vocab_size=40000))
    n = [p["num_tokens"] for p in parts]
    assert n == [4, 2]
    for key, pick in (("cos_final", lambda p: p["cos_final"]), ("kl_final", lambda p: p["kl_final"]),
                      ("kl_l2", lambda p: p["kl"][0]), ("cos_l3", lambda p: p["cos"][1])):
        want = sum(w * pick(p) for w, p in zip(n, parts)) / sum(n)
        assert got[f"diag/{key}"] == pytest.approx(want, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("every, steps, logged", [
    (2, 3, [False, True, False]),
    (1, 2, [True, True]),  # step 1 is phase one: layers above k are first gathered by the diagnostics themselves
])
def test_diagnostics_are_logged_every_diag_every_steps(tiny_model, tmp_path, every, steps, logged):
    records = run(load_config(train_args(tiny_model, tmp_path / "d", steps, **{"trainer.diag_every": every,
                                                                          "bupo.iterative_steps": 1})))
    assert ["diag/kl_final" in r for r in records] == logged
    for r in records:
        if "diag/kl_final" in r:
            assert -1 <= r["diag/cos_l2"] <= 1 and r["diag/kl_l3"] >= 0 and r["diag/kl_final"] >= 0
            assert math.isfinite(r["diag/cos_final"])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--model.path", str(tmp_path / "nope"), "--trainer.out_dir", str(tmp_path / "o")])
    assert "model.path" in str(e.value) and "config.json" in str(e.value)


def test_rerun_with_other_settings_into_a_checkpointed_dir_is_refused(tiny_model, straight):
    out, _ = straight
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 6, **{"bupo.iterative_steps": 0}))
    assert "bupo.iterative_steps: 2 -> 0" in str(e.value)


def test_a_failed_run_leaves_no_process_group(tiny_model, tmp_path):
    import torch.distributed as dist
    with pytest.raises(SystemExit):
        main(train_args(tiny_model, tmp_path / "pg", 4, **{"bupo.internal_layer": 9}))
    assert not dist.is_initialized()


def test_zero_variance_filter_when_every_group_is_filtered(tiny_model, tmp_path):
    """The random model never solves a problem, so every group has equal rewards and the filter drops them all:
    the run completes, logs the usual keys (NaN token means: nothing was trained on) and leaves the weights alone."""
    out = tmp_path / "zv"
    records = run(load_config(train_args(tiny_model, out, 2, **{"algo.filter_zero_variance": "true",
                                                           "optim.weight_decay": 0.1})))
    assert [r["zero_var_frac"] for r in records] == [1.0, 1.0]
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert math.isnan(r["loss"]) and math.isnan(r["grad_norm"]) and r["nonfinite_skipped"] == 0
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step: not even weight decay


def test_consecutive_non_finite_steps_stop_the_run(tiny_model, tmp_path, monkeypatch):
    import bupo.train as train

    real = train.update_policy

    def poisoned(*args, **kwargs):
        m = real(*args, **kwargs)
        return {**m, "nonfinite_skipped": 1.0}

    monkeypatch.setattr(train, "update_policy", poisoned)
    out = tmp_path / "nf"
    with pytest.raises(FloatingPointError, match="2 steps in a row.*optim.max_nonfinite_steps=2"):
        run(load_config(train_args(tiny_model, out, 4, **{"optim.max_nonfinite_steps": 2})))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in lines] == [1, 1]  # both steps logged before the stop


def _no_reward(responses, ground_truths, **_):
    from bupo.reward import RewardResult

    return [RewardResult(0.0, "wrong") for _ in responses]


@pytest.mark.parametrize("mini_batch, updates", [(2, 1), (1, 2)])
def test_logged_lr_is_the_lr_of_the_steps_first_update_measured_from_the_weights(tiny_model, tmp_path, monkeypatch,
                                                                                 mini_batch, updates):
    """optim.lr=1e-2, 4 warm-up steps: step 1's update uses 1e-2 / 4 = 2.5e-3 (the record used to say 5e-3, the
    next step's rate). Measured from the weights: every reward is 0, so every gradient is 0 and AdamW's step is
    its weight decay alone, p <- p (1 - lr wd) per update. With two updates per step (mini-batch of 1 prompt) the
    warm-up spans 8 updates, and `lr` is the first update's: 1.25e-3 (the second uses 2.5e-3)."""
    import bupo.train as train_mod

    monkeypatch.setattr(train_mod, "score_batch", _no_reward)
    out, wd = tmp_path / "lr", 0.5
    records = run(load_config(train_args(tiny_model, out, 1, **{
        "optim.lr": 1e-2, "optim.warmup_steps": 4, "optim.weight_decay": wd, "bupo.iterative_steps": 0,
        "algo.ppo_mini_batch_size": mini_batch, "trainer.save_every": 0})))
    lrs = [1e-2 * (i + 1) / (4 * updates) for i in range(updates)]  # the rate of each optimizer update of step 1
    assert records[0]["lr"] == pytest.approx(lrs[0], rel=1e-12)
    before = load_file(tiny_model / "model.safetensors")["model.embed_tokens.weight"].double()
    after = load_file(out / "final" / "model.safetensors")["model.embed_tokens.weight"].double()
    big = before.abs() > 1e-2  # entries whose relative change is well above float32 rounding
    shrink = (after[big] / before[big]).mean().item()  # prod over updates of (1 - lr_i wd)
    assert shrink == pytest.approx(math.prod(1 - lr * wd for lr in lrs), abs=2e-6)
    assert abs(shrink - math.prod(1 - lr * wd for lr in lrs)) < abs(shrink - (1 - 2 * lrs[0] * wd * updates)) / 10


def _alternating_reward(responses, ground_truths, **_):
    from bupo.reward import RewardResult

    return [RewardResult(float(i % 2 == 0), "correct" if i % 2 == 0 else "wrong") for i in range(len(responses))]


def _finish_first_samples(monkeypatch):
    """The trainer's engine, with sample 0 of every prompt marked finished (the random model never stops on its own
    within 6 tokens, so every response is truncated otherwise)."""
    import bupo.train as train_mod

    real = train_mod.make_engine

    class Engine:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompts, params):
            out = self.engine.generate(prompts, params)
            for s in out:
                s.finished = s.finished or s.sample_index == 0
            return out

        def __getattr__(self, name):
            return getattr(self.engine, name)

    monkeypatch.setattr(train_mod, "make_engine", lambda *a, **kw: Engine(real(*a, **kw)))


def test_mask_truncated_leaves_truncated_responses_out_of_the_loss_and_counts_them(tiny_model, tmp_path,
                                                                                  monkeypatch):
    """algo.mask_truncated: the 4 responses of a step all hit max_new_tokens, rewards 1, 0 per group (a non-zero
    advantage): with the knob on none of them reaches the loss (NaN token means, no optimizer step, the weights
    bit-identical even with weight decay) and `masked_truncated` counts 4; with it off (the default) the same run
    trains on them and counts 0."""
    import bupo.train as train_mod

    monkeypatch.setattr(train_mod, "score_batch", _alternating_reward)
    kw = {"optim.weight_decay": 0.1, "bupo.iterative_steps": 0, "trainer.save_every": 0}
    before = load_file(tiny_model / "model.safetensors")
    on = run(load_config(train_args(tiny_model, tmp_path / "on", 2, **kw, **{"algo.mask_truncated": "true"})))
    assert [r["truncated_frac"] for r in on] == [1.0, 1.0] and [r["masked_truncated"] for r in on] == [4, 4]
    assert all(math.isnan(r["loss"]) and math.isnan(r["grad_norm"]) for r in on)
    after = load_file(tmp_path / "on" / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    off = run(load_config(train_args(tiny_model, tmp_path / "off", 2, **kw)))
    assert [r["masked_truncated"] for r in off] == [0, 0] and all(math.isfinite(r["loss"]) for r in off)
    after = load_file(tmp_path / "off" / "final" / "model.safetensors")
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_mask_truncated_trains_on_the_finished_responses_only(tiny_model, tmp_path, monkeypatch):
    """Sample 0 of each prompt finished, sample 1 truncated: with the mask, the update gets the truncated ones as
    inactive (out of the loss and of the global token count, as the zero-variance filter leaves rollouts out), trains
    on the finished ones (a finite loss) and logs 2 masked responses."""
    import bupo.train as train_mod

    monkeypatch.setattr(train_mod, "score_batch", _alternating_reward)
    _finish_first_samples(monkeypatch)
    kw = {"bupo.iterative_steps": 0, "trainer.save_every": 0, "algo.ppo_mini_batch_size": 2}
    seen = []
    real = train_mod.update_policy

    def spy(model, optimizer, seqs, *args, **kwargs):
        seen.append([(s.finished, s.active) for s in seqs])
        return real(model, optimizer, seqs, *args, **kwargs)

    monkeypatch.setattr(train_mod, "update_policy", spy)
    rec = run(load_config(train_args(tiny_model, tmp_path / "m", 1, **kw, **{"algo.mask_truncated": "true"})))[0]
    assert rec["masked_truncated"] == 2 and rec["truncated_frac"] == 0.5 and math.isfinite(rec["loss"])
    assert seen == [[(True, True), (False, False), (True, True), (False, False)]]  # truncated: inactive


def test_a_run_past_the_models_context_is_refused_before_any_work(tmp_path):
    """max_position_embeddings=16, data.max_prompt_length=16, rollout.max_new_tokens=16: the run used to exit 0
    after sampling and training positions up to 26; now it ends in one error line naming both fields and the
    limit, before any output is written."""
    from tiny_run import tiny_model_folder

    model = tiny_model_folder(tmp_path / "m16", max_position_embeddings=16)
    out = tmp_path / "ctx"
    with pytest.raises(SystemExit) as e:
        main(train_args(model, out, 2, **{"data.max_prompt_length": 16, "rollout.max_new_tokens": 16}))
    msg = str(e.value)  # SystemExit("error: ..."): exit code 1, the message on stderr
    assert msg.startswith("error: data.max_prompt_length=16 + rollout.max_new_tokens=16 = 32 tokens exceed")
    assert "max_position_embeddings=16" in msg and "\n" not in msg
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


def test_bf16_on_cpu_resumes_exactly_with_fp32_master_state(tiny_model, tmp_path, capsys):
    """model.dtype=bfloat16 on the CPU computes in bf16 (the log says so, and the numbers differ from an fp32 run's)
    while the master weights and the AdamW state stay fp32: the checkpoint holds fp32, a run resumed from it equals
    the uninterrupted run step for step, and the exported weights are bitwise the same."""
    from torch.distributed.checkpoint import FileSystemReader

    bf16 = {"model.dtype": "bfloat16", "trainer.diag_every": 2}
    out_a, out_b, out_32 = tmp_path / "a", tmp_path / "b", tmp_path / "fp32"
    rec_a = run(load_config(train_args(tiny_model, out_a, 4, **bf16)))
    assert "[model] compute bfloat16 on cpu, fp32 master weights and AdamW state" in capsys.readouterr().out
    run(load_config(train_args(tiny_model, out_b, 2, **bf16)))
    rec_b = run(load_config(train_args(tiny_model, out_b, 4, **bf16)))  # resumes at step 3
    assert strip_timing(rec_b) == strip_timing(rec_a)
    wa, wb = load_file(out_a / "final" / "model.safetensors"), load_file(out_b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {t.dtype for t in wa.values()} == {torch.float32}
    md = FileSystemReader(str(out_a / "checkpoints" / "step_000004")).read_metadata().state_dict_metadata
    floats = {k: m.properties.dtype for k, m in md.items()
              if hasattr(m, "properties") and m.properties.dtype.is_floating_point}
    assert any(k.startswith("model.") for k in floats) and any("exp_avg_sq" in k for k in floats), sorted(floats)
    assert set(floats.values()) == {torch.float32}, {k: v for k, v in floats.items() if v != torch.float32}
    rec_32 = run(load_config(train_args(tiny_model, out_32, 4)))
    # the same run in fp32 computes other numbers: the bf16 run really ran in bf16
    assert [r["entropy"] for r in rec_a] != [r["entropy"] for r in rec_32]
    assert all(math.isfinite(r["logp_mismatch"]) for r in rec_a if r["phase"] == "full")


def test_resuming_a_run_from_before_cpu_precision_warns(tiny_model, tmp_path):
    """A run checkpointed by a version that computed in float32 on a CPU whatever model.dtype said (its config.json
    has no model.dtype_resolved) and resumed in bf16 gets a warning saying its later steps are bf16's."""
    out = tmp_path / "old"
    bf16 = {"model.dtype": "bfloat16"}
    run(load_config(train_args(tiny_model, out, 2, **bf16)))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"].pop("dtype_resolved") == "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))  # as the earlier version wrote it
    with pytest.warns(UserWarning, match="computed in float32 on a CPU whatever model.dtype said; it resumes "
                                         "computing in bfloat16"):
        run(load_config(train_args(tiny_model, out, 3, **bf16)))
    assert json.loads((out / "config.json").read_text())["model"]["dtype_resolved"] == "bfloat16"
    with warnings.catch_warnings():  # recorded now: the next resume says nothing
        warnings.simplefilter("error")
        run(load_config(train_args(tiny_model, out, 4, **bf16)))
