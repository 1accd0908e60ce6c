"""mcLDM pieces: masking → embedding → UNet with every condition masked, drop-all statistics, EMA, the latent
cache, gradient accumulation and the sampling settings."""
import pandas as pd
import pytest
import torch

from modules.conditioning import ConditionMasking, ConditionSchema
from modules.config import ConditionSpec, to_dict
from modules.diffusion_components.first_stage import TINY_AUTOENCODER_CONFIG, FirstStage, FirstStageConfig
from modules.diffusion_components.unet import UNetConfig
from modules.errors import UserError
from modules.image_data import ImageDataConfig
from modules.mcldm import MCLDM, MCLDMRunConfig

SPECS = [ConditionSpec("style", "categorical"), ConditionSpec("teeth", "numerical")]


def tiny_model(**diffusion) -> MCLDM:
    frame = pd.DataFrame({"style": ["a", "b", "c", "a"], "teeth": [30.0, 40.0, 50.0, 44.0]})
    schema = ConditionSchema.fit(SPECS, frame, source="test")
    cfg = MCLDMRunConfig(model_type="mcldm", data=ImageDataConfig(images_path="x", csv_path="x", id_column="id",
                                                                  conditions=SPECS, image_size=16),
                         first_stage=FirstStageConfig(config=TINY_AUTOENCODER_CONFIG),
                         unet=UNetConfig(start_channels=8, channel_mult=[1, 2], blocks_per_level=1,
                                         attention_levels=[], time_embedding_dim=16, positional_dim=8, dropout=0.0))
    cfg.diffusion.timesteps = 20
    for k, v in diffusion.items():
        setattr(cfg.diffusion, k, v)
    torch.manual_seed(0)
    return MCLDM(config=to_dict(cfg), schema=schema.state_dict(), latent_shape=(4, 8, 8))


def test_all_masked_conditions_reach_the_unet():
    model = tiny_model()
    for p in model.unet.parameters():  # the zero-initialised output layers would hide the condition
        torch.nn.init.normal_(p, std=0.2)
    masked = model.masking.mask_all(3)
    embedded = model.embedding(masked)
    assert embedded.shape == (3, model.embedding.out_dim) and torch.isfinite(embedded).all()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 19])
    out = model.unet(x, t, embedded)
    assert out.shape == x.shape and torch.isfinite(out).all()
    cat, num = torch.tensor([[0], [1], [2]]), torch.tensor([[0.1], [0.5], [0.9]])
    conditioned = model.unet(x, t, model.embedding(model.masking.apply(cat, num, torch.zeros_like(cat, dtype=bool),
                                                                       torch.zeros_like(num, dtype=bool))))
    assert not torch.allclose(out, conditioned)


def test_drop_all_masks_whole_rows_at_its_rate():
    masking = ConditionMasking([3, 5], 2)
    cat, num = torch.zeros(20000, 2, dtype=torch.long), torch.full((20000, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    out = masking(cat, num, 0.0, g, drop_all=0.25)
    all_masked = (out.categorical == torch.tensor([3, 5])).all(1) & out.numerical_mask.all(1)
    none_masked = (out.categorical == 0).all(1) & ~out.numerical_mask.any(1)
    assert (all_masked | none_masked).all()  # p = 0: only whole rows are masked
    assert abs(all_masked.float().mean().item() - 0.25) < 0.015
    assert (cat == 0).all() and (num == 0.5).all()  # inputs untouched
    with pytest.raises(ValueError, match="drop-all"):
        masking(cat, num, 0.0, g, drop_all=1.5)


def test_training_step_updates_the_ema_towards_the_weights():
    model = tiny_model()
    shadow = [p.clone() for p in model.ema.shadow.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(4, 4, 8, 8), torch.tensor([[0], [1], [2], [0]]), torch.tensor([[0.1], [0.2], [0.3], [0.4]]))
    loss = model._step(batch, 0.1, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    optimizer.step()
    model.ema.update(model._averaged_parameters())
    live = list(model.generative_modules().parameters())
    decay = min(0.999, 1 / 10)  # the first update's warm-up decay
    for old, new, p in zip(shadow, model.ema.shadow.parameters(), live):
        torch.testing.assert_close(new, decay * old + (1 - decay) * p.detach())


def test_generation_is_seeded_and_uses_the_sampling_settings():
    model = tiny_model().eval()
    model.attach_first_stage(FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG)))
    model.set_sampling(steps=3, cfg_scale=1.5)
    a = model.sample({"style": "b"}, n=2, seed=4)
    b = model.sample({"style": "b"}, n=2, seed=4)
    assert a.shape == (2, 1, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    with pytest.raises(UserError, match="--steps"):
        model.set_sampling(steps=21)
    model.set_sampling(sampler="ddpm")
    assert model.sampling.steps == 20  # ancestral DDPM runs every step


def test_a_different_first_stage_is_refused():
    model = tiny_model()
    model.hparams["first_stage_fingerprint"] = "0" * 16
    with pytest.raises(UserError, match="not the one this model was trained on"):
        model.attach_first_stage(FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG)))


