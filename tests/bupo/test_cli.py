"""bupo.cli: which exceptions are user errors (one line, exit code 1) and which keep their traceback, Ctrl-C, the
error file of ranks under torchrun and the torchrun wrapper, check_out_dir. The entry points' own errors, end to end:
test_cli_errors.py."""

import json
import tomllib

import jinja2
import pyarrow as pa
import pytest

from bupo import cli


def _raiser(exc: BaseException):
    def fn():
        raise exc
    return fn


def _caught(fn) -> BaseException:
    """The exception `fn()` raises (a real one, with the library's own message)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def _bad_safetensors(tmp_path):
    from safetensors import safe_open

    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return _caught(lambda: safe_open(tmp_path / "w.safetensors", framework="pt"))


USER_ERRORS = {
    "value": (lambda tmp: ValueError("data.batch_size=3: bad\n  second line"), "data.batch_size=3: bad second line"),
    "file_not_found": (lambda tmp: _caught(lambda: open(tmp / "nope.jsonl")), "nope.jsonl: No such file"),
    "file_exists": (lambda tmp: _caught(lambda: (tmp / "f").mkdir() or (tmp / "f").mkdir()), "f: File exists"),
    "is_a_directory": (lambda tmp: _caught(lambda: open(tmp)), "Is a directory"),
    "not_a_directory": (lambda tmp: _caught(lambda: (tmp / "x").write_text("") or open(tmp / "x" / "y")),
                        "Not a directory"),
    "permission": (lambda tmp: PermissionError(13, "Permission denied", "/root/x"), "/root/x: Permission denied"),
    "json": (lambda tmp: _caught(lambda: json.loads("{")), "JSONDecodeError"),
    "toml": (lambda tmp: _caught(lambda: tomllib.loads("a = ")), "TOMLDecodeError"),
    "unicode": (lambda tmp: _caught(lambda: b"\xff".decode()), "codec can't decode"),
    "jinja_syntax": (lambda tmp: _caught(lambda: jinja2.Environment().from_string("{% if %}")),
                     "TemplateSyntaxError"),
    "jinja_undefined": (lambda tmp: _caught(lambda: jinja2.Environment(undefined=jinja2.StrictUndefined)
                                            .from_string("{{ x }}").render()), "UndefinedError"),
    "safetensors": (_bad_safetensors, "SafetensorError"),
    "arrow": (lambda tmp: pa.lib.ArrowInvalid("bad parquet footer"), "ArrowInvalid: bad parquet footer"),
    "arrow_type": (lambda tmp: pa.lib.ArrowTypeError("bad type"), "ArrowTypeError: bad type"),
    "import": (lambda tmp: ModuleNotFoundError("No module named 'vllm'"), "No module named 'vllm'"),
}


@pytest.mark.parametrize("kind", sorted(USER_ERRORS))
def test_user_errors_become_one_line(tmp_path, monkeypatch, kind):
    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    make, needle = USER_ERRORS[kind]
    with pytest.raises(SystemExit) as e:
        cli.run_main(_raiser(make(tmp_path)))
    line = str(e.value)
    assert line.startswith("error: ") and "\n" not in line and needle in line, line


@pytest.mark.parametrize("exc", [AssertionError("invariant"), RuntimeError("CUDA error"), KeyError("k"),
                                 TypeError("unsupported operand"), ZeroDivisionError("division by zero")],
                         ids=lambda e: type(e).__name__)
def test_bugs_keep_their_traceback(monkeypatch, exc):
    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    with pytest.raises(type(exc)):
        cli.run_main(_raiser(exc))


def test_traceback_on_request_and_return_value(monkeypatch):
    assert cli.run_main(lambda a, b: a + b, 2, 3) == 5
    monkeypatch.setenv("BUPO_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad"):
        cli.run_main(_raiser(ValueError("bad")))


def test_ctrl_c_is_one_line_with_exit_code_130(monkeypatch, capsys):
    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run_main(_raiser(KeyboardInterrupt()))
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_ranks_under_torchrun_write_the_error_file_and_rank_0_prints(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with pytest.raises(SystemExit) as e:
        cli.run_main(_raiser(ValueError("data.train_files: bad")))
    assert e.value.code == 1 and capsys.readouterr().err == ""  # torchrun's launcher reports it
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(tmp_path / "error.json"))
    assert failure.message["message"] == "data.train_files: bad"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="^error: data.train_files: bad$"):
        cli.run_main(_raiser(ValueError("data.train_files: bad")))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # another launcher: the rank says who it is
    with pytest.raises(SystemExit, match="^error: rank 3: data.train_files: bad$"):
        cli.run_main(_raiser(ValueError("data.train_files: bad")))


@pytest.mark.parametrize("exitcode, write, line, code", [
    (1, True, "error: rank 1: --data.train_files=x: bad", 1),
    (1, False, "error: rank 1 failed with exit code 1; its traceback is above", 1),
    (-9, False, "error: rank 1 was killed by SIGKILL before it could write an error line", 137),
])
def test_torchrun_wrapper_ends_on_the_failed_rank(tmp_path, monkeypatch, capsys, exitcode, write, line, code):
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    error_file = tmp_path / "error.json"
    if write:
        cli._write_error_file(str(error_file), "--data.train_files=x: bad")

    def fail(args):
        assert args.nproc_per_node == "2" and args.training_script == "bupo.train"
        failure = ProcessFailure(local_rank=1, pid=123, exitcode=exitcode, error_file=str(error_file))
        raise ChildFailedError("bupo.train", {1: failure})

    monkeypatch.setattr(tdr, "run", fail)
    with pytest.raises(SystemExit) as e:
        cli.torchrun(["--nproc-per-node=2", "-m", "bupo.train"])
    if code == 1:  # the interpreter prints the SystemExit message and exits with 1
        assert e.value.code == line
    else:
        assert e.value.code == code and capsys.readouterr().err == line + "\n"


def test_torchrun_wrapper_ctrl_c_is_one_line(monkeypatch, capsys):
    import signal

    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException

    monkeypatch.delenv("BUPO_TRACEBACK", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def interrupted(args):
        raise SignalException("Process 1 got signal: 2", sigval=signal.SIGINT)

    monkeypatch.setattr(tdr, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.torchrun(["--nproc-per-node=2", "-m", "bupo.train"])
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted by SIGINT; the ranks were stopped\n"


def test_check_out_dir(tmp_path):
    cli.check_out_dir(tmp_path / "new" / "run", "--out")
    cli.check_out_dir(tmp_path, "--out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--out=.*f' is a file"):
        cli.check_out_dir(tmp_path / "f", "--out")
    with pytest.raises(ValueError, match=r"trainer\.out_dir=.*cannot be created: .*f is a file"):
        cli.check_out_dir(tmp_path / "f" / "a" / "b", "trainer.out_dir")
