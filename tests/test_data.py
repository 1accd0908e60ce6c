import numpy as np
import pandas as pd
import pytest
import torch

from modules.config import ConditionSpec, DataConfig, SplitConfig
from modules.data import MinMaxScaler, ParametricDataModule, TensorBatches, read_table, split_rows
from modules.errors import UserError
from modules.mcvae import MCVAERunConfig
from modules.training import common_parser, load_run_config


def biked_cfg(csv_path):
    cfg, _ = load_run_config(common_parser("t").parse_args(["--cfg_name", "mcvae_biked", "--csv_path", str(csv_path)]),
                             MCVAERunConfig)
    return cfg


def test_split_is_seeded_sized_and_covers_every_category(biked_frame, tmp_path):
    cfg = biked_cfg("unused").data
    a = split_rows(biked_frame, cfg, SplitConfig(0.8, 0.1, 0.1, seed=0))
    b = split_rows(biked_frame, cfg, SplitConfig(0.8, 0.1, 0.1, seed=0))
    c = split_rows(biked_frame, cfg, SplitConfig(0.8, 0.1, 0.1, seed=1))
    assert (a == b).all() and (a != c).any()
    counts = pd.Series(a).value_counts()
    assert abs(counts["train"] - 0.8 * len(biked_frame)) <= 30 and abs(counts["val"] - 0.1 * len(biked_frame)) <= 2
    train = biked_frame[a == "train"]
    for spec in cfg.conditions:
        if spec.kind == "categorical":  # even FAT bikes (a handful) appear in training
            assert set(biked_frame[spec.name].dropna().astype(str)) <= set(train[spec.name].dropna().astype(str))


def test_rare_category_lands_in_training_whatever_the_seed():
    frame = pd.DataFrame({"x": np.arange(50.0), "c": ["common"] * 49 + ["rare"]})
    cfg = DataConfig(csv_path="-", design_columns=["x"], conditions=[ConditionSpec("c", "categorical")])
    for seed in range(10):
        assignment = split_rows(frame, cfg, SplitConfig(0.5, 0.25, 0.25, seed=seed))
        assert assignment[49] == "train"


def test_bad_split_fractions():
    frame = pd.DataFrame({"x": [1.0, 2.0], "c": ["a", "b"]})
    cfg = DataConfig(csv_path="-", design_columns=["x"], conditions=[ConditionSpec("c", "categorical")])
    with pytest.raises(UserError, match="sum to 1"):
        split_rows(frame, cfg, SplitConfig(0.8, 0.3, 0.1))


def test_datamodule_tensors_and_normalisation(biked_slice):
    cfg = biked_cfg(biked_slice)
    dm = ParametricDataModule(cfg.data, batch_size=64, seed=0)
    design, cat, num = dm.tensors["train"]
    assert design.shape[1] == 26 and cat.shape[1] == 7 and num.shape[1] == 1
    assert design.min() == 0.0 and design.max() == 1.0  # training statistics
    assert torch.all(cat <= torch.tensor(dm.schema.mask_tokens()))
    # denormalising returns the original values
    original = dm.part("train")[cfg.data.design_columns].to_numpy()
    assert np.allclose(dm.scaler.inverse(design).to_numpy(), original, atol=1e-3)
    split = dm.split_frame()
    assert list(split.columns) == ["row", "Bike index", "split"] and len(split) == 400


def test_missing_condition_values_become_masked(biked_slice, tmp_path):
    frame = pd.read_csv(biked_slice)
    frame.loc[3, "BikeStyle"] = np.nan
    frame.loc[4, "Teeth on chainring"] = np.nan
    path = tmp_path / "gaps.csv"
    frame.to_csv(path, index=False)
    dm = ParametricDataModule(biked_cfg(path).data, batch_size=64, seed=0)
    cat, num = dm.schema.encode(frame.iloc[[3, 4]])
    assert cat[0, 0] == dm.schema.mask_tokens()[0]
    assert torch.isnan(num[1, 0])


