"""The `bupo` command: one subcommand per entry point, each the same as its `python -m` module.

    bupo train --config launch/configs/cpu_demo.toml    # = python -m bupo.train; under torchrun: -m bupo.train
    bupo passk --model smollm2 --data arithmetic --n 16 --out runs/passk
    bupo bench kernels --help

`bupo SUB ARGS` runs the subcommand's module as `python -m MODULE ARGS` would (runpy), with `bupo SUB` as its
program name in help and error lines; flags, defaults, outputs and exit codes are the module's own.
`bupo gpu-check` runs `launch/gpu_check.sh` of the source checkout the package was installed from.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# name -> (module, one line for `bupo --help`); "bench" has subcommands of its own
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bupo.train", "GRPO / BuPO training (under torchrun: torchrun ... -m bupo.train)"),
    "passk": ("bupo.evals.passk", "avg@n and unbiased pass@k of a model on math sets"),
    "entropy-flow": ("bupo.evals.entropy_flow", "internal-policy entropy flow through the layers (paper Figs. 2-3)"),
    "lens": ("bupo.evals.lens", "what each internal policy pi^l predicts, layer by layer"),
    "compare": ("bupo.evals.compare", "training runs grouped by setting: means and 95% intervals over seeds"),
    "bench": ("", "benchmarks: kernels (log-prob/entropy kernels), step (update step), rollout (samplers)"),
    "gpu-check": ("", "the GPU check: tests, kernel and step benchmarks, an end-to-end run, one report"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("bupo.kernels.bench", "fused log-prob/entropy kernels vs the bare products and other providers"),
    "step": ("bupo.bench.step", "phase-one vs full update step time"),
    "rollout": ("bupo.bench.rollout", "the samplers side by side on the same prompts"),
}
GPU_CHECK = Path(__file__).resolve().parent.parent / "launch" / "gpu_check.sh"


def _listing(title: str, table: dict[str, tuple[str, str]]) -> str:
    width = max(map(len, table)) + 2
    return title + "\n" + "\n".join(f"  {name:<{width}}{line}" for name, (_, line) in table.items())


def usage() -> str:
    return ("usage: bupo COMMAND [ARGS ...]   (bupo COMMAND --help shows each command's options and defaults)\n\n"
            "Bottom-up Policy Optimization (BuPO) and GRPO: training, evaluation, analysis and benchmarks.\n\n"
            + _listing("commands:", COMMANDS) + "\n\n" + _listing("bupo bench KIND:", BENCHES) + "\n")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _run_module(module: str, name: str, args: list[str]) -> int:
    """`python -m module args`, shown as `name`; returns the exit code."""
    from bupo import cli

    cli.COMMAND_NAME = name
    sys.argv = [name, *args]  # runpy puts the module's file in argv[0]; the parsers name `name` (cli.prog)
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # its SystemExit (error line, code) propagates
    return 0


def _gpu_check(args: list[str]) -> int:
    if not GPU_CHECK.is_file():
        return _fail(f"bupo gpu-check runs {GPU_CHECK}, which this installation does not have: run it from a source "
                     "checkout (pip install -e .) or as bash launch/gpu_check.sh")
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}  # the interpreter bupo runs on
    os.execvpe("bash", ["bash", str(GPU_CHECK), *args], env)  # replaces this process; its exit code is the check's


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _fail(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} (see bupo --help)")
    if name == "gpu-check":
        return _gpu_check(rest)
    if name == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(_listing("usage: bupo bench KIND [ARGS ...]; KIND is one of:", BENCHES), file=sys.stdout if rest
                  else sys.stderr)
            return 0 if rest else 2
        if rest[0] not in BENCHES:
            return _fail(f"unknown benchmark {rest[0]!r}; the benchmarks are {', '.join(BENCHES)} (see bupo --help)")
        return _run_module(BENCHES[rest[0]][0], f"bupo bench {rest[0]}", rest[1:])
    return _run_module(COMMANDS[name][0], f"bupo {name}", rest)


if __name__ == "__main__":
    sys.exit(main())
