"""python -m bupo.evals.lens: the chunked lens equals a direct softmax of the hidden states (top tokens, probabilities,
entropy, rank) for raw and normed states on both architectures; the CLI writes lens.json / lens.png and a table."""

import json
import math
import subprocess
import sys

import pytest
import torch

from bupo import models
from bupo.evals import lens as cli
from bupo.tokenizer import Tokenizer

# initializer_range 0.3: peaked distributions, so top-k orders and ranks are well defined
TINY = {
    "qwen3_tied": dict(model_type="qwen3", vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3),
    "llama_untied": dict(model_type="llama", vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3),
    "qwen2_bias": dict(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3),
}
IDS = [3, 17, 42, 8, 96, 0, 5, 61, 23]


def direct(model, layer, norm, T, top, target=None):
    """The spec: materialized logits of one hidden-state set, softmax in fp64."""
    x = torch.tensor([IDS])
    h = model.hidden_states(x, layer=layer, norm=norm)[0]  # [T, H]; layer None: final-normed
    z = (h @ model.unembedding.T).double() / T  # [T, V]
    p = z.softmax(-1)
    target = z.argmax(-1) if target is None else target
    zt = z.gather(-1, target[:, None])
    return {"target": target, "entropy": -(p * p.log()).sum(-1), "top_p": p.topk(top).values,
            "top_ids": p.topk(top).indices, "p_target": p.gather(-1, target[:, None])[:, 0],
            "rank_target": 1 + (z > zt).sum(-1)}


@pytest.mark.parametrize("name", sorted(TINY))
def test_lens_equals_direct_softmax(name):
    model = models.build_model(TINY[name], dtype=torch.float64, seed=1).eval()
    layers = list(range(TINY[name]["num_hidden_layers"]))
    T, top = 0.7, 4
    # chunk 16 does not divide V; batch_rows 7 splits layers and positions across passes
    res = cli.lens(model, IDS, layers, views=("raw", "norm"), top=top, temperature=T, chunk=16, batch_rows=7)
    final = direct(model, None, False, T, top)
    for view in ("raw", "norm"):
        r = res[view]
        assert torch.equal(r["target"], final["target"])
        for i, layer in enumerate([*layers, None]):
            ref = direct(model, layer, view == "norm", T, top, final["target"])
            for key in ("entropy", "top_p", "p_target"):
                torch.testing.assert_close(r[key][i], ref[key], rtol=1e-9, atol=1e-12, msg=f"{view} {layer} {key}")
            for key in ("top_ids", "rank_target"):
                assert torch.equal(r[key][i], ref[key]), (view, layer, key)
    assert (res["raw"]["rank_target"][-1] == 1).all()
    assert not torch.equal(res["raw"]["entropy"][0], res["norm"]["entropy"][0])  # the norm changes the view


def test_lens_fp32_and_vocab_cut():
    model = models.build_model(TINY["qwen3_tied"], seed=2).eval()  # fp32, the CLI default
    res = cli.lens(model, IDS, [0, 3], top=3, vocab_size=90, chunk=32)["raw"]
    h = model.hidden_states(torch.tensor([IDS]), layer=0)[0]
    p = (h @ model.unembedding[:90].T).double().softmax(-1)  # only the tokenizer's 90 real tokens count
    torch.testing.assert_close(res["entropy"][0].double(), -(p * p.log()).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res["top_p"][0].double(), p.topk(3).values, rtol=1e-4, atol=1e-6)
    assert res["top_ids"].max() < 90 and res["target"].max() < 90


def test_parse_layers():
    assert cli.parse_layers("all", 4) == [0, 1, 2, 3]
    assert cli.parse_layers("3, 0-1,1", 4) == [0, 1, 3]
    for bad in ("4", "2-1", "x", "-1", "1-"):
        with pytest.raises(ValueError, match="--layers"):
            cli.parse_layers(bad, 4)


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lens")
    data = cli.main(["--model", str(tiny_chat_model), "--prompt", "What is 7 + 5?", "--max-new-tokens", "4",
                     "--norm", "both", "--layers", "0,2", "--top", "3", "--position", "-2", "--out", str(out)])
    return out, data


