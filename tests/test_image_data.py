"""Image DataModule: join on ids, resize, value range, the safetensors cache and its invalidation, bad images."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from modules.config import ConditionSpec
from modules.errors import UserError
from modules.image_data import ImageDataConfig, ImageDataModule, from_model_range, to_model_range
from modules.render import render_dataset

CONDITIONS = [ConditionSpec("BikeStyle", "categorical"), ConditionSpec("RIM_STYLE rear", "categorical"),
              ConditionSpec("Teeth on chainring", "numerical")]


@pytest.fixture
def sketches(tmp_path, biked_frame):
    csv = tmp_path / "bikes.csv"
    biked_frame.head(40).to_csv(csv, index=False)
    table = render_dataset(csv, tmp_path / "sketches", size=48, workers=1, progress=False)
    return tmp_path / "sketches", table


def config(folder, table, **overrides):
    return ImageDataConfig(**{"images_path": str(folder), "csv_path": str(table), "id_column": "Bike index",
                              "conditions": CONDITIONS, "image_size": 32, **overrides})


def test_images_joined_resized_and_scaled(sketches):
    folder, table = sketches
    dm = ImageDataModule(config(folder, table), batch_size=8, progress=False)
    images, cat, num = dm.tensors["train"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 32, 32)
    assert sum(len(dm.tensors[s][0]) for s in ("train", "val", "test")) == 40
    first_train = dm.part("train")["Bike index"].iloc[0]
    expected = np.asarray(Image.open(folder / f"{first_train}.png").convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(images[0, 0].numpy(), expected)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[0].dtype == torch.float32 and batch[0].min() >= -1 and batch[0].max() <= 1
    assert torch.equal(from_model_range(to_model_range(images[:2], "minus_one_one"), "minus_one_one"), images[:2])
    zero_one = ImageDataModule(config(folder, table, value_range="zero_one"), batch_size=8, progress=False)
    assert zero_one.on_after_batch_transfer(next(iter(zero_one.train_dataloader())), 0)[0].min() >= 0


def test_cache_is_reused_and_invalidated(sketches):
    folder, table = sketches
    ImageDataModule(config(folder, table), batch_size=8, progress=False)
    caches = list((folder / ".cache").glob("images_*.safetensors"))
    assert len(caches) == 1
    before = caches[0].stat().st_mtime_ns
    ImageDataModule(config(folder, table), batch_size=8, progress=False)  # served from the cache
    assert caches[0].stat().st_mtime_ns == before
    ImageDataModule(config(folder, table, image_size=24), batch_size=8, progress=False)  # another size
    assert len(list((folder / ".cache").glob("images_*.safetensors"))) == 2
    # a changed image is never served stale
    name = pd.read_csv(table)["image"].iloc[0]
    Image.new("L", (48, 48), 0).save(folder / name)
    dm = ImageDataModule(config(folder, table), batch_size=8, progress=False)
    assert len(list((folder / ".cache").glob("images_*.safetensors"))) == 3
    row = int(np.flatnonzero(dm.frame["image"] == name)[0])
    assert dm.images[row].max() == 0


def test_missing_unreadable_and_mixed_images(sketches, caplog):
    folder, table = sketches
    names = pd.read_csv(table)["image"]
    (folder / names.iloc[1]).unlink()
    with pytest.raises(UserError, match=r"1 of 40 rows .* have no readable image .*missing_images: skip"):
        ImageDataModule(config(folder, table), batch_size=8, progress=False)
    dm = ImageDataModule(config(folder, table, missing_images="skip"), batch_size=8, progress=False)
    assert len(dm.frame) == 39 and "skipping 1 rows" in caplog.text
    (folder / names.iloc[2]).write_bytes(b"not a png")
    with pytest.raises(UserError, match="unreadable"):
        ImageDataModule(config(folder, table), batch_size=8, progress=False)
    (folder / names.iloc[2]).unlink()
    Image.new("L", (50, 40), 255).save(folder / names.iloc[3])
    with pytest.raises(UserError, match="mixed sizes"):
        ImageDataModule(config(folder, table, missing_images="skip"), batch_size=8, progress=False)


def test_bad_table(tmp_path, sketches):
    folder, table = sketches
    frame = pd.read_csv(table)
    frame.loc[1, "Bike index"] = frame.loc[0, "Bike index"]
    frame.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(UserError, match="has duplicates"):
        ImageDataModule(config(folder, tmp_path / "dup.csv"), batch_size=8, progress=False)
    with pytest.raises(UserError, match="image folder .* does not exist"):
        ImageDataModule(config(tmp_path / "nowhere", table), batch_size=8, progress=False)
