"""The package as users install it: one import package `bupo` whose parts import each other one way and in no circle,
that lives beside Hugging Face's `kernels` (a dependency of transformers >= 5.25) in one process started from the
repository root, whose wheel holds `bupo/` alone, and whose `bupo` command reaches every entry point."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bupo import __main__ as command

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bupo"


# --- imports ----------------------------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The bupo modules `path` imports (`from bupo import x` names module bupo.x when that is a module)."""
    name, tree = _module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes if/try blocks, not function or class bodies
        nodes = [n for top in nodes for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bupo"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "bupo":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub) else base)
    return found - {name}


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, top_level_only) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_circles():
    graph, state, circles = _graph(top_level_only=True), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert len(graph) > 30 and not circles, circles


def test_dependencies_point_one_way():
    """bupo.models and bupo.kernels import nothing else of ours (lazy imports included); only bupo.evals and the
    `bupo` command import bupo.evals; bupo.models never imports torch.distributed."""
    graph = _graph(top_level_only=False)
    for m, deps in graph.items():
        for part in ("bupo.models", "bupo.kernels"):
            if m.startswith(part):
                assert {d for d in deps if not d.startswith(part) and d != "bupo"} == set(), m
        if not m.startswith("bupo.evals") and m != "bupo.__main__":
            assert not any(d.startswith("bupo.evals") for d in deps), m
    for p in (PACKAGE / "models").glob("*.py"):
        assert "torch.distributed" not in p.read_text(), p


# --- beside Hugging Face's kernels ------------------------------------------------------------------------------------

_BESIDE_HF = """
import sys, tempfile
from pathlib import Path
import torch
import transformers
import kernels as hf_kernels                      # Hugging Face's: the name transformers >= 5.25 imports
from kernels import get_kernel                    # one of the names transformers' hub_kernels imports
from bupo import kernels, models
root = Path(sys.argv[1]).resolve()
assert Path(hf_kernels.__file__).resolve().parent != root / "kernels" and hasattr(hf_kernels, "get_kernel")
assert Path(kernels.__file__).resolve().parent == root / "bupo" / "kernels", kernels.__file__
cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=False)
torch.manual_seed(0)
hf = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 97, (2, 9))
with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours = models.load_pretrained(d, dtype=torch.float32, device="cpu")
with torch.no_grad():
    want = hf(ids).logits
    torch.testing.assert_close(ours(ids), want)
    h = ours.hidden_states(ids, layer=1, norm=True).reshape(-1, 32)
    logp, ent = kernels.linear_logprob_entropy(h, ours.unembedding, ids.reshape(-1))
    ref = want.reshape(-1, 97).log_softmax(-1)
    torch.testing.assert_close(logp, ref.gather(-1, ids.reshape(-1, 1))[:, 0])
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
print("ok", transformers.__version__, getattr(hf_kernels, "__version__", "?"))
"""


def test_hugging_face_kernels_and_transformers_work_beside_bupo_from_the_repository_root():
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is installed with the test extra")
    r = subprocess.run([sys.executable, "-c", _BESIDE_HF, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


# --- the wheel --------------------------------------------------------------------------------------------------------

def test_the_wheel_holds_bupo_alone_and_the_bupo_command(tmp_path):
    setuptools = pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):  # bdist_wheel moved into setuptools
        pytest.skip(f"setuptools {setuptools.__version__} here builds no wheel without the `wheel` package offline")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("bupo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"bupo", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in ("bupo/kernels/linear_logprob_entropy.py", "bupo/models/decoder.py", "bupo/evals/passk.py",
                   "bupo/rollout/engine.py", "bupo/bench/step.py", "bupo/datasets/math500.parquet"):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bupo = bupo.__main__:main" in entry_points


# --- the bupo command -------------------------------------------------------------------------------------------------

SUBCOMMANDS = {"train": "bupo.train", "passk": "bupo.evals.passk", "entropy-flow": "bupo.evals.entropy_flow",
               "lens": "bupo.evals.lens", "compare": "bupo.evals.compare", "bench kernels": "bupo.kernels.bench",
               "bench step": "bupo.bench.step", "bench rollout": "bupo.bench.rollout"}


def test_bupo_help_lists_every_command_with_one_line():
    exe = Path(sys.executable).parent / "bupo"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "bupo"]  # the console script where installed
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("train", "passk", "entropy-flow", "lens", "compare", "bench", "gpu-check", "kernels", "step",
                 "rollout"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in r.stdout.splitlines()), name
    bad = subprocess.run([*argv, "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown command 'nope'; the commands are train, passk, entropy-flow, lens, compare, bench, gpu-check "
        "(see bupo --help)"]
    user_error = subprocess.run([*argv, "compare", "/no/such/run", "--out", "/tmp/x"], capture_output=True,
                                text=True, timeout=120)
    assert user_error.returncode == 1
    assert user_error.stderr.strip().splitlines() == ["error: run folder /no/such/run does not exist"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_shows_its_options_with_defaults(sub, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr("bupo.cli.COMMAND_NAME", None)
    with pytest.raises(SystemExit) as e:
        command.main([*sub.split(), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: bupo {sub} "), out[:300]
    assert "(default:" in out or "default" in out


def test_bench_without_a_kind_and_an_unknown_kind_are_usage_errors(capsys):
    assert command.main(["bench"]) == 2 and "kernels" in capsys.readouterr().err
    assert command.main(["bench", "speed"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown benchmark 'speed'; the benchmarks are kernels, step, "
                                               "rollout (see bupo --help)")


def test_gpu_check_runs_the_launch_script_on_this_interpreter(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bupo", "gpu-check", "--plan"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHON"})
    assert r.returncode == 0, r.stderr
    parts = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert parts[:6] == ["env", "gpu_tests", "kernel_bench", "bench_step", "e2e", "report"]
    assert f"{sys.executable} -m bupo.gpu_check env" in r.stdout
