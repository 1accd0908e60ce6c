
import pytest
import yaml

from modules.config import build_dataclass, read_yaml
from modules.errors import UserError
from modules.mcvae import MCVAERunConfig
from modules.training import common_parser, load_run_config
from tests.conftest import ROOT, write_config


def load(path):
    return load_run_config(common_parser("t").parse_args(["--config", str(path)]), MCVAERunConfig)


@pytest.mark.parametrize("name", ["mcvae_biked", "mcvae_biked_paper", "mcvae_cars", "mcvae_cars_paper"])
def test_shipped_configs_load(name):
    cfg, source = load_run_config(common_parser("t").parse_args(["--cfg_name", name]), MCVAERunConfig)
    assert source.endswith(f"{name}.yaml")
    assert cfg.model.hidden_dims == [128, 64, 32] and cfg.model.latent_dim == 10
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.trainer.max_epochs == 500


def test_unknown_key_names_key_and_file(tmp_path):
    path = write_config(tmp_path, "mcvae_biked", model={"latnt_dim": 4})
    with pytest.raises(UserError) as err:
        load(path)
    assert "model.latnt_dim" in str(err.value) and str(path) in str(err.value) and "latent_dim" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = write_config(tmp_path, "mcvae_biked", trainer={"batch_size": "big"})
    with pytest.raises(UserError, match=r"trainer.batch_size' must be int, got 'big'"):
        load(path)


def test_wrong_literal(tmp_path):
    path = write_config(tmp_path, "mcvae_biked", sparsity={"schedule": "sigmoid"})
    with pytest.raises(UserError, match=r"sparsity.schedule' must be 'constant' \| 'step'"):
        load(path)


def test_missing_required_key(tmp_path):
    raw = yaml.safe_load((ROOT / "configs/mcvae_biked.yaml").read_text())
    del raw["data"]["design_columns"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="missing required key 'data.design_columns'"):
        load(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model_type: mcvae\ndata:\n  csv_path: [unclosed\n")
    with pytest.raises(UserError) as err:
        read_yaml(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_sparsity_out_of_range(tmp_path):
    path = write_config(tmp_path, "mcvae_biked", sparsity={"initial": 1.5})
    with pytest.raises(UserError, match=r"sparsity.initial must lie in \[0, 1\]"):
        load(path)


def test_target_epoch_beyond_training(tmp_path):
    path = write_config(tmp_path, "mcvae_biked", sparsity={"target_at": 900})
    with pytest.warns(UserWarning, match="beyond the end of training"):
        load(path)


def test_cli_overrides(tmp_path):
    args = common_parser("t").parse_args(["--cfg_name", "mcvae_biked", "--max_epochs", "3", "--seed", "5",
                                          "--csv_path", "x.csv", "--devices", "1"])
    cfg, _ = load_run_config(args, MCVAERunConfig)
    assert (cfg.trainer.max_epochs, cfg.trainer.seed, cfg.data.csv_path, cfg.trainer.devices) == (3, 5, "x.csv", 1)


def test_unknown_cfg_name_lists_available():
    with pytest.raises(UserError, match="Available: .*mcvae_biked"):
        load_run_config(common_parser("t").parse_args(["--cfg_name", "nope"]), MCVAERunConfig)


def test_build_dataclass_converts_nested():
    cfg = build_dataclass(MCVAERunConfig, {"model_type": "mcvae", "data": {
        "csv_path": "a.csv", "design_columns": ["x"], "conditions": [{"name": "c", "kind": "numerical"}]}},
        source="inline")
    assert cfg.data.conditions[0].kind == "numerical" and cfg.data.split.train == 0.8
