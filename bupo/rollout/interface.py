"""The rollout interface both engines implement and the trainer consumes: what to sample (`SamplingParams`), the
record of one sample (`Rollout`), the `Engine` protocol, and the project's one seeding scheme.

Seeding (training rollouts, validation, the auto internal layer, pass@k): a generate call gets `SamplingParams.seed =
step_seed(run seed, purpose, step)` and `seed_index` = the global index of each of its prompts; sample j of the
prompt with global index i draws from `sequence_seed(that seed, i, j)` (`SamplingParams.sample_seed`), in both
engines. The purposes: "train" (index = position in the step's global batch), "val/<set>" and "passk/<dataset>"
(index = the problem's row in the set; pass@k uses step 0), "auto". So which uniforms a sample draws depends on
(seed, purpose, step, index, j) only: not on the number of ranks, the batching or the order of runs. Its tokens are
then a function of those uniforms and the logits, which are equal across batch compositions only up to float
rounding (see bupo.rollout.builtin).

`Rollout` is the one record of a sample: the engines return it, the trainer adds its training signals (advantage,
old and reference log-probs, the zero-variance filter) and `bupo.update` packs and trains on it; the entropy-flow
analysis and the layer diagnostics pack it the same way (`bupo.update.pack`, `bupo.update.split_micro_batches`).
"""

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy: argmax, top_p/top_k ignored, logprobs of the raw T=1 distribution
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p; 1 = off
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) = off. Applied before top_p, as in vLLM
    max_new_tokens: int = 256  # a response that reaches it without a stop id is truncated (finished=False)
    seed: int = 0  # with (prompt index, sample index) seeds each sequence's own generator
    stop_token_ids: tuple[int, ...] = ()  # EOS / end-of-turn ids; the stop id ends the response and is kept in it
    layer: int | None = None  # None = full policy; k = internal policy softmax(h_k E^T / T) (0-based layer)
    norm: bool = False  # with layer=k: apply the final norm to h_k first (paper ablation)
    # per prompt of the generate call, the index that seeds its samples; empty: the prompt's position in the call.
    # The trainer passes each prompt's position in the global batch, so a prompt draws the same uniforms on any
    # number of ranks.
    seed_index: tuple[int, ...] = ()

    def sample_seed(self, prompt: int, sample: int) -> int:
        """The generator seed of sample `sample` of prompt `prompt` (its position in the generate call)."""
        return sequence_seed(self.seed, self.seed_index[prompt] if self.seed_index else prompt, sample)

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or a positive count, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def check_prompts(self, num_prompts: int) -> None:
        self.validate()
        if self.seed_index and len(self.seed_index) != num_prompts:
            raise ValueError(f"SamplingParams.seed_index has {len(self.seed_index)} entries for {num_prompts} prompts")


@dataclass
class Rollout:
    """One sampled response and what training attaches to it. The engines fill the first six fields; the trainer
    sets advantage, old_logp, ref_logp and active before the update. Log-prob tensors are fp32, one per response
    token."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with the stop id when finished
    # the sampler's log-prob of each response token under the distribution it was drawn from (None: not reported)
    logprobs: list[float] | torch.Tensor | None = None
    finished: bool = True  # True: ended on a stop id; False: hit max_new_tokens (truncated)
    prompt_index: int = 0  # index into the `prompts` list given to generate
    sample_index: int = 0  # 0..n-1
    advantage: float = 0.0  # broadcast over the response tokens
    old_logp: torch.Tensor | None = None  # under the policy being optimized, before the update (None: = new, detached)
    ref_logp: torch.Tensor | None = None  # under the reference policy (algo.kl_coef > 0)
    active: bool = True  # False: left out of the loss and the token count (zero-variance group filter)

    def __len__(self) -> int:
        """Packed length: prompt + response tokens."""
        return len(self.prompt_ids) + len(self.response_ids)


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs from a sampler (the built-in engine here, vLLM in bupo.rollout.vllm_engine)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """len(prompts) * params.n samples, prompt-major: prompt 0's n samples first, then prompt 1's, ..."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors by HF checkpoint name; a subset of the weights is fine."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (weights may be dropped; update_weights follows)."""
        ...

    def wake_up(self) -> None:
        """Undo sleep before the next generate."""
        ...


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit generator seed for one sequence: splitmix64 over the three numbers, so neighbouring prompts or
    samples get unrelated streams."""
    x = 0
    for part in (seed, prompt_index, sample_index):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def step_seed(seed: int, purpose: str, step: int) -> int:
    """The SamplingParams.seed of one generate call of a run: the run seed, what is sampled (`"train"`,
    `"val/<set>"`, `"auto"`, `"passk/<dataset>"`) and the step, hashed together. With sequence_seed this is the one
    seeding scheme of the project (module docstring): sample j of the prompt with global index i draws from
    sequence_seed(step_seed(seed, purpose, step), i, j), whatever the number of ranks and batches."""
    return sequence_seed(seed, zlib.crc32(purpose.encode()), step) & 0x7FFFFFFF
