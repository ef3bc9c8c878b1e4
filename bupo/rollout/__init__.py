"""Rollout: sampling responses from the policy.

    interface.py    SamplingParams, the Rollout record, the Engine protocol, the seeding scheme (step_seed)
    builtin.py      the built-in KV-cache sampler on our own modules (CPU, debugging; samples pi^k too)
    vllm_engine.py  vLLM, colocated, one engine per rank
    weight_sync.py  what the trainer sends to an engine after an update, in buckets of full tensors
    engine.py       make_engine: the choice between the two, above both

This package imports nothing itself, so the trainer's modules import the part they need without a circle.
"""
