"""python -m bupo.evals.passk on a tiny random model: resumable generations (stop after a batch, a truncated last line,
a problem cut short), same final report as an uninterrupted run, no duplicated rows, settings guard."""

import json

import pytest

import bupo.reward
from bupo.evals import passk
from bupo.rollout.interface import SamplingParams, sequence_seed, step_seed


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    """A random tiny model never boxes an answer: score by response parity so the report is not all zeros."""
    def score_batch(responses, truths, **kw):
        return [bupo.reward.RewardResult(float(len(r) % 2 == 0), "correct" if len(r) % 2 == 0 else "wrong")
                for r in responses]
    monkeypatch.setattr(bupo.reward, "score_batch", score_batch)


def _args(model, out, *extra):
    return ["--model", str(model), "--data", "arithmetic", "--arithmetic-size", "4", "--n", "3", "--k", "1,2,16",
            "--batch-size", "3", "--max-new-tokens", "6", "--engine", "builtin", "--seed", "5", "--out", str(out),
            *extra]


def _rows(out):
    return [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]


def _key(r):
    return r["dataset"], r["problem"], r["sample"]


def test_resume_equals_straight_run(tiny_chat_model, tmp_path):
    straight = passk.main(_args(tiny_chat_model, tmp_path / "a"))
    assert straight["k"] == [1, 2, 3]  # capped at n
    assert 0 < straight["datasets"]["arithmetic"]["avg"] < 1

    out = tmp_path / "b"
    assert passk.main(_args(tiny_chat_model, out, "--max-batches", "2")) is None  # stopped after 2 of 4 batches
    assert len(_rows(out)) == 6
    with open(out / "generations.jsonl", "a") as f:
        f.write('{"dataset": "arithmetic", "problem": 2, "sam')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="truncated last line"):
        resumed = passk.main(_args(tiny_chat_model, out))
    rows = _rows(out)
    assert len(rows) == 12 and len({_key(r) for r in rows}) == 12
    strip = lambda rep: {k: v for k, v in rep.items() if k != "settings"}  # noqa: E731
    assert strip(resumed) == strip(straight)
    assert {_key(r): r for r in rows} == {_key(r): r for r in _rows(tmp_path / "a")}
    assert json.loads((out / "passk.json").read_text())["datasets"] == straight["datasets"]
    assert (out / "passk.png").stat().st_size > 0

    again = passk.main(_args(tiny_chat_model, out))  # nothing left to generate
    assert strip(again) == strip(straight) and len(_rows(out)) == 12


def test_resume_completes_a_problem_cut_short(tiny_chat_model, tmp_path):
    out = tmp_path / "c"
    passk.main(_args(tiny_chat_model, out, "--max-batches", "2"))
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(lines[:4]))  # problem 1 keeps 1 of its 3 samples
    rep = passk.main(_args(tiny_chat_model, out))
    rows = _rows(out)
    assert len(rows) == 12 and len({_key(r) for r in rows}) == 12
    assert rep["datasets"]["arithmetic"]["samples"] == 12


def test_errors(tiny_chat_model, tmp_path):
    out = tmp_path / "d"
    passk.main(_args(tiny_chat_model, out, "--max-batches", "1"))
    with pytest.raises(ValueError, match="other settings"):
        passk.main(_args(tiny_chat_model, out, "--temperature", "0.5"))
    with (out / "generations.jsonl").open("a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match="line 4"):
        passk.main(_args(tiny_chat_model, out))
    with pytest.raises(ValueError, match="--k"):
        passk.main(_args(tiny_chat_model, tmp_path / "e", "--k", "0,4"))


def test_vllm_engine_missing_is_a_clear_error(tiny_chat_model, tmp_path, monkeypatch):
    import importlib.util

    from bupo.cli import run_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit, match="needs vllm"):
        run_main(passk.main, _args(tiny_chat_model, tmp_path / "f", "--engine", "vllm"))


def test_a_sample_depends_only_on_seed_dataset_problem_and_index(tiny_chat_model, tmp_path, monkeypatch):
    """Other batch sizes and other problem sets seed sample j of problem i of a dataset with the same generator:
    sequence_seed(step_seed(seed, "passk/<dataset>", 0), i, j). Decoded alone (--max-batch-size 1) its computation does
    not depend on the batch either, so its text is bitwise the same; in larger batches the logits may differ in the
    last bits (bupo.rollout.builtin), so equal texts are not asserted there."""
    seeds = []
    real = SamplingParams.sample_seed

    def spy(self, prompt, sample):
        seeds.append((self.seed_index[prompt], sample, real(self, prompt, sample)))
        return seeds[-1][2]

    monkeypatch.setattr(SamplingParams, "sample_seed", spy)
    runs = {}
    for name, extra in (("a", ()), ("b", ("--batch-size", "7", "--max-prompts", "2"))):
        seeds.clear()
        passk.main(_args(tiny_chat_model, tmp_path / name, "--max-batch-size", "1", *extra))
        runs[name] = {_key(r): r["response"] for r in _rows(tmp_path / name)}
        base = step_seed(5, "passk/arithmetic", 0)
        assert sorted(seeds) == sorted((i, j, sequence_seed(base, i, j)) for _, i, j in runs[name])
    a, b = runs["a"], runs["b"]
    assert len(a) == 12 and len(b) == 6 and all(a[key] == text for key, text in b.items())


def test_generations_of_the_old_seeding_are_refused(tiny_chat_model, tmp_path):
    out = tmp_path / "old"
    passk.main(_args(tiny_chat_model, out, "--max-batches", "1"))
    settings = json.loads((out / "passk_settings.json").read_text())
    del settings["seed_scheme"]  # what a file of an earlier bupo.evals.passk holds
    (out / "passk_settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="seeding scheme 1"):
        passk.main(_args(tiny_chat_model, out))


def test_dtype_is_a_recorded_setting(tiny_chat_model, tmp_path):
    """--dtype is recorded resolved (auto: float32 on a CPU); a rerun must compute in the same dtype, however it is
    spelled; a settings file from before --dtype existed stands for auto."""
    import torch

    auto = "bfloat16" if torch.cuda.is_available() else "float32"
    out = tmp_path / "d"
    passk.main(_args(tiny_chat_model, out, "--max-batches", "1"))
    assert json.loads((out / "passk_settings.json").read_text())["dtype"] == auto
    passk.main(_args(tiny_chat_model, out, "--dtype", auto, "--max-batches", "1"))  # the same dtype: accepted
    other = "float32" if auto == "bfloat16" else "bfloat16"
    with pytest.raises(ValueError, match=rf"'dtype': \('{auto}', '{other}'\)"):
        passk.main(_args(tiny_chat_model, out, "--dtype", other))
    settings = json.loads((out / "passk_settings.json").read_text())
    del settings["dtype"]  # what a file of an earlier bupo.evals.passk holds
    (out / "passk_settings.json").write_text(json.dumps(settings))
    passk.main(_args(tiny_chat_model, out, "--max-batches", "1"))


def test_bf16_generations_are_fp32_log_probs_of_a_bf16_model(tiny_chat_model, tmp_path):
    out = tmp_path / "b"
    passk.main(_args(tiny_chat_model, out, "--dtype", "bfloat16"))
    assert json.loads((out / "passk_settings.json").read_text())["dtype"] == "bfloat16"
    assert len(_rows(out)) == 4 * 3 and json.loads((out / "passk.json").read_text())["settings"]["dtype"] == "bfloat16"
