"""Tokenizer wrapper over `tokenizers` that renders the model's own chat template with jinja2.

The template is rendered the way transformers renders it (sandboxed environment, `trim_blocks`, `lstrip_blocks`,
the loop-controls extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, special
tokens passed as variables, `None`-valued message keys dropped), so prompts tokenize to the same ids as
`AutoTokenizer.apply_chat_template` without importing transformers.

Files read from an HF folder: tokenizer.json (required), tokenizer_config.json (required: special tokens, and the
chat template unless a chat_template.jinja file overrides it), generation_config.json (optional: extra EOS ids).

Thinking off (`enable_thinking=False`) gives a prompt whose generation prompt ends with exactly one closed, empty think
block `<think>\n\n</think>\n\n` (Qwen3's no-thinking prompt), never a doubled or an unbalanced one:
- a template with an `enable_thinking` switch renders it itself (the real Qwen3 template);
- a template without one whose generation prompt holds no think block gets the empty block appended;
- a template whose generation prompt already holds a closed block is left as it is;
- a template whose generation prompt opens the block itself and cannot turn thinking off (Qwen3-*-Thinking-2507:
  `<|im_start|>assistant\n<think>\n`) has that open block closed empty, with a warning saying the template cannot
  turn thinking off (such a model was trained to think; its no-thinking answers may be worse). A generation prompt
  that opens the block and writes text in it cannot be closed empty: ValueError.
`think_open` tells whether a rendered prompt leaves a think block open (the response then starts inside it).
"""

from __future__ import annotations

import json
import shutil
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from bupo.models.hf_io import read_json_object

# Appended after the generation prompt when thinking is switched off but the template has no `enable_thinking`.
NO_THINK_SUFFIX = "<think>\n\n</think>\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# End-of-turn / end-of-text tokens of common chat models; those present in the vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>")
# The named special tokens transformers passes to every chat template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Files copied by `save`; generation_config.json only when the target folder has none (the model writes its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _select_template(chat_template: Any, source: Path) -> str | None:
    """The default template of a config entry: a string, or a list of {"name", "template"} dicts."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, dict):
        named = chat_template
    elif isinstance(chat_template, list):
        if not all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in chat_template):
            raise ValueError(f"{source}: chat_template is a list whose entries are not all {{name, template}} objects")
        named = {t["name"]: t["template"] for t in chat_template}
    else:
        raise ValueError(f"{source}: chat_template has unsupported type {type(chat_template).__name__}")
    bad = [name for name, t in named.items() if not isinstance(t, str)]
    if bad:
        kind = type(named[bad[0]]).__name__
        raise ValueError(f"{source}: chat_template {bad[0]!r} is a {kind}, not a template string")
    if "default" in named:
        return named["default"]
    if len(named) == 1:
        return next(iter(named.values()))
    raise ValueError(f"{source}: several chat templates {sorted(named)} and none is named 'default'")


class _Namespace(jinja2.utils.Namespace):
    # As transformers does: no underscore-prefixed names on a namespace (they lead to CPython internals).
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {name!r} starts with '_'")


def _generation_tail(text: str, messages: list[dict]) -> str:
    """What a rendered prompt holds after the last message's content (its end of turn and the generation prompt), so
    a think tag inside a message is never taken for the template's; the whole text when that content is not found."""
    content = messages[-1].get("content") if messages else None
    at = text.rfind(content) if isinstance(content, str) and content else -1
    return text if at < 0 else text[at + len(content):]


def think_open(text: str, messages: list[dict]) -> bool:
    """Whether the rendered prompt `text` of `messages` ends inside a think block its template opened: the last
    `<think>` after the last message has no `</think>` after it (a response to it starts in the reasoning)."""
    tail = _generation_tail(text, messages)
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def _thinking_off(text: str, messages: list[dict], has_switch: bool, what: str) -> str:
    """`text` rendered with enable_thinking=False, with exactly one closed empty think block at its end (module
    docstring)."""
    tail = _generation_tail(text, messages)
    if think_open(text, messages):
        start = len(text) - len(tail) + tail.rfind(THINK_OPEN)
        if text[start + len(THINK_OPEN):].strip():
            raise ValueError(f"{what}: the chat template's generation prompt opens a think block and writes text in "
                             f"it, so thinking cannot be turned off (enable_thinking=False); turn thinking on or "
                             f"give another chat template")
        warnings.warn(f"{what}: the chat template opens a think block in its generation prompt and cannot turn "
                      "thinking off; enable_thinking=False closes that block empty (<think>\\n\\n</think>\\n\\n), "
                      "a prompt this model may not have been trained on")
        return text[:start] + NO_THINK_SUFFIX
    if has_switch or THINK_CLOSE in tail:  # the template wrote the block itself (or needs none from us)
        return text
    return text + NO_THINK_SUFFIX


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


_ENV = _make_env()


