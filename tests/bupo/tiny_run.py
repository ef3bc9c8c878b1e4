"""A tiny trainer run for the tests: the model folder, the arguments of a short run on it, and the metrics that vary
from run to run (timings), which comparisons leave out."""

import shutil
from pathlib import Path

from bupo import models

TINY_LLAMA = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True}
TIMING = {"time_rollout", "time_reward", "time_logprob", "time_update", "time_sync", "time_step", "tokens_per_s",
          "peak_mem_gb"}


def tiny_model_folder(d: Path, **config) -> Path:
    """TINY_LLAMA (with `config` overrides) saved as an HF folder in `d`, with SmolLM2's tokenizer files."""
    models.save_pretrained(models.build_model({**TINY_LLAMA, **config}, seed=0), d)
    for f in models.smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, d / f.name)
    return d


def train_args(model: Path, out: Path, steps: int, **extra) -> list[str]:
    """`--section.field=value` arguments of a short run: arithmetic, 2 prompts x 2 samples, 6 new tokens, phase one
    at k=1 for 2 steps, a checkpoint every 2 steps, fp32 (the exactness tests's dtype; bf16 runs pass model.dtype)."""
    base = {"model.path": model, "model.dtype": "float32", "trainer.out_dir": out, "trainer.total_steps": steps,
            "trainer.seed": 3, "trainer.save_every": 2, "data.train_files": "arithmetic", "data.arithmetic_size": 64,
            "data.batch_size": 2, "algo.ppo_mini_batch_size": 1, "rollout.n": 2, "rollout.max_new_tokens": 6,
            "bupo.internal_layer": 1, "bupo.iterative_steps": 2, "optim.lr": 1e-3, "trainer.plot": "false",
            "trainer.threads": 1}
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]
