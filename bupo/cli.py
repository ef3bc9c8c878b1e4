"""How a command ends: a user error is one `error: ...` line and exit code 1; a bug keeps its traceback.

    if __name__ == "__main__":
        run_main(main)                                   # every entry point (bupo.train calls it inside main)
    python -m bupo.cli [torchrun options] -m bupo.train ...   # torchrun whose failure ends on the rank's error line

User errors are what bad input raises: ValueError (json, TOML, Unicode and most pyarrow errors are ValueErrors),
OSError (a file or folder missing, existing, of the wrong kind or unreadable), ImportError (an optional package not
installed), FloatingPointError (the trainer stopping after optim.max_nonfinite_steps non-finite steps in a row),
jinja2's TemplateError, safetensors' SafetensorError, pyarrow's ArrowException, and Ctrl-C (exit 130).
The loaders turn the failures they can foresee into ValueErrors naming the flag, file, row or field; the other
types are listed here so an unforeseen one still ends in one line. Anything else (AssertionError, RuntimeError,
TypeError, KeyError, ...) is a bug and keeps its traceback. BUPO_TRACEBACK=1 keeps the traceback of every error.

Under torchrun (RANK set): rank 0 prints the line; every rank writes it to torchrun's error file
(TORCHELASTIC_ERROR_FILE), from which `python -m bupo.cli` (what launch/train.sh runs) prints the first failed
rank's line last, in place of torchrun's ChildFailedError report. A rank > 0 without an error file prints the line
prefixed with its rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")
# The name a command was started by: "bupo passk" when the `bupo` command runs it (bupo.__main__ sets it), None
# under `python -m <module>`. Usage lines and error hints use it (`prog`).
COMMAND_NAME: str | None = None
# (module, exception base) of the file-format libraries; a library that was never imported raised nothing.
_LIBRARY_ERRORS = (("jinja2", "TemplateError"), ("safetensors", "SafetensorError"), ("pyarrow", "ArrowException"))


def prog(module: str) -> str:
    """The program name an entry point's help and errors show: `bupo <sub>` when started by the `bupo` command,
    else `python -m <module>`."""
    return COMMAND_NAME or f"python -m {module}"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that end a command in one line (evaluated when an error is caught)."""
    found = [ValueError, OSError, ImportError, FloatingPointError]
    for module, name in _LIBRARY_ERRORS:
        if module in sys.modules and hasattr(sys.modules[module], name):
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def describe(e: BaseException) -> str:
    """One line for a user error: an OSError as '<file>: <reason>', a library's error prefixed with its type."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}" + (f" (and {e.filename2})" if e.filename2 is not None else "")
    else:
        text = str(e) or type(e).__name__
        if type(e).__module__ != "builtins":  # JSONDecodeError, TemplateSyntaxError, SafetensorError, ...
            text = f"{type(e).__name__}: {text}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _traceback_wanted() -> bool:
    return os.environ.get("BUPO_TRACEBACK", "") not in ("", "0")


def _write_error_file(path: str, message: str) -> None:
    # The layout torch.distributed.elastic's ErrorHandler writes; torchrun reads "message" back into its report.
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                           "timestamp": str(int(time.time()))}}}
    with open(path, "w") as f:
        json.dump(data, f)


def fail(message: str, code: int = 1) -> NoReturn:
    """End the process with `error: <message>` (once per torchrun job, see the module docstring)."""
    rank, error_file = os.environ.get("RANK", "0"), os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        _write_error_file(error_file, message)
    if rank != "0":
        if error_file:
            raise SystemExit(code)  # the launcher prints it from the error file
        message = f"rank {rank}: {message}"
    if code == 1:
        raise SystemExit(f"error: {message}")  # printed to stderr by the interpreter; exit code 1
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the entry points' conventions: a usage error is one `error: ...` line naming the flag (exit
    code 2, argparse's), and --help shows each option's default."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", code=2)

    def format_help(self) -> str:
        for action in self._actions:  # an option without help text still shows its default
            if action.help is None and action.option_strings and _shows_default(action):
                action.help = "(default: %(default)s)"
        return super().format_help()


def _shows_default(action: argparse.Action) -> bool:
    return action.default is not None and action.default is not False and action.default != argparse.SUPPRESS


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = _shows_default(action) and "default" not in text and action.option_strings
        return f"{text} (default: %(default)s)" if shown else text


def _warning_line(message, category, filename, lineno, line=None) -> str:
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"warning: {kind}{message}\n"


def check_flag(flag: str, value: object, ok: bool, rule: str) -> None:
    """ValueError '<flag>=<value>: must be <rule>' unless ok: each bad flag is named alone, before any work."""
    if not ok:
        raise ValueError(f"{flag}={value}: must be {rule}")


def check_context(limit: int, prompt_tokens: int, new_tokens: int, *, prompt: str, new: str, model: str) -> None:
    """The context check of every entry point that samples or scores, made before any work: prompt_tokens +
    new_tokens (a prompt and its response, the longest sequence sampled or fed) must fit in the model's
    `limit` = max_position_embeddings of its config.json (RoPE never saw later positions; vLLM refuses a
    max_model_len beyond it). ValueError naming both settings (`prompt`, `new`: the flags or fields), their values,
    the model and its limit."""
    if prompt_tokens + new_tokens > limit:
        raise ValueError(f"{prompt}={prompt_tokens} + {new}={new_tokens} = {prompt_tokens + new_tokens} tokens exceed "
                         f"the context of {model}: max_position_embeddings={limit} (config.json); lower {prompt} or "
                         f"{new} to a sum <= {limit}")


def prompt_budget(given: int | None, default: int, limit: int, new_tokens: int, *, new: str, model: str) -> int:
    """An eval command's --max-prompt-length: the value given (checked by check_context), or when none is given
    min(default, limit - new_tokens), the longest prompt that leaves room for new_tokens in the model's context."""
    if given is None:
        given = min(default, limit - new_tokens)
        if given < 1:
            raise ValueError(f"{new}={new_tokens} leaves no room for a prompt in the context of {model}: "
                             f"max_position_embeddings={limit} (config.json); lower {new}")
    check_context(limit, given, new_tokens, prompt="--max-prompt-length", new=new, model=model)
    return given


