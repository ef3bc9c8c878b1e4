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


def test_shipped_run_files_parse():
    files = sorted((ROOT / "launch" / "configs").glob("*.toml"))
    assert len(files) >= 10
    for f in files:
        load_config(["--config", str(f)])
