"""trainer.tensorboard and trainer.wandb for real, on a tiny run: TensorBoard's own event reader reads back every
scalar of metrics.jsonl (a resumed run too, each step once), and wandb in offline mode writes its run under out_dir
with the config and every step (read back from wandb's own record format)."""

import json
import math
from pathlib import Path

import pytest
from tiny_run import train_args

from bupo.config import load_config
from bupo.train import run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is installed with the test extra")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="wandb is installed with the test extra")


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same(a: float, b: float) -> None:
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_tensorboard_reads_back_every_scalar_of_a_run_and_of_its_resume(tiny_model, tmp_path):
    out = tmp_path / "tb"
    run(load_config(train_args(tiny_model, out, 3, **{"trainer.tensorboard": "true"})))  # checkpoint at step 2
    run(load_config(train_args(tiny_model, out, 4, **{"trainer.tensorboard": "true"})))  # redoes step 3, then 4
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    scalars = _tensorboard_scalars(out)
    want = {}
    for r in records:
        for k, v in _numbers(r).items():
            want.setdefault(k, []).append((r["step"], v))
    assert scalars.keys() == want.keys()
    for tag, points in want.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # every step once: the redone step 3 too
        for (_, a), (_, b) in zip(got, points):
            _assert_same(a, b)  # step 3 is the resumed run's value (what metrics.jsonl keeps)


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's header (':W&B', magic, version: 7 bytes), then protobuf `Record`s in
    LevelDB log framing (32 KiB blocks; each chunk: crc32c, length, type; 1 = whole record, 2-4 = first, middle,
    last piece)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, piece, found = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(piece)
            found.append(record)
            piece = b""
    return found


def test_wandb_offline_writes_the_config_and_every_step(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    cfg = load_config(train_args(tiny_model, out, 2, **{"trainer.wandb": "true", "trainer.wandb_project": "bupo-test",
                                                        "trainer.save_every": 0}))
    run(cfg)
    (folder,) = (out / "wandb").glob("offline-run-*")
    records = _wandb_records(next(folder.glob("run-*.wandb")))
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.project == "bupo-test" and start.display_name == out.name
    assert start.run_id == (out / "wandb" / "bupo_run_id").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["algo"] == cfg.to_dict()["algo"] and config["rollout"]["n"] == cfg.rollout.n
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[r.history.step.num] = items
    metrics = _metrics(out)
    assert sorted(history) == [r["step"] for r in metrics] == [1, 2]
    for r in metrics:
        for k, v in _numbers(r).items():
            got = history[r["step"]][k]
            _assert_same(float("nan") if got == "NaN" else float(got), v)
