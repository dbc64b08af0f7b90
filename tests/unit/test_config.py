"""Config composition, typing and validation (in-process: no workers)."""

from __future__ import annotations

import pytest

from k2repro.config.load import compose_dict, config_hash, flatten, load_config
from k2repro.errors import ConfigError

BAD = [
    (["optim.lr=-0.1"], "optim.lr"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["parallel.nproc=0"], "parallel.nproc"),
    (["train.nonexistent_key=3"], "train.nonexistent_key"),
    (["model=no_such_model"], "model"),
    (["train.seq_len=100000"], "train.seq_len"),
    (["train.precision=fp8"], "train.precision"),
    (["guard.action=explode"], "guard.action"),
    (["optim.beta2=1.5"], "optim.beta2"),
    (["train.max_steps=0"], "train.max_steps"),
    (["faults.kill_phase=lunch"], "faults.kill_phase"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["parallel.backend=mpi"], "parallel.backend"),
    (["train.stop_at_step=500", "train.max_steps=50"], "train.stop_at_step"),
    (["audit.flush_every=0"], "audit.flush_every"),
    (["model.n_heads=5"], "model.d_model"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_value_names_key_in_one_line(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    msg = str(info.value)
    assert key in msg, msg
    assert "\n" not in msg


def test_default_and_pipeline_compose() -> None:
    cfg = load_config([])
    assert cfg.model.name == "tiny" and cfg.faults.bad_batch_steps == []
    pipe = load_config([], "pipeline")
    assert pipe.faults.bad_batch_steps, "the demo pipeline injects a known bad batch"
    assert load_config(["faults=none"], "pipeline").faults.bad_batch_steps == []


def test_faults_keys_overridable_after_none() -> None:
    cfg = load_config(["faults=none", "faults.nan_step=7", "faults.lr_spike_steps=[3,4]"])
    assert cfg.faults.nan_step == 7 and cfg.faults.lr_spike_steps == [3, 4]


def test_tags_are_free_form() -> None:
    cfg = load_config(["+run.tags.team=pretrain", "+run.tags.ticket=42"])
    assert cfg.run.tags == {"team": "pretrain", "ticket": 42}


def test_flatten_covers_every_leaf_and_hash_ignores_names() -> None:
    d = compose_dict([])
    flat = flatten(d)
    assert "optim.lr" in flat and "model.n_layers" in flat and "faults.bad_batch_steps" in flat
    a, b = load_config([]), load_config(["run.name=other"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(["optim.lr=0.001"]))


def test_params_yaml_matches_hydra_composition() -> None:
    """params.yaml (what DVC reads) must equal what Hydra composes from conf/pipeline.yaml."""
    import yaml

    from tests.conftest import REPO

    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == compose_dict([], "pipeline")