def run_main(main: Callable[..., T], *args: object) -> T:
    """`main(*args)`; a user error becomes one `error: ...` line (SystemExit), a bug propagates. Warnings print as
    one `warning: ...` line each (with their source file and line under BUPO_TRACEBACK=1)."""
    if not _traceback_wanted():
        warnings.formatwarning = _warning_line
    try:
        return main(*args)
    except KeyboardInterrupt:
        if _traceback_wanted():
            raise
        fail("interrupted", code=130)
    except user_errors() as e:
        if _traceback_wanted():
            raise
        fail(describe(e))


def check_out_dir(path: str | os.PathLike, flag: str) -> None:
    """An output folder given as `flag` is a folder or can be made one: not empty (an empty path would be the
    current folder), no file in the way, writable."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; give a folder path (use . for the current folder)")
    want = Path(path)
    existing = next((p for p in (want, *want.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        what = "is a file" if existing == want else f"cannot be created: {existing} is a file"
        raise ValueError(f"{flag}={str(path)!r} {what}, not a folder; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={str(path)!r}: {existing} is not writable")


def torchrun(argv: list[str] | None = None) -> None:
    """torchrun (same options); a failed worker ends the output with its own error line instead of torchrun's
    report: `error: rank R: <message>` from the rank's error file, else its exit code or signal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: torchrun has already stopped the ranks
        if _traceback_wanted():
            raise
        fail(f"interrupted by {e.sigval.name}; the ranks were stopped", code=128 + int(e.sigval))
    except ChildFailedError as e:
        if _traceback_wanted():
            raise
        rank, f = e.get_first_failure()
        if isinstance(f.message, dict) and f.message.get("message"):
            fail(f"rank {rank}: {f.message['message']}", code=f.exitcode if f.exitcode > 0 else 1)
        if f.exitcode < 0:
            fail(f"rank {rank} was killed by {f.signal_name()} before it could write an error line",
                 code=128 - f.exitcode)
        fail(f"rank {rank} failed with exit code {f.exitcode}; its traceback is above", code=f.exitcode)


if __name__ == "__main__":
    torchrun()