def test_latent_cache_hit_and_miss(tmp_path, monkeypatch):
    from modules.diffusion_components.latents import cached_latents

    fs = FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG))
    cfg = ImageDataConfig(images_path=str(tmp_path), csv_path="x", id_column="id", conditions=[], image_size=16)
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    calls = []
    original = FirstStage.encode_batched
    monkeypatch.setattr(FirstStage, "encode_batched", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = cached_latents(images, fs, cfg, progress=False)
    assert first.shape == (5, 4, 8, 8) and calls == [1]
    torch.testing.assert_close(cached_latents(images, fs, cfg, progress=False), first)
    assert calls == [1]  # hit
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cached_latents(changed, fs, cfg, progress=False)
    assert calls == [1, 1]  # other pixels: miss
    other = FirstStage.from_config(FirstStageConfig(config={**TINY_AUTOENCODER_CONFIG, "layers_per_block": 2}))
    cached_latents(images, other, cfg, progress=False)
    assert calls == [1, 1, 1]  # another first stage: miss
    assert len(list((tmp_path / ".cache").glob("latents_*.safetensors"))) == 3


def test_accumulation_groups_batches_into_optimizer_steps():
    """With accumulation 2, 3 batches make 2 optimizer steps (the last one alone); the sparsity schedule counts
    these steps."""
    from modules.data import TensorBatches

    batches = TensorBatches((torch.arange(10),), batch_size=4, shuffle=False, accumulate=2)
    assert batches.n_batches == 3 and batches.n_optimizer_steps == 2 and len(batches) == 2
    assert [len(group) for group in batches] == [2, 1]


def test_frechet_distance_with_classifier_features_and_the_inception_error():
    from modules.fid import ClassifierFeatures, FrechetDistance, inception_features
    from modules.image_adherence import ConditionClassifier

    frame = pd.DataFrame({"style": ["a", "b"], "teeth": [1.0, 2.0]})
    schema = ConditionSchema.fit(SPECS, frame, source="test")
    torch.manual_seed(0)
    extractor = ClassifierFeatures(ConditionClassifier(1, schema), "minus_one_one")
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 1, 16, 16), generator=g, dtype=torch.uint8)
    fid = FrechetDistance(extractor, real, name="classifier")
    assert abs(fid(real)) < 1e-3  # the same set: distance 0
    darker = (real // 4).to(torch.uint8)
    assert fid(darker) > 0.01
    assert fid(real) == pytest.approx(fid(real), abs=1e-6)  # the real statistics survive the resets
    with pytest.raises(UserError, match="inception"):
        inception_features("/nonexistent.pth", required=True)
    assert inception_features(None, required=False) is None


@pytest.mark.parametrize("name", ["mcldm_biked", "mcldm_dvm", "mcldm_biked_small"])
def test_shipped_configs_validate(name):
    from modules.config import build_dataclass, read_yaml
    from modules.mcldm import check_mcldm_config
    from modules.training import check_common
    from tests.conftest import ROOT

    path = ROOT / "configs" / f"{name}.yaml"
    cfg = build_dataclass(MCLDMRunConfig, read_yaml(path), source=str(path))
    check_common(cfg, str(path))
    check_mcldm_config(cfg, str(path))
    if name == "mcldm_dvm":  # the paper's 14 DVM-Car conditions: 4 categorical, 10 numerical
        kinds = [c.kind for c in cfg.data.conditions]
        assert kinds.count("categorical") == 4 and kinds.count("numerical") == 10
    if name == "mcldm_biked":
        assert (cfg.trainer.batch_size, cfg.trainer.accumulate_grad_batches) == (32, 2)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.first_stage.pretrained == "stabilityai/stable-diffusion-2-1"


def test_config_errors_name_the_key(tmp_path):
    from modules.config import build_dataclass, read_yaml
    from modules.mcldm import check_mcldm_config
    from tests.conftest import write_config

    for section, values, key in [("diffusion", {"sampling_steps": 5000}, "diffusion.sampling_steps"),
                                 ("unet", {"attention_levels": [7]}, "unet.attention_levels"),
                                 ("data", {"value_range": "zero_one"}, "data.value_range")]:
        path = write_config(tmp_path, "mcldm_biked_small", **{section: values})
        cfg = build_dataclass(MCLDMRunConfig, read_yaml(path), source=str(path))
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            check_mcldm_config(cfg, str(path))


# ---------------------------------------------------------------------------------------------- wiring of the loop
# Each test below guards one connection that, broken by hand, left the suite green before (issue 11).


def _fit(model: MCLDM, steps: int, n: int = 8):
    """`steps` optimizer steps of the real Lightning loop (the model's own training_step) on random latents."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 3, (n, 1), generator=g),
                         torch.rand(n, 1, generator=g))
    loader = DataLoader(data, batch_size=4, collate_fn=lambda rows: tuple(torch.stack(x) for x in zip(*rows)))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader)


def test_the_training_loop_moves_the_ema_after_every_optimizer_step():
    model = tiny_model()
    before = [p.clone() for p in model.ema.shadow.parameters()]
    _fit(model, steps=3)
    assert model.global_step == 3 and int(model.ema.updates) == 3
    moved = [not torch.equal(a, b) for a, b in zip(before, model.ema.shadow.parameters())]
    assert sum(moved) > len(moved) // 2
    live = list(model.generative_modules().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(live, model.ema.shadow.parameters()))  # an average, not a copy


class _Spy:
    """Records the condition embeddings a UNet is called with."""

    def __init__(self, module: torch.nn.Module):
        self.conditions: list[torch.Tensor] = []
        self.calls = 0
        module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.calls += 1
        self.conditions.append(args[2].detach().clone())


def _sampling_model(cfg_scale: float, steps: int = 4) -> MCLDM:
    model = tiny_model().eval()
    with torch.no_grad():  # live and EMA weights differ, and neither predicts ε = 0
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model.ema.shadow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_sampling(steps=steps, cfg_scale=cfg_scale)
    return model


def test_sampling_uses_the_ema_weights_not_the_live_ones():
    model = _sampling_model(cfg_scale=0.0)
    live, averaged = _Spy(model.unet), _Spy(model.ema.shadow["unet"])
    conditions, _ = model.conditions_from({"style": "b"}, 3)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.generate_latents(conditions, z)
    assert live.calls == 0 and averaged.calls == 4
    # the same run with the EMA copy swapped for the live weights gives something else
    model.ema.shadow["unet"].load_state_dict(model.unet.state_dict())
    model.ema.shadow["embedding"].load_state_dict(model.embedding.state_dict())
    assert not torch.allclose(out, model.generate_latents(conditions, z), atol=1e-4)
    torch.testing.assert_close(out, _sampling_model(cfg_scale=0.0).generate_latents(conditions, z))  # seeded


def test_guidance_contrasts_with_all_conditions_masked_and_conditions_stay_fixed():
    model = _sampling_model(cfg_scale=2.0, steps=5)
    spy = _Spy(model.ema.shadow["unet"])
    conditions, _ = model.conditions_from(pd.DataFrame({"style": ["b", "c", None], "teeth": [None, 41.0, 35.0]}), 1)
    model.generate_latents(conditions, generator=torch.Generator().manual_seed(1))
    assert spy.calls == 5  # one doubled batch per step
    embed = model.ema.shadow["embedding"]
    conditional = embed(conditions)
    unconditional = embed(model.masking.mask_all(3))
    for c in spy.conditions:  # the same conditions and masks at every denoising step
        assert c.shape == (6, model.embedding.out_dim)
        torch.testing.assert_close(c[:3], conditional)
        torch.testing.assert_close(c[3:], unconditional)
    assert not torch.allclose(conditional, unconditional)
    # the masks given are the masks used: the masked teeth of row 0 and style of row 2 stay masked
    assert conditions.numerical_mask[0, 0] and conditions.categorical[2, 0] == model.masking.mask_tokens[0]


def test_training_masks_every_condition_for_drop_all_conditions_of_the_examples():
    model = tiny_model(drop_all_conditions=0.3)
    seen = []
    model.embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    n = 4000
    batch = (torch.randn(n, 4, 8, 8), torch.zeros(n, 1, dtype=torch.long), torch.full((n, 1), 0.5))
    model._step(batch, 0.0, torch.Generator().manual_seed(0))  # sparsity 0: only the drop-all masks rows
    (masked,) = seen
    tokens = model.masking.mask_tokens
    all_masked = (masked.categorical == tokens).all(1) & masked.numerical_mask.all(1)
    assert abs(all_masked.float().mean().item() - 0.3) < 0.03
    assert not ((masked.categorical == tokens).any(1) & ~all_masked).any()


@pytest.mark.parametrize("name", ["mcldm_biked", "mcldm_biked_small", "mcldm_dvm"])
def test_shipped_configs_learn_the_unconditional_branch(name):
    from modules.config import build_dataclass, read_yaml

    cfg = build_dataclass(MCLDMRunConfig, read_yaml(f"configs/{name}.yaml"), source=name)
    assert cfg.diffusion.drop_all_conditions >= 0.05


def test_decode_undoes_the_scaling_of_encode():
    fs = FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG, scaling_factor=0.25))
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    latents = fs.encode(images)
    raw = fs.autoencoder.encode(images.expand(-1, fs.in_channels, -1, -1)).latent_dist.mode()
    torch.testing.assert_close(latents, raw * 0.25)
    decoded = fs.decode(latents, 1)
    expected = fs.autoencoder.decode(raw).sample.clamp(-1, 1).mean(1, keepdim=True)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


def test_checkpoints_from_before_the_layout_key_build_the_per_block_unet():
    from modules.diffusion_components.unet import McUNet, PerBlockAttentionUNet
    from modules.mcldm import upgrade_checkpoint_config

    model = tiny_model()
    assert isinstance(model.unet, McUNet)
    config = to_dict(model.cfg)
    del config["unet"]["layout"], config["unet"]["norm_groups"]
    old = MCLDM(config=upgrade_checkpoint_config(config), schema=model.schema.state_dict(), latent_shape=(4, 8, 8))
    assert isinstance(old.unet, PerBlockAttentionUNet) and old.cfg.unet.norm_groups == 8


def test_every_sampler_and_bf16_sampling_run_through_generate():
    import argparse

    from modules.diffusion_components.diffusion import SAMPLERS
    from modules.sampling_cli import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "sampler")
    assert list(choices) == list(SAMPLERS)  # the CLI offers what the registry has
    model = _sampling_model(cfg_scale=1.0, steps=6)
    conditions, _ = model.conditions_from({"style": "a"}, 2)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name in SAMPLERS:
        model.set_sampling(sampler=name, steps=6)
        outputs[name] = model.generate_latents(conditions, z, torch.Generator().manual_seed(1))
        assert outputs[name].shape == z.shape and torch.isfinite(outputs[name]).all()
    assert not torch.allclose(outputs["ddim"], outputs["dpm_solver"])
    model.set_sampling(sampler="ddim", precision="bf16")
    bf16 = model.generate_latents(conditions, z)
    assert not torch.equal(bf16, outputs["ddim"])
    torch.testing.assert_close(bf16, outputs["ddim"], atol=0.1, rtol=0.1)
    with pytest.raises(UserError, match="--sampler 'heun'"):
        model.set_sampling(sampler="heun")
    with pytest.raises(UserError, match="--sampling_precision"):
        model.set_sampling(precision="16")
