"""Every eval command that samples or scores checks prompt + new tokens against the model's context
(max_position_embeddings of config.json, 512 for the tiny model) before any work: one error naming the flags and the
limit, and no output folder made."""

import json

import pytest

from bupo.evals import entropy_flow, lens, passk


def test_passk_refuses_a_prompt_limit_and_budget_past_the_context(tiny_chat_model, tmp_path):
    out = tmp_path / "p"
    base = ["--model", str(tiny_chat_model), "--data", "arithmetic", "--n", "2", "--engine", "builtin",
            "--out", str(out)]
    with pytest.raises(ValueError, match=r"--max-prompt-length=16 \+ --max-new-tokens=500 = 516 tokens exceed the "
                                         r"context of --model .*max_position_embeddings=512"):
        passk.main(base + ["--max-prompt-length", "16", "--max-new-tokens", "500"])
    with pytest.raises(ValueError, match=r"--max-new-tokens=600 leaves no room for a prompt .*"
                                         r"max_position_embeddings=512"):
        passk.main(base + ["--max-new-tokens", "600"])  # the default prompt limit: what the context leaves
    assert not out.exists()


def test_passk_default_prompt_limit_is_what_the_context_leaves(tiny_chat_model, tmp_path):
    out = tmp_path / "p"
    passk.main(["--model", str(tiny_chat_model), "--data", "arithmetic", "--arithmetic-size", "1", "--n", "1",
                "--k", "1", "--max-new-tokens", "2", "--engine", "builtin", "--out", str(out)])
    assert json.loads((out / "passk_settings.json").read_text())["max_prompt_length"] == 510  # min(2048, 512 - 2)


def test_entropy_flow_refuses_generation_and_samples_past_the_context(tiny_chat_model, tmp_path):
    out = tmp_path / "ef"
    with pytest.raises(ValueError, match=r"--max-prompt-length=100 \+ --max-new-tokens=413 = 513 tokens exceed .*"
                                         r"max_position_embeddings=512"):
        entropy_flow.main(["--model", str(tiny_chat_model), "--data", "arithmetic", "--max-prompt-length", "100",
                           "--max-new-tokens", "413", "--out", str(out)])
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"prompt_ids": [1] * 10, "response_ids": [2] * 10}) + "\n"
                       + json.dumps({"prompt_ids": [1] * 300, "response_ids": [2] * 213}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl line 2: prompt_ids \+ response_ids = 513 tokens exceed the "
                                         r"model's context, max_position_embeddings=512"):
        entropy_flow.main(["--model", str(tiny_chat_model), "--samples", str(samples), "--out", str(out)])
    assert not out.exists()


def test_lens_refuses_a_prompt_and_response_past_the_context(tiny_chat_model, tmp_path):
    out = tmp_path / "lens"
    with pytest.raises(ValueError, match=r"tokens of --prompt=\d+ \+ --max-new-tokens=510 = \d+ tokens exceed the "
                                         r"context of --model .*max_position_embeddings=512"):
        lens.main(["--model", str(tiny_chat_model), "--prompt", "What is 7 + 5?", "--max-new-tokens", "510",
                   "--out", str(out)])
    with pytest.raises(ValueError, match=r"tokens of --prompt=5\d\d \+ --max-new-tokens=0 = 5\d\d tokens exceed"):
        lens.main(["--model", str(tiny_chat_model), "--prompt", " a" * 599, "--raw", "--out", str(out)])
    assert not out.exists()
