"""The launch scripts and run configs, checked without a GPU: launch/train.sh's torchrun command line and the
debug config."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_sh_wraps_torchrun(tmp_path):
    """launch/train.sh: GPU count from nvidia-smi -L (or CUDA_VISIBLE_DEVICES), env settings, args passed on."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100\"; done\n")
    (tmp_path / "python").write_text('#!/bin/sh\necho "ARGS $@"\n')  # stands in for the real launch
    for f in ("nvidia-smi", "python"):
        (tmp_path / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    sh = str(ROOT / "launch" / "train.sh")

    def run(*args, **extra):
        return subprocess.run(["bash", sh, *args], env={**env, **extra}, capture_output=True, text=True)

    out = run("--config", "x.toml", "--trainer.total_steps=2").stdout
    # bupo.cli runs torchrun with these options and ends a failed run on the rank's error line
    assert ("ARGS -m bupo.cli --nnodes=1 --nproc-per-node=4 --node-rank=0 --master-addr=127.0.0.1 "
            "--master-port=29500 -m bupo.train --config x.toml --trainer.total_steps=2") in out
    assert "--nproc-per-node=2 " in run(CUDA_VISIBLE_DEVICES="1,3").stdout
    out = run(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000", NPROC_PER_NODE="8").stdout
    assert "--nnodes=2 --nproc-per-node=8 --node-rank=1 --master-addr=10.0.0.1 --master-port=6000" in out
    bad = run(NNODES="2")
    assert bad.returncode == 2 and "MASTER_ADDR" in bad.stderr
    help_ = run("-h")
    assert help_.returncode == 0 and "NNODES" in help_.stdout and "ARGS" not in help_.stdout


def test_debug_1gpu_config_loads():
    from bupo.config import load_config

    cfg = load_config(["--config", str(ROOT / "launch/configs/debug_1gpu.toml")])
    assert cfg.rollout.engine == "vllm" and cfg.model.path == "smollm2" and cfg.trainer.device == "cuda"
    assert cfg.data.train_files == ["arithmetic"] and cfg.trainer.total_steps <= 10
    assert 0 < cfg.bupo.iterative_steps < cfg.trainer.total_steps  # both phases (and both sync kinds) run


def test_seeds_sh_runs_nine_with_the_overrides_and_compares(tmp_path):
    """launch/seeds.sh with python stubbed: the overrides checked once first, the nine runs' command lines, overrides
    (quoting kept) passed to each,
    OUT_ROOT relative to the caller's folder, the final compare, and usage errors."""
    calls = tmp_path / "calls"
    (tmp_path / "python").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {calls}\n')
    (tmp_path / "python").chmod(0o755)
    venv = tmp_path / "venv"  # env.sh takes the active virtualenv; its install stamp goes here, not in a real one
    venv.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("BUPO_VENV", None)
    work = tmp_path / "cwd"
    work.mkdir()
    sh = str(ROOT / "launch" / "seeds.sh")
    r = subprocess.run(["bash", sh, "sweep", "--trainer.total_steps=3", "--data.chat_template={{ 'a b' }}"],
                       env=env, cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    train = [c for c in lines if c.startswith("-m bupo.train")]
    assert len(train) == 9
    check = [c for c in lines if "load_config" in c]  # the overrides are checked once before any run
    assert len(check) == 1 and check[0].endswith("--config launch/configs/cpu_demo.toml --trainer.total_steps=3 "
                                                 "--data.chat_template={{ 'a b' }}")
    assert lines.index(check[0]) < lines.index(train[0])
    root = work / "sweep"
    for name, seed, flags in (("grpo", 2, " --bupo.iterative_steps=0"), ("bupo_norm", 0, " --bupo.norm=true"),
                              ("bupo", 1, "")):
        assert (f"-m bupo.train --config launch/configs/cpu_demo.toml --trainer.seed={seed} "
                f"--trainer.out_dir={root}/{name}_s{seed} --trainer.threads=1{flags} --trainer.total_steps=3 "
                "--data.chat_template={{ 'a b' }}") in train
    assert lines[-1] == (f"-m bupo.evals.compare {root}/grpo_s*/ {root}/bupo_s*/ {root}/bupo_norm_s*/ --window 5 "
                         f"--out {root}/compare")  # no run folder exists under the stub: the globs stay as written
    for args in (["--help"], ["-h"]):
        h = subprocess.run(["bash", sh, *args], env=env, capture_output=True, text=True)
        assert h.returncode == 0 and h.stdout.startswith("The CPU demo's claim over seeds")
    (work / "afile").write_text("")
    for args, words in ((["x", "y"], "y: expected --section.field=value"), (["--bad"], "expected --section.field"),
                        (["x", "--trainer.seed"], "expected --section.field=value"),
                        (["x", "--trainer.seed=7"], "the sweep sets --trainer.seed itself"),
                        (["x", "--trainer.out_dir=/y"], "the sweep sets --trainer.out_dir itself"),
                        (["x", "--bupo.iterative_steps=8"], "the sweep sets --bupo.iterative_steps itself"),
                        ([""], "OUT_ROOT is empty"), (["afile"], f"OUT_ROOT {work / 'afile'} is a file")):
        bad = subprocess.run(["bash", sh, *args], env=env, cwd=work, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and words in bad.stderr, (args, bad.stderr)
    assert not (work / "x").exists() and len(calls.read_text().splitlines()) == len(lines)