def test_cli_writes_json_png_and_table(run, tiny_chat_model, capsys):
    out, data = run
    saved = json.loads((out / "lens.json").read_text())
    assert saved["rows"] == ["0", "2", "final"] and set(saved["views"]) == {"raw", "norm"}
    tok = Tokenizer.from_pretrained(tiny_chat_model)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}])
    prompt = tok.encode(text)
    ids = [t["id"] for t in saved["tokens"]]
    assert ids[: len(prompt)] == prompt and 1 <= len(ids) - len(prompt) <= 4
    assert [t["part"] for t in saved["tokens"]].count("response") == len(ids) - len(prompt)
    assert saved["position"] == len(ids) - 2
    for view in ("raw", "norm"):
        v = saved["views"][view]
        assert len(v["entropy"]) == 3 and all(len(row) == len(ids) for row in v["entropy"])
        assert all(len(cell) == 3 for row in v["top"] for cell in row)
        assert v["rank_final"][-1] == [1] * len(ids)  # the full policy ranks its own prediction first
        assert [c[0]["id"] for c in v["top"][-1]] == [f["id"] for f in saved["final_prediction"]]
        assert all(0 <= e <= math.log(49152) + 1e-4 for row in v["entropy"] for e in row)
    assert (out / "lens.png").read_bytes()[:4] == b"\x89PNG"
    table = cli.table(saved, "norm", saved["position"])
    assert table.count("\n| ") == 4 and "final prediction" in table


def test_cli_raw_prompt_and_prob_colour(tiny_chat_model, tmp_path):
    data = cli.main(["--model", str(tiny_chat_model), "--prompt", "1 + 1 =", "--raw", "--norm", "--color", "prob",
                     "--out", str(tmp_path)])
    tok = Tokenizer.from_pretrained(tiny_chat_model)
    assert [t["id"] for t in data["tokens"]] == tok.encode("1 + 1 =", add_special_tokens=True)
    assert list(data["views"]) == ["norm"] and len(data["rows"]) == 4


@pytest.mark.parametrize("flags,match", [
    (["--layers", "3"], "--layers='3'"), (["--position", "999"], "--position=999"), (["--top", "0"], "--top=0"),
    (["--temperature", "0"], "--temperature=0"),
])
def test_bad_flags_are_value_errors(tiny_chat_model, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        cli.main(["--model", str(tiny_chat_model), "--prompt", "hi", "--out", str(tmp_path), *flags])


def test_cli_error_line_and_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bupo.evals.lens", "--model", str(tmp_path), "--prompt", "hi", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: --model")
    r = subprocess.run([sys.executable, "-m", "bupo.evals.lens", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--norm" in r.stdout and "--max-new-tokens" in r.stdout


def test_p_final_never_exceeds_one_and_agrees_with_the_top_list(run):
    _, data = run
    for v in data["views"].values():
        for r, row in enumerate(v["p_final"]):
            for t, p in enumerate(row):
                assert 0 <= p <= 1
                ids = [c["id"] for c in v["top"][r][t]]
                fin = data["final_prediction"][t]["id"]
                if fin in ids:  # the same number, not two roundings of it
                    assert p == v["top"][r][t][ids.index(fin)]["p"]
                    assert v["rank_final"][r][t] == 1 + sum(c["p"] > p for c in v["top"][r][t])
                else:
                    assert v["rank_final"][r][t] > len(ids) and p <= v["top"][r][t][-1]["p"]


def test_table_escapes_the_cell_separator():
    data = {"rows": ["0", "final"], "tokens": [{"text": "a|b"}], "final_prediction": [{"text": "<|end|>"}],
            "views": {"raw": {"entropy": [[0.5], [0.1]], "p_final": [[0.2], [0.9]], "rank_final": [[2], [1]],
                              "top": [[[{"text": "x|y", "p": 0.7}]], [[{"text": "<|end|>", "p": 0.9}]]]}}}
    rows = cli.table(data, "raw", 0).splitlines()[2:]
    assert all(len(row.replace("\\|", "").split("|")) == 7 for row in rows), rows  # 5 cells between 6 bars


@pytest.mark.parametrize("flags,match", [
    (["--temperature", "inf"], "--temperature=inf: must be a finite number >= 1e-4"),
    (["--sample-temperature", "-1"], "--sample-temperature=-1.0: must be a finite number >= 0"),
    (["--sample-temperature", "nan"], "--sample-temperature=nan"),
    (["--raw", "--system", "be brief"], "--system applies to the chat template, which --raw does not use"),
    (["--raw", "--enable-thinking"], "--enable-thinking/--no-enable-thinking applies to the chat template"),
])
def test_flags_are_checked_before_the_model_loads(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):  # /nonexistent: a check after loading would fail on --model
        cli.main(["--model", "/nonexistent", "--prompt", "hi", "--out", str(tmp_path), *flags])
