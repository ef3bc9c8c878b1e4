"""Every user error of every entry point ends in one `error: ...` line naming the field, file or row, exit code 1;
torchrun failures end on the rank's line. How bupo.cli sorts and prints errors itself: test_cli.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bupo import cli
from bupo.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]


def _copy(model: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(model, d)
    return d


def _parquet(path: Path, prompts: list) -> Path:
    pq.write_table(pa.table({"prompt": prompts, "reward_model": [{"ground_truth": "4"}] * len(prompts)}), path)
    return path


def _one_line(message: str) -> str:
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# --- the trainer: one case per kind of user error; each returns (extra args, words the line must hold)

def out_dir_is_a_file(model, tmp):
    (tmp / "f").write_text("x")
    return [f"--trainer.out_dir={tmp / 'f'}"], ["trainer.out_dir", str(tmp / "f"), "is a file"]


def out_dir_below_a_file(model, tmp):
    (tmp / "f").write_text("x")
    return [f"--trainer.out_dir={tmp / 'f' / 'run'}"], ["trainer.out_dir", "is a file"]


def template_syntax_error(model, tmp):
    return ["--data.chat_template={% if %}"], ["data.chat_template", "line 1"]


def template_unknown_filter(model, tmp):
    return ["--data.chat_template={{ messages | no_such_filter }}"], ["data.chat_template", "no_such_filter"]


def template_fails_on_a_row(model, tmp):
    return ["--data.chat_template={{ raise_exception('no system turns') }}"], ["row 0", "no system turns"]


def truncated_safetensors(model, tmp):
    d = _copy(model, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [f"--model.path={d}"], [str(d / "model.safetensors"), "truncated"]


def empty_safetensors(model, tmp):
    d = _copy(model, tmp)
    (d / "model.safetensors").write_bytes(b"")
    return [f"--model.path={d}"], [str(d / "model.safetensors")]


def index_lists_a_missing_shard(model, tmp):
    d = _copy(model, tmp)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [f"--model.path={d}"], ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]


def tokenizer_json_not_json(model, tmp):
    d = _copy(model, tmp)
    (d / "tokenizer.json").write_text('{"version": "1.0", ')
    return [f"--model.path={d}"], [str(d / "tokenizer.json")]


def tokenizer_config_not_json(model, tmp):
    d = _copy(model, tmp)
    (d / "tokenizer_config.json").write_text("{'eos_token': '<|im_end|>'}")
    return [f"--model.path={d}"], [str(d / "tokenizer_config.json"), "JSON"]


def config_json_not_json(model, tmp):
    d = _copy(model, tmp)
    (d / "config.json").write_text('{"model_type": "llama",')
    return [f"--model.path={d}"], [str(d / "config.json"), "JSON"]


def config_json_wrong_type(model, tmp):
    d = _copy(model, tmp)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": "four"}))
    return [f"--model.path={d}"], [str(d / "config.json")]


def prompt_column_of_ints(model, tmp):
    f = _parquet(tmp / "ints.parquet", [7, 8])
    return [f"--data.train_files={f}"], [str(f), "row 0", "prompt", "int"]


def prompt_column_of_floats(model, tmp):
    f = _parquet(tmp / "floats.parquet", [1.5])
    return [f"--data.train_files={f}"], [str(f), "row 0", "prompt", "float"]


def not_a_parquet_file(model, tmp):
    (tmp / "data.parquet").write_text("prompt,answer\n2+2,4\n")
    return [f"--data.train_files={tmp / 'data.parquet'}"], [str(tmp / "data.parquet"), "parquet"]


def truncated_parquet(model, tmp):
    f = _parquet(tmp / "cut.parquet", ["What is 2+2?"] * 20)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 12])
    return [f"--data.train_files={f}"], [str(f)]


def toml_syntax_error(model, tmp):
    (tmp / "run.toml").write_text("[trainer]\ntotal_steps = \n")
    return ["--config", str(tmp / "run.toml")], [str(tmp / "run.toml"), "TOML"]


def toml_list_of_numbers(model, tmp):
    (tmp / "run.toml").write_text("[data]\ntrain_files = [1, 2]\n")
    return ["--config", str(tmp / "run.toml")], ["data.train_files", str(tmp / "run.toml")]


def unbalanced_list_override(model, tmp):
    return ["--data.train_files=[arithmetic"], ["--data.train_files", "[arithmetic"]


def missing_dataset(model, tmp):
    return ["--data.train_files=arithmetic,missing.parquet"], ["missing.parquet"]


def out_dir_empty(model, tmp):  # an empty path is the current folder: it would write the run there
    return ["--trainer.out_dir="], ["trainer.out_dir is empty"]


def unknown_dataset(model, tmp):
    return ["--data.train_files=nosuchset"], ["data.train_files", "nosuchset", "arithmetic", "math500"]


def unknown_val_dataset(model, tmp):
    return ["--data.val_files=nosuchset", "--trainer.val_every=1"], ["data.val_files", "nosuchset"]


TRAINER_CASES = [out_dir_empty, unknown_dataset, unknown_val_dataset, out_dir_is_a_file, out_dir_below_a_file,
                 template_syntax_error, template_unknown_filter,
                 template_fails_on_a_row, truncated_safetensors, empty_safetensors, index_lists_a_missing_shard,
                 tokenizer_json_not_json, tokenizer_config_not_json, config_json_not_json, config_json_wrong_type,
                 prompt_column_of_ints, prompt_column_of_floats, not_a_parquet_file, truncated_parquet,
                 toml_syntax_error, toml_list_of_numbers, unbalanced_list_override, missing_dataset]


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda c: c.__name__)
def test_trainer_user_errors_are_one_line_naming_the_culprit(tiny_model, tmp_path, case):
    extra, needles = case(tiny_model, tmp_path)
    base = [f"--model.path={tiny_model}", f"--trainer.out_dir={tmp_path / 'out'}", "--trainer.device=cpu",
            "--data.train_files=arithmetic", "--data.arithmetic_size=4", "--data.batch_size=2",
            "--algo.ppo_mini_batch_size=2", "--rollout.n=2", "--bupo.internal_layer=1", "--bupo.iterative_steps=0",
            "--trainer.total_steps=1", "--trainer.export=false", "--trainer.plot=false",
            "--rollout.max_new_tokens=8"]  # within the tiny model's context (checked first otherwise)
    with pytest.raises(SystemExit) as e:
        train_main(base + extra)
    line = _one_line(str(e.value))
    for needle in needles:
        assert needle in line, (needle, line)


# --- every entry point, as a process: the last stderr line is the error, exit code 1, no traceback

def _run(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("BUPO_TRACEBACK", "RANK", "TORCHELASTIC_ERROR_FILE")}
    # the launchers run `python` and `torchrun` from PATH: this interpreter's, also when its venv is not activated
    full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")])
    return subprocess.run(args, cwd=ROOT, env={**full, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, needles: list[str]) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)


def test_train_module_ends_in_one_line_and_traceback_on_request(tiny_model, tmp_path):
    (tmp_path / "f").write_text("x")
    args = [sys.executable, "-m", "bupo.train", f"--model.path={tiny_model}", f"--trainer.out_dir={tmp_path / 'f'}"]
    _assert_one_line_error(_run(args), ["trainer.out_dir"])
    shown = _run(args, env={"BUPO_TRACEBACK": "1"})
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "ValueError: trainer.out_dir" in shown.stderr


ENTRY_POINT_CASES = {  # module and arguments ({model}, {tmp} filled in), words the error line must hold
    "entropy_flow-samples": (["bupo.evals.entropy_flow", "--model", "{model}", "--samples", "{tmp}/missing.jsonl",
                              "--out", "{tmp}/ef"], ["--samples", "missing.jsonl"]),
    "entropy_flow-device": (["bupo.evals.entropy_flow", "--model", "{model}", "--data", "arithmetic", "--out",
                             "{tmp}/ef", "--device", "cuda:99"], ["--device", "cuda:99"]),
    "entropy_flow-out": (["bupo.evals.entropy_flow", "--model", "{model}", "--data", "arithmetic", "--out",
                          "{tmp}/ints.parquet"], ["--out", "is a file"]),
    "passk-prompt-ints": (["bupo.evals.passk", "--model", "{model}", "--data", "{tmp}/ints.parquet", "--out",
                           "{tmp}/pk", "--engine", "builtin"], ["ints.parquet", "row 0", "prompt"]),
    "passk-template-missing": (["bupo.evals.passk", "--model", "{model}", "--data", "arithmetic", "--out", "{tmp}/pk",
                                "--chat-template", "{tmp}/none.jinja"], ["--chat-template", "none.jinja"]),
    "passk-template-syntax": (["bupo.evals.passk", "--model", "{model}", "--data", "arithmetic", "--out", "{tmp}/pk",
                               "--chat-template", "{tmp}/bad.jinja"], ["--chat-template", "bad.jinja", "line 1"]),
    "passk-out": (["bupo.evals.passk", "--model", "{model}", "--data", "arithmetic", "--out", "{tmp}/ints.parquet"],
                  ["--out", "is a file"]),
    "passk-model-not-json": (["bupo.evals.passk", "--model", "{tmp}/model", "--data", "arithmetic", "--out",
                              "{tmp}/pk"], ["config.json"]),
    "bench_step": (["bupo.bench.step", "--k", "99"], ["--k=99"]),
    "bench_step-device": (["bupo.bench.step", "--device", "cuda"] if not torch.cuda.is_available() else
                          ["bupo.bench.step", "--repeats", "0"], ["--"]),
    "bench_rollout": (["bupo.bench.rollout", "--n", "0"], ["--n"]),
    "bench_rollout-csv": (["bupo.bench.rollout", "--csv", "{tmp}/ints.parquet/rows.csv"], ["--csv"]),
    "bupo.kernels.bench": (["bupo.kernels.bench", "--tokens", "0"], ["--tokens=0"]),
    "bupo.kernels.bench-csv": (["bupo.kernels.bench", "--csv", "{tmp}/ints.parquet/out.csv"], ["--csv"]),
    "passk-out-empty": (["bupo.evals.passk", "--model", "{model}", "--data", "arithmetic", "--out", ""],
                        ["--out is empty"]),
    "passk-data-unknown": (["bupo.evals.passk", "--model", "{model}", "--data", "nosuchset", "--out", "{tmp}/pk",
                            "--max-new-tokens", "8"], ["--data", "nosuchset", "arithmetic"]),
    "entropy_flow-out-empty": (["bupo.evals.entropy_flow", "--model", "{model}", "--data", "arithmetic", "--out",
                                ""], ["--out is empty"]),
    "compare-out-empty": (["bupo.evals.compare", "{tmp}", "--out", ""], ["--out is empty"]),
}
# One process per entry point checks the `__main__` wiring; the other cases run main() under run_main in-process.
AS_PROCESS = ("entropy_flow-samples", "passk-prompt-ints", "bench_step", "bench_rollout", "bupo.kernels.bench")


def _entry_point_args(tiny_model: Path, tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    _parquet(tmp_path / "ints.parquet", [7])
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    shutil.copytree(tiny_model, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{")
    command, needles = ENTRY_POINT_CASES[case]
    if command[0] == "bupo.evals.passk":  # within the tiny model's context (its default 8192 is checked first)
        command = [*command, "--max-new-tokens", "8"]
    return [a.format(model=tiny_model, tmp=tmp_path) for a in command], needles


@pytest.mark.parametrize("case", AS_PROCESS)
def test_entry_points_end_in_one_line(tiny_model, tmp_path, case):
    args, needles = _entry_point_args(tiny_model, tmp_path, case)
    _assert_one_line_error(_run([sys.executable, "-m", *args]), needles)


@pytest.mark.parametrize("case", sorted(set(ENTRY_POINT_CASES) - set(AS_PROCESS)))
def test_entry_point_mains_end_in_one_line(tiny_model, tmp_path, monkeypatch, case):
    import importlib

    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    args, needles = _entry_point_args(tiny_model, tmp_path, case)
    main = importlib.import_module(args[0]).main
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, args[1:])
    line = _one_line(str(e.value))
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the config's CUDA device exists here")
def test_train_sh_single_process_needs_no_torchrun():
    proc = _run(["bash", "launch/train.sh", "--config", "launch/configs/debug_1gpu.toml"],
                env={"NPROC_PER_NODE": "1", "NNODES": "1"})
    _assert_one_line_error(proc, ["trainer.device='cuda'"])
    assert "torchrun" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_train_sh_several_processes_end_on_the_rank_error(tiny_model, tmp_path):
    import socket

    with socket.socket() as s:  # a free port for torchrun's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "f").write_text("x")
    proc = _run(["bash", "launch/train.sh", f"--model.path={tiny_model}", f"--trainer.out_dir={tmp_path / 'f'}",
                 "--trainer.device=cpu"], env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(port)}, timeout=300)
    _assert_one_line_error(proc, ["rank ", "trainer.out_dir", "is a file"])
    assert "ChildFailedError" not in proc.stderr and "Root Cause" not in proc.stderr


def test_train_sh_checks_its_environment():
    proc = _run(["bash", "launch/train.sh"], env={"NPROC_PER_NODE": "two"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: NPROC_PER_NODE=two")


@pytest.mark.parametrize("module, args, message", [
    ("bupo.evals.passk", ["--temperature", "inf"], "--temperature=inf: must be a finite number >= 0 (0: greedy)"),
    ("bupo.evals.passk", ["--temperature", "nan"], "--temperature=nan: must be a finite number >= 0 (0: greedy)"),
    ("bupo.evals.passk", ["--temperature", "-1"], "--temperature=-1.0: must be a finite number >= 0 (0: greedy)"),
    ("bupo.evals.passk", ["--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
    ("bupo.evals.passk", ["--top-k", "-2"], "--top-k=-2: must be -1 or 0 (off) or a positive count"),
    ("bupo.evals.passk", ["--max-prompts", "-1"], "--max-prompts=-1: must be >= 0 (0: all)"),
    ("bupo.evals.entropy_flow", ["--temperature", "inf"], "--temperature=inf: must be a finite number >= 0"),
    ("bupo.evals.entropy_flow", ["--batch-tokens", "-5"], "--batch-tokens=-5: must be >= 0"),
    ("bupo.evals.entropy_flow", ["--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
    ("bupo.evals.lens", ["--temperature", "1e-37"], "--temperature=1e-37: must be a finite number >= 1e-4"),
    ("bupo.bench.rollout", ["--warmup", "-1"], "--warmup=-1: must be >= 0"),
    ("bupo.bench.rollout", ["--threads", "0"], "--threads=0: must be >= 1"),
])
def test_each_bad_flag_is_named_alone(module, args, message, tmp_path):
    """One flag out of range: the message names that flag only (not every flag of a combined check)."""
    import importlib

    mod = importlib.import_module(module)
    base = {"bupo.evals.passk": ["--model", "m", "--data", "arithmetic", "--out", str(tmp_path)],
            "bupo.evals.entropy_flow": ["--model", "m", "--data", "arithmetic", "--out", str(tmp_path)],
            "bupo.evals.lens": ["--model", "m", "--prompt", "hi", "--out", str(tmp_path)],
            "bupo.bench.rollout": []}[module]
    with pytest.raises(ValueError) as e:
        mod.parse_args(base + args)
    assert str(e.value) == message


def test_gpu_check_errors_are_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    for args, words in ((["env", "--out", str(tmp_path / "f" / "x")], "cannot be created"),
                        (["env", "--out", str(tmp_path / "o"), "--budget", "nan"], "--budget=nan: must be a number")):
        r = subprocess.run([sys.executable, "-m", "bupo.gpu_check", *args], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--shape", "custom", "--tokens", "8"], "--shape custom needs --hidden and --vocab"),
    (["--providers", "naive,bogus"], "--providers: unknown ['bogus']"),
    (["--dtype", "float32,fp8"], "--dtype=float32,fp8: give one of float32,bfloat16,float16 or a comma list"),
])
def test_kernel_bench_usage_errors_are_one_line(args, needle):
    proc = _run([sys.executable, "-m", "bupo.kernels.bench", *args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), proc.stderr
    assert lines[0].endswith("(see python -m bupo.kernels.bench --help)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_bench_rollout_vllm_without_vllm_names_the_flag(tmp_path):
    proc = _run([sys.executable, "-m", "bupo.bench.rollout", "--vllm", "--prompts", "1", "--max-new-tokens", "2"])
    _assert_one_line_error(proc, ["--vllm needs vllm"])