def test_tensor_batches_cover_rows_and_depend_on_epoch_only():
    x = torch.arange(10.0).unsqueeze(1)
    epoch = {"e": 0}
    loader = TensorBatches((x,), batch_size=4, shuffle=True, seed=3, epoch_fn=lambda: epoch["e"])
    first = torch.cat([b[0] for b in loader]).flatten()
    again = torch.cat([b[0] for b in loader]).flatten()
    epoch["e"] = 1
    second = torch.cat([b[0] for b in loader]).flatten()
    assert len(loader) == 3 and sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert [b[0].shape[0] for b in loader] == [4, 4, 2]


def test_missing_file_and_columns(tmp_path, biked_slice):
    cfg = biked_cfg(biked_slice).data
    with pytest.raises(UserError, match=r"data file .*nope.csv does not exist.*--csv_path"):
        read_table(tmp_path / "nope.csv", cfg)
    frame = pd.read_csv(biked_slice).rename(columns={"x_BB": "x_bb"})
    path = tmp_path / "renamed.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"column 'x_BB' \(did you mean 'x_bb'\?\)"):
        read_table(path, cfg)


@pytest.mark.parametrize("value,shown", [("abc", "'abc'"), ("inf", "inf")])
def test_non_numeric_or_non_finite_design_values(tmp_path, biked_slice, value, shown):
    frame = pd.read_csv(biked_slice).astype({"y_BB": object})
    frame.loc[7, "y_BB"] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        read_table(path, biked_cfg(path).data)
    message = str(err.value)
    assert "design column 'y_BB'" in message and "row 9" in message and shown in message


def test_scaler_error_weights():
    scaler = MinMaxScaler(["a", "b"], [0, 0], [1, 2], dataset_minimum=[0, 0], dataset_maximum=[2, 2])
    assert torch.allclose(scaler.error_weights("dataset"), torch.tensor([0.25, 1.0]))
    assert torch.equal(scaler.error_weights("train"), torch.ones(2))
    restored = MinMaxScaler.from_state(scaler.state_dict())
    assert np.array_equal(restored.dataset_maximum, scaler.dataset_maximum)


def test_train_fraction_shrinks_only_the_training_split(biked_frame):
    cfg = DataConfig(csv_path="x", design_columns=["x"], conditions=[ConditionSpec("BikeStyle", "categorical")])
    full = split_rows(biked_frame, cfg, SplitConfig())
    quarter = split_rows(biked_frame, cfg, SplitConfig(train_fraction=0.25))
    assert ((full == "test") == (quarter == "test")).all() and ((full == "val") == (quarter == "val")).all()
    assert (quarter == "train").sum() == round(0.25 * (full == "train").sum())
    assert set(np.flatnonzero(quarter == "train")) <= set(np.flatnonzero(full == "train"))
    styles = biked_frame["BikeStyle"].astype(str)
    assert set(styles[quarter == "train"]) == set(styles)  # every category still in training


def test_duplicate_ids_are_refused_with_their_rows(tmp_path, biked_frame):
    frame = biked_frame.head(30).copy()
    frame.loc[7, "Bike index"] = frame.loc[3, "Bike index"]
    path = tmp_path / "dup.csv"
    frame.to_csv(path, index=False)
    cfg = DataConfig(csv_path=str(path), design_columns=["Wheel diameter rear"], id_column="Bike index",
                     conditions=[ConditionSpec("BikeStyle", "categorical")])
    with pytest.raises(UserError, match=r"duplicates .* rows 5, 9"):
        read_table(path, cfg)


def test_empty_file_and_all_missing_condition(tmp_path, biked_frame):
    cfg = DataConfig(csv_path="x", design_columns=["Wheel diameter rear"],
                     conditions=[ConditionSpec("BikeStyle", "categorical")])
    biked_frame.head(0).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(UserError, match="no data rows"):
        read_table(tmp_path / "empty.csv", cfg)
    frame = biked_frame.head(50).copy()
    frame["BikeStyle"] = None
    frame.to_csv(tmp_path / "missing.csv", index=False)
    cfg.csv_path = str(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="'BikeStyle' has no value in the training split"):
        ParametricDataModule(cfg, batch_size=8)