def compile_template(source: str, what: str) -> jinja2.Template:
    """Compile a chat template; a syntax error is a ValueError naming `what` (the flag, field or file) and the line."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{what}: chat template syntax error at line {e.lineno}: {e.message}") from None


def _read_tokenizer(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any file it cannot read
        raise ValueError(f"{path}: not a valid tokenizer file ({e})") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict, chat_template: str | None,
                 generation_config: dict | None = None, source: Path | None = None) -> None:
        self._tok = tok
        self.config = config
        self.chat_template = chat_template
        self.source = source
        self._compiled: dict[str, jinja2.Template] = {}
        self.template_origin = "tokenizer"  # where the chat template came from, for errors (from_pretrained: its file)
        self.special_tokens = {n: s for n in SPECIAL_TOKEN_NAMES if (s := _token_str(config.get(n))) is not None}
        for n in SPECIAL_TOKEN_NAMES:  # a wrongly typed entry must not be dropped silently (eos would change)
            if config.get(n) is not None and n not in self.special_tokens:
                raise ValueError(f"{source}: tokenizer_config.json {n} must be a string or {{\"content\": string}}, "
                                 f"got {config[n]!r}")
        raw = (generation_config or {}).get("eos_token_id")
        gen_eos = [] if raw is None else [raw] if isinstance(raw, int) else raw
        if not isinstance(gen_eos, list) or not all(type(i) is int and 0 <= i < tok.get_vocab_size() for i in gen_eos):
            raise ValueError(f"{source}: generation_config.json eos_token_id must be a token id (0 to "
                             f"{tok.get_vocab_size() - 1}) or a list of them, got {raw!r}")
        eos = self.special_tokens.get("eos_token")
        if eos is not None:
            self.eos_token_id = self._require_id(eos, "eos_token")
        elif gen_eos:
            self.eos_token_id = int(gen_eos[0])
        else:
            raise ValueError(f"{source}: no eos_token in tokenizer_config.json and no eos_token_id in "
                             "generation_config.json")
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id = self._require_id(pad, "pad_token") if pad is not None else self.eos_token_id
        stops = [self.eos_token_id, *map(int, gen_eos)]
        stops += [i for t in END_OF_TURN_TOKENS if (i := tok.token_to_id(t)) is not None]
        self.stop_token_ids: list[int] = list(dict.fromkeys(stops))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json) of a folder."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"tokenizer folder {root} does not exist")
        tok_file, cfg_file = root / "tokenizer.json", root / "tokenizer_config.json"
        for f in (tok_file, cfg_file):
            if not f.is_file():
                raise ValueError(f"missing tokenizer file {f}")
        config = read_json_object(cfg_file)
        jinja_file = root / "chat_template.jinja"
        # As in transformers, a chat_template.jinja file takes priority over the config's entry.
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = _select_template(config.get("chat_template"), cfg_file)
        gen_file = root / "generation_config.json"
        gen = read_json_object(gen_file) if gen_file.is_file() else None
        tok = cls(_read_tokenizer(tok_file), config, template, gen, root)
        tok.template_origin = str(jinja_file if jinja_file.is_file() else cfg_file)
        return tok

    def _require_id(self, token: str, name: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        return i

    # --- encode / decode

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(s) for s in seqs], skip_special_tokens=skip_special_tokens)

    # --- chat template

    def _compile(self, template: str, what: str) -> jinja2.Template:
        if template not in self._compiled:
            self._compiled[template] = compile_template(template, what)
        return self._compiled[template]

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, template: str | None = None) -> str:
        """Render `messages` to the prompt string.

        template: a raw jinja string used instead of the model's own (base models without a chat template).
        enable_thinking: passed to the template when not None; False ends the prompt with exactly one closed empty
        think block (Qwen3's no-thinking prompt) whatever the template does (module docstring: appended where the
        template has no switch, an open block closed with a warning where the template cannot turn thinking off).
        """
        source = template if template is not None else self.chat_template
        if source is None:
            raise ValueError(f"tokenizer at {self.source} has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja); pass template=<jinja string>")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys: templates handle a missing key, not a literal None.
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        kwargs: dict[str, Any] = dict(self.special_tokens)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        what = "template argument" if template is not None else self.template_origin
        text = self._compile(source, what).render(messages=msgs, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)
        if enable_thinking is False and add_generation_prompt:
            text = _thinking_off(text, msgs, "enable_thinking" in source, what)
        return text

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer files into `out_dir` (an HF model folder)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.source is None:
            config = dict(self.config)
            if self.chat_template is not None:
                config["chat_template"] = self.chat_template
            self._tok.save(str(out / "tokenizer.json"))
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            return
        if out.resolve() == self.source.resolve():
            return
        for name in TOKENIZER_FILES:
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, out / name)
        gen = self.source / "generation_config.json"
        if gen.is_file() and not (out / "generation_config.json").exists():
            shutil.copyfile(gen, out / "generation_config.json")
