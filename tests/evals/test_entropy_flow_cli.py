"""python -m bupo.evals.entropy_flow on a tiny random model: generate -> samples.jsonl -> entropy_flow.json with the
contract keys and plots; --samples reproduces the same numbers; bad jsonl rows name their line and field."""

import json

import pytest

from bupo.evals import entropy_flow as cli

KEYS = ("layer_in", "layer_out", "attn_in", "attn_out", "ffn_in", "ffn_out", "delta_layer", "delta_attn",
        "delta_ffn")


@pytest.fixture(scope="module")
def generated(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ef")
    cli.main(["--model", str(tiny_chat_model), "--data", "arithmetic", "--num-prompts", "3", "--max-new-tokens", "5",
              "--seed", "1", "--out", str(out)])
    return out


def test_writes_contract_json_and_plots(generated):
    flow = json.loads((generated / "entropy_flow.json").read_text())
    L = flow["num_layers"]
    assert L == 3
    for key in KEYS:
        assert len(flow[key]) == L and all(isinstance(x, float) for x in flow[key])
    assert flow["boundary_layer"] is None or 0 <= flow["boundary_layer"] < L
    assert flow["norm"] is False and "paper layer" in flow["indexing"]
    samples = [json.loads(x) for x in (generated / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and set(samples[0]) == {"prompt_ids", "response_ids"}
    assert flow["num_tokens"] == sum(len(s["response_ids"]) for s in samples)
    for png in ("entropy_flow.png", "entropy_change.png"):
        assert (generated / png).read_bytes()[:4] == b"\x89PNG"


def test_samples_file_reproduces(generated, tiny_chat_model, tmp_path):
    cli.main(["--model", str(tiny_chat_model), "--samples", str(generated / "samples.jsonl"), "--out", str(tmp_path)])
    a = json.loads((generated / "entropy_flow.json").read_text())
    b = json.loads((tmp_path / "entropy_flow.json").read_text())
    for key in KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6)
    cli.main(["--model", str(tiny_chat_model), "--samples", str(generated / "samples.jsonl"), "--out", str(tmp_path),
              "--norm"])
    assert json.loads((tmp_path / "entropy_flow.json").read_text())["norm"] is True


def test_tokenizer_vocab_flag(generated, tiny_chat_model, tmp_path):
    """--tokenizer-vocab: the softmax over the tokenizer's ids (here every row: the tiny model pads nothing)."""
    cli.main(["--model", str(tiny_chat_model), "--samples", str(generated / "samples.jsonl"), "--out", str(tmp_path),
              "--tokenizer-vocab"])
    a = json.loads((generated / "entropy_flow.json").read_text())
    b = json.loads((tmp_path / "entropy_flow.json").read_text())
    assert a["vocab_size"] == b["vocab_size"] == 49152
    for key in KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("line,match", [
    ('{"prompt_ids": [1, 2]}', "line 2: missing field 'response_ids'"),
    ('{"prompt_ids": [1, 2], "response_ids": "3 4"}', "line 2: field 'response_ids' must be a list"),
    ('{"prompt_ids": [1, -2], "response_ids": [3]}', "line 2: field 'prompt_ids' holds -2"),
    ('{"prompt_ids": [1], "response_ids": [999999]}', "line 2: field 'response_ids' holds 999999"),
    ('{"prompt_ids": [], "response_ids": [3]}', "line 2: field 'prompt_ids' is empty"),
    ('{"prompt_ids": [1], "resp', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected an object"),
])
def test_bad_rows_name_line_and_field(tmp_path, line, match):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt_ids": [1, 2], "response_ids": [3]}\n' + line + "\n")
    with pytest.raises(ValueError, match=match.replace("[", r"\[")):
        cli.read_samples(path, vocab_size=1000)
