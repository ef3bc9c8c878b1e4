from pathlib import Path

import pytest

from bupo.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_recipe():
    c = Config()
    assert (c.bupo.internal_layer, c.bupo.iterative_steps) == (5, 30)
    assert (c.optim.lr, c.optim.weight_decay, c.data.batch_size, c.rollout.n) == (1e-6, 0.01, 128, 8)
    assert c.data.batch_size // c.algo.ppo_mini_batch_size == 4


def test_overrides_parse_types(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[trainer]\ntotal_steps = 7\n[data]\ntrain_files = ["arithmetic"]\n[optim]\nlr = 1\n')
    c = load_config(["--config", str(f), "--trainer.total_steps=9", "--bupo.internal_layer", "auto",
                     "--model.activation_checkpointing=true", "--rollout.temperature=0.7",
                     "--bupo.iterative_steps=3", "--data.val_files=amc2023,math500"])
    assert c.trainer.total_steps == 9 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.bupo.internal_layer == "auto" and c.model.activation_checkpointing is True
    assert c.rollout.temperature == 0.7 and c.data.val_files == ["amc2023", "math500"]
    assert c.data.train_files == ["arithmetic"]
    assert load_config(["--bupo.internal_layer=3"]).bupo.internal_layer == 3


@pytest.mark.parametrize("args, field", [
    (["--bupo.iterative_steps=400"], "bupo.iterative_steps"),
    (["--algo.clip_high=-0.1"], "algo.clip_high"),
    (["--rollout.engine=hf"], "rollout.engine"),
    (["--trainer.nope=1"], "trainer.nope"),
    (["--data.batch_size=10", "--algo.ppo_mini_batch_size=4"], "data.batch_size"),
    (["--bupo.internal_layer=last"], "bupo.internal_layer"),
    (["--trainer.total_steps=ten"], "trainer.total_steps"),
])
def test_bad_values_name_the_field(args, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(args)


def test_internal_layer_checked_against_model():
    c = Config()
    c.bupo.internal_layer = 30
    with pytest.raises(ValueError, match=r"bupo\.internal_layer=30.*30 layers"):
        c.validate(num_layers=30)
    c.validate(num_layers=31)


@pytest.mark.parametrize("kw, match", [
    (dict(world_size=3), r"data\.batch_size=128 must be a multiple of the world size 3"),
    (dict(world_size=64), r"algo\.ppo_mini_batch_size=32 must be a multiple of the world size 64"),
    (dict(tokenizer_vocab=101, model_vocab=100), r"model\.path='smollm2': the tokenizer has 101 ids.* only 100"),
])
def test_validate_with_the_world_size_and_the_vocabularies(kw, match):
    with pytest.raises(ValueError, match=match):
        Config().validate(**kw)
    Config().validate(num_layers=36, world_size=8, tokenizer_vocab=151669, model_vocab=151936)


def test_vllm_tensor_parallel_size_divides_the_world_size():
    c = load_config(["--rollout.tensor_parallel_size=2"])
    c.validate(world_size=4)
    with pytest.raises(ValueError, match=r"rollout\.tensor_parallel_size=2 .*divide the world size 1"):
        c.validate(world_size=1)
    c.rollout.engine = "builtin"  # the built-in engine has no tensor parallelism: the field does not apply
    c.validate(world_size=1)


@pytest.mark.parametrize("args, field", [
    (["--rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization"),
    (["--rollout.gpu_memory_utilization=0"], "rollout.gpu_memory_utilization"),
    (["--rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size"),
    (["--rollout.cpu_kvcache_gib=0"], "rollout.cpu_kvcache_gib"),
    (["--algo.tis_cap=-1"], "algo.tis_cap"),
])
def test_engine_and_loss_settings_are_checked_in_the_config(args, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(args)


def test_vllm_on_cpu_is_a_valid_config():
    c = load_config(["--rollout.engine=vllm", "--trainer.device=cpu", "--rollout.cpu_kvcache_gib=2"])
    assert c.rollout.engine == "vllm" and c.rollout.cpu_kvcache_gib == 2


def test_renamed_tis_cap_reads_with_a_warning_naming_the_new_key(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[rollout]\ntis_cap = 2\n")
    with pytest.warns(FutureWarning, match=r"rollout\.tis_cap is deprecated: it is now algo\.tis_cap"):
        c = load_config(["--config", str(f)])
    assert c.algo.tis_cap == 2.0 and "tis_cap" not in c.to_dict()["rollout"] and c.to_dict()["algo"]["tis_cap"] == 2.0
    with pytest.warns(FutureWarning, match=r"algo\.tis_cap"):
        assert load_config(["--rollout.tis_cap=3"]).algo.tis_cap == 3.0
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"--rollout\.tis_cap='x': expected float"):
        load_config(["--rollout.tis_cap=x"])
    assert load_config(["--algo.tis_cap=4"]).algo.tis_cap == 4.0


def test_help_lists_every_field_by_section_with_type_default_and_comment(capsys):
    import dataclasses

    from bupo.config import field_comments

    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    at = 0
    for sec in dataclasses.fields(Config):
        at = text.index(f"[{sec.name}]:", at)  # sections in order, each field after its section's header
        comments = field_comments(sec.default_factory)
        for f in dataclasses.fields(sec.default_factory):
            assert comments[f.name], f"{sec.name}.{f.name} has no comment"
            at = text.index(f"--{sec.name}.{f.name} {str(f.type).replace(' ', '')} ", at)
            assert text.index(" ".join(comments[f.name].split()), at) == at + len(f"--{sec.name}.{f.name} "
                                                                               f"{str(f.type).replace(' ', '')} ")
    assert '(default: ["deepmath-5k"])' in text and "(default: 5)" in text and "rollout.tis_cap -> algo.tis_cap" in text
    assert "the packaged SmolLM2-135M-Instruct" in text and "Qwen3-4B" in text  # the one non-recipe default, said so


def test_shipped_run_files_parse():
    files = sorted((ROOT / "launch" / "configs").glob("*.toml"))
    assert len(files) >= 10
    for f in files:
        load_config(["--config", str(f)])


@pytest.mark.parametrize("text, want", [
    ("arithmetic", ["arithmetic"]),
    ("amc2023,math500", ["amc2023", "math500"]),
    ("amc2023, math500", ["amc2023", "math500"]),
    ("[amc2023,math500]", ["amc2023", "math500"]),
    ('["amc2023", "math500"]', ["amc2023", "math500"]),
    ("['amc2023', 'math500']", ["amc2023", "math500"]),
    ("[arithmetic]", ["arithmetic"]),
    (" [ data/a b.parquet , math500 ] ", ["data/a b.parquet", "math500"]),
    ("[]", []),
])
def test_list_fields_accept_the_usual_spellings(text, want):
    assert load_config([f"--data.val_files={text}"]).data.val_files == want


@pytest.mark.parametrize("text", ["[arithmetic", "arithmetic]", '["arithmetic]', "[[arithmetic]]", "[1, 2]",
                                  '[{"name": "x"}]', "['a', \"b']"])
def test_list_fields_refuse_naming_the_field(text):
    with pytest.raises(ValueError, match=r"--data\.val_files="):
        load_config([f"--data.val_files={text}"])


@pytest.mark.parametrize("value, want", [
    ('"arithmetic"', ["arithmetic"]), ('"amc2023,math500"', ["amc2023", "math500"]),
    ('["arithmetic"]', ["arithmetic"]), ('"[a, b]"', ["a", "b"]),
])
def test_a_string_in_the_run_file_is_a_name_not_letters(tmp_path, value, want):
    f = tmp_path / "run.toml"
    f.write_text(f"[data]\ntrain_files = {value}\n")
    assert load_config(["--config", str(f)]).data.train_files == want


@pytest.mark.parametrize("line, field", [
    ("[data]\ntrain_files = 5", "data.train_files"),
    ("[data]\ntrain_files = [1, 2]", "data.train_files"),
    ("[data]\ntrain_files = [\"a\", [\"b\"]]", "data.train_files"),
    ("[bupo]\ninternal_layer = 2.5", "bupo.internal_layer"),
    ("[bupo]\ninternal_layer = true", "bupo.internal_layer"),
    ("[trainer]\ntotal_steps = true", "trainer.total_steps"),
    ("[trainer]\ntotal_steps = 2.0", "trainer.total_steps"),
    ("[optim]\nlr = \"fast\"", "optim.lr"),
    ("[trainer]\nplot = 1", "trainer.plot"),
])
def test_run_file_values_of_the_wrong_type_name_field_and_file(tmp_path, line, field):
    f = tmp_path / "run.toml"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=rf"{field.replace('.', r'[.]')}=.* in {f}"):
        load_config(["--config", str(f)])


def test_unknown_key_in_the_run_file_names_the_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[data]\ntrain_file = \"arithmetic\"\n")
    with pytest.raises(ValueError, match=rf"unknown config key 'data.train_file' in {f}; fields of \[data\]"):
        load_config(["--config", str(f)])


def test_run_file_int_or_string_field(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[bupo]\ninternal_layer = "3"\n')
    assert load_config(["--config", str(f)]).bupo.internal_layer == 3
    f.write_text('[bupo]\ninternal_layer = "auto"\n')
    assert load_config(["--config", str(f)]).bupo.internal_layer == "auto"


@pytest.mark.parametrize("text", ["[trainer]\ntotal_steps = \n", "[trainer\n", "a = 1\na = 2\n", b"\xff\xfe= 1"])
def test_broken_run_file_names_the_file(tmp_path, text):
    f = tmp_path / "run.toml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=rf"--config {f}: not a valid TOML file"):
        load_config(["--config", str(f)])
    with pytest.raises(ValueError, match="no such file"):
        load_config(["--config", str(tmp_path / "missing.toml")])


def test_out_dir_that_cannot_be_a_folder_is_refused_before_any_model(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"trainer\.out_dir=.* is a file"):
        load_config([f"--trainer.out_dir={tmp_path / 'f'}"])
    with pytest.raises(ValueError, match=r"trainer\.out_dir=.*cannot be created"):
        load_config([f"--trainer.out_dir={tmp_path / 'f' / 'run'}"])
    assert load_config([f"--trainer.out_dir={tmp_path / 'new' / 'run'}"]).trainer.out_dir.endswith("run")


@pytest.mark.parametrize("template", ["{% if %}", "{% for m in messages %}", "{{ messages | no_such_filter }}",
                                      "{{ messages[0 }}"])
def test_chat_template_that_does_not_compile_names_the_field(template):
    with pytest.raises(ValueError, match=r"data\.chat_template: chat template syntax error at line \d"):
        load_config([f"--data.chat_template={template}"])
    assert load_config(["--data.chat_template={{ messages[-1]['content'] }}"]).data.chat_template


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_one_sample_per_prompt_is_refused_for_group_baselines_naming_rollout_n(estimator):
    """rollout.n is the group size of group_advantages: grpo and rloo need 2 samples per prompt (their minimum,
    bupo.loss.MIN_GROUP_SIZE), so n=1 is refused before any model is loaded; reinforce_pp has no group baseline."""
    from bupo.loss import MIN_GROUP_SIZE

    assert MIN_GROUP_SIZE[estimator] == 2
    with pytest.raises(ValueError, match=rf"rollout\.n=1 is invalid for algo\.adv_estimator='{estimator}'"):
        load_config(["--rollout.n=1", f"--algo.adv_estimator={estimator}"])
    load_config(["--rollout.n=2", f"--algo.adv_estimator={estimator}"])
    assert load_config(["--rollout.n=1", "--algo.adv_estimator=reinforce_pp"]).rollout.n == 1


def test_prompt_and_response_lengths_are_checked_against_the_models_context():
    """The issue's example: max_position_embeddings=16 with data.max_prompt_length=16 and rollout.max_new_tokens=16
    is refused naming both fields and the limit; so are the defaults (1024 + 8192) on SmolLM2's 8192 positions."""
    c = load_config(["--data.max_prompt_length=16", "--rollout.max_new_tokens=16"])
    with pytest.raises(ValueError, match=r"data\.max_prompt_length=16 \+ rollout\.max_new_tokens=16 = 32 tokens "
                                         r"exceed the context of model\.path='smollm2': max_position_embeddings=16"):
        c.validate(max_positions=16)
    c.validate(max_positions=32)  # exactly full: prompt + response fit
    with pytest.raises(ValueError, match=r"1024 \+ rollout\.max_new_tokens=8192 = 9216 .*position_embeddings=8192"):
        Config().validate(max_positions=8192)
    Config().validate(max_positions=40960)  # Qwen3-4B
    c = load_config(["--data.max_prompt_length=8", "--rollout.max_new_tokens=8", "--trainer.val_every=1",
                     "--trainer.val_max_new_tokens=9"])
    with pytest.raises(ValueError, match=r"trainer\.val_max_new_tokens=9 = 17 tokens"):
        c.validate(max_positions=16)


def test_the_engines_length_holds_the_longest_response_sampled():
    """The vLLM engine's max_model_len is data.max_prompt_length + train.max_new_tokens(cfg): validation may sample
    longer than training (trainer.val_max_new_tokens), and only while it runs."""
    from bupo.train import max_new_tokens

    base = ["--rollout.max_new_tokens=64"]
    assert max_new_tokens(load_config(base)) == 64
    assert max_new_tokens(load_config([*base, "--trainer.val_every=5", "--trainer.val_max_new_tokens=256"])) == 256
    assert max_new_tokens(load_config([*base, "--trainer.val_every=0", "--trainer.val_max_new_tokens=256"])) == 64
    assert max_new_tokens(load_config([*base, "--trainer.val_every=5", "--trainer.val_max_new_tokens=16"])) == 64
