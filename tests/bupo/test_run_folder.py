"""The trainer's out_dir keeps what an earlier run wrote: a rerun resumes it or is refused (never overwrites it), a
damaged newest checkpoint falls back to the older one, a metrics.jsonl cut mid-write resumes, a damaged one stops."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import strip_timing, train_args

from bupo.config import load_config
from bupo.train import main, run


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("finished")
    return out, run(load_config(train_args(tiny_model, out, 4)))


@pytest.fixture(scope="module")
def no_checkpoints(tiny_model, tmp_path_factory):
    """A finished 2-step run that saved no checkpoint (trainer.save_every=0)."""
    out = tmp_path_factory.mktemp("no_ckpt")
    run(load_config(train_args(tiny_model, out, 2, **{"trainer.save_every": 0})))
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- keep_checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_is_refused(tiny_model, tmp_path, keep):
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, tmp_path / "k", 4, **{"trainer.keep_checkpoints": keep}))
    assert f"trainer.keep_checkpoints={keep}" in str(e.value) and ">= 1" in str(e.value)
    assert not (tmp_path / "k").exists()


# --- reruns into a used folder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {"bupo.iterative_steps": 0},  # the case: other settings
    {"optim.lr": 1e-2},
    {},  # the same settings: there is no checkpoint to resume, so it would start over on top of the outputs
    {"trainer.total_steps": 3, "trainer.save_every": 1},  # only [trainer] differs
])
def test_rerun_into_a_finished_run_without_checkpoints_is_refused(tiny_model, no_checkpoints, extra):
    out = no_checkpoints
    before = _files(out)
    assert {"config.json", "metrics.jsonl", "final/model.safetensors"} <= before.keys()
    args = train_args(tiny_model, out, 2, **{"trainer.save_every": 0})
    with pytest.raises(SystemExit) as e:
        main(args + [f"--{k}={v}" for k, v in extra.items()])
    msg = str(e.value)
    assert repr(str(out)) in msg and "config.json, metrics.jsonl, final" in msg and "no checkpoint" in msg
    assert "another trainer.out_dir" in msg
    assert _files(out) == before  # nothing overwritten


@pytest.mark.parametrize("leftover", ["config.json", "metrics.jsonl", "final", "curves.png",
                                      "checkpoints/step_000002.tmp", "checkpoints/step_000002.damaged"])
def test_any_earlier_output_without_a_checkpoint_is_refused(tiny_model, tmp_path, leftover):
    out = tmp_path / "o"
    (out / leftover).parent.mkdir(parents=True, exist_ok=True)
    if leftover.endswith((".json", ".jsonl", ".png")):
        (out / leftover).write_text("{}\n")
    else:
        (out / leftover).mkdir()
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 2))
    assert leftover.split("/")[0] in str(e.value) and "no checkpoint" in str(e.value)


def test_a_folder_with_unrelated_files_is_used(tiny_model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    records = run(load_config(train_args(tiny_model, out, 1, **{"trainer.save_every": 0, "bupo.iterative_steps": 1})))
    assert [r["step"] for r in records] == [1] and (out / "notes.txt").read_text() == "mine"


def test_rerun_of_a_finished_checkpointed_run_has_nothing_to_do(tiny_model, finished, tmp_path):
    src, records = finished
    out = _copy(src, tmp_path / "again")
    metrics = (out / "metrics.jsonl").read_bytes()
    again = run(load_config(train_args(tiny_model, out, 4)))
    assert again == records and (out / "metrics.jsonl").read_bytes() == metrics
    assert _weights(out).keys() == _weights(src).keys()
    assert all(torch.equal(_weights(out)[k], w) for k, w in _weights(src).items())


def test_a_run_saved_by_an_earlier_version_still_resumes(tiny_model, finished, tmp_path):
    """config.json of an earlier version: rollout.tis_cap (now algo.tis_cap) and no optim.max_nonfinite_steps (added
    since, at its default). The same settings in today's layout resume it; a field set away from its default does
    not."""
    src, records = finished
    out = _copy(src, tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    cfg["rollout"]["tis_cap"] = cfg["algo"].pop("tis_cap")
    del cfg["optim"]["max_nonfinite_steps"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert run(load_config(train_args(tiny_model, out, 4))) == records
    (out / "config.json").write_text(json.dumps(cfg))  # the rerun wrote today's layout
    with pytest.raises(SystemExit, match="optim.max_nonfinite_steps: 3 -> 7"):
        main(train_args(tiny_model, out, 4, **{"optim.max_nonfinite_steps": 7}))


def test_rerun_with_other_settings_into_a_checkpointed_run_is_refused(tiny_model, finished):
    out, _ = finished
    before = _files(out)
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 6, **{"optim.lr": 1e-2}))
    assert "optim.lr: 0.001 -> 0.01" in str(e.value) and repr(str(out)) in str(e.value)
    assert _files(out) == before


@pytest.mark.parametrize("config", [None, '{"model": {"pa', "[1, 2]"])
def test_checkpoints_without_a_readable_config_json_are_refused(tiny_model, finished, tmp_path, config):
    out = _copy(finished[0], tmp_path / "c")
    (out / "config.json").unlink() if config is None else (out / "config.json").write_text(config)
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 4))
    assert "no readable config.json" in str(e.value)


# --- damaged checkpoints and metrics ------------------------------------------------------------------------------

def _cut(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage, reason", [
    (lambda c: _cut(next(c.glob("*.distcp"))), "truncated"),  # the example
    (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 4, "sched'), "trainer_state.json is unreadable"),
])
def test_damaged_newest_checkpoint_resumes_from_the_older_one(tiny_model, finished, tmp_path, damage, reason):
    src, records = finished
    out = _copy(src, tmp_path / "r")
    damage(out / "checkpoints" / "step_000004")
    with pytest.warns(UserWarning) as w:
        again = run(load_config(train_args(tiny_model, out, 4)))
    msgs = [str(x.message) for x in w]
    assert any("step_000004" in m and reason in m and "step_000002" in m for m in msgs), msgs
    assert any("dropping the records of steps [3, 4]" in m for m in msgs), msgs
    assert strip_timing(again) == strip_timing(records)  # steps 3 and 4 redone exactly
    assert all(torch.equal(_weights(out)[k], w) for k, w in _weights(src).items())
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000004", "step_000004.damaged"]


def test_every_checkpoint_damaged_is_one_error_line(tiny_model, finished, tmp_path):
    out = _copy(finished[0], tmp_path / "r")
    for c in (out / "checkpoints").iterdir():
        (c / ".metadata").unlink()
    before = _files(out)
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 4))
    msg = str(e.value)
    assert msg.startswith("error: ") and "step_000004: .metadata is missing" in msg
    assert "step_000002: .metadata is missing" in msg
    after = _files(out)
    assert after.keys() == before.keys()
    assert {k for k in before if after[k] != before[k]} <= {"config.json"}  # rewritten: out_dir moved with the copy


def test_metrics_cut_mid_write_resumes(tiny_model, finished, tmp_path):
    """A crash while writing step 4's record, after the step-2 checkpoint: the cut line is dropped, step 3's
    record is redone, and the file ends as a straight run's."""
    src, records = finished
    out = _copy(src, tmp_path / "m")
    shutil.rmtree(out / "checkpoints" / "step_000004")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    with pytest.warns(UserWarning) as w:
        again = run(load_config(train_args(tiny_model, out, 4)))
    msgs = [str(x.message) for x in w]
    assert any("metrics.jsonl: dropping a truncated last line" in m for m in msgs), msgs
    assert any("dropping the records of steps [3]: the run resumes after step 2" in m for m in msgs), msgs
    assert strip_timing(again) == strip_timing(records)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_metrics_damaged_in_the_middle_names_file_and_line(tiny_model, finished, tmp_path):
    out = _copy(finished[0], tmp_path / "m")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model, out, 4))
    assert "metrics.jsonl line 2: not valid JSON" in str(e.value)
    assert (out / "metrics.jsonl").read_text() == "".join(lines)


def test_a_start_that_recorded_no_step_is_started_again(tiny_model, tmp_path):
    """Stopped during step 1 (Ctrl-C, a crash): config.json and an empty metrics.jsonl, nothing else. The same
    experiment starts again there; another one is refused."""
    args = {"trainer.save_every": 0, "bupo.iterative_steps": 1}
    done = tmp_path / "done"
    run(load_config(train_args(tiny_model, done, 1, **args)))
    out = tmp_path / "stopped"
    out.mkdir()
    shutil.copy(done / "config.json", out / "config.json")
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:  # other settings: refused, the folder left as it was
        main(train_args(tiny_model, out, 1, **{**args, "rollout.n": 4}))
    assert "no checkpoint" in str(e.value) and (out / "metrics.jsonl").read_text() == ""
    records = run(load_config(train_args(tiny_model, out, 1, **args)))
    assert [r["step"] for r in records] == [1] and (out / "final").is_dir()
