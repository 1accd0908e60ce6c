import pandas as pd
import pytest
import torch

from modules.errors import UserError
from modules.mcvae import kl_divergence
from modules.registry import MCVAE_SPEC
from modules.training import common_parser, load_run_config


@pytest.fixture
def built(biked_slice):
    args = common_parser("t").parse_args(["--cfg_name", "mcvae_biked", "--csv_path", str(biked_slice)])
    cfg, _ = load_run_config(args, MCVAE_SPEC.config_cls)
    torch.manual_seed(0)
    return MCVAE_SPEC.build(cfg)


def test_forward_shapes_and_architecture(built):
    dm, model = built
    design, cat, num = (t[:16] for t in dm.tensors["train"])
    conditions = model.mask(cat, num, 0.2, torch.Generator().manual_seed(0))
    reconstruction, mu, logvar = model(design, conditions, torch.Generator().manual_seed(1))
    assert reconstruction.shape == (16, 26) and mu.shape == logvar.shape == (16, 10)
    assert model.embedding.out_dim == 8 * 5
    assert model.decoder[0][0].in_features == 10 + 40  # decoder input = [z, condition embedding]
    assert model.encoder[0].in_features == 26  # the encoder sees the design only
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [64, 128, 64, 32]


def test_loss_reductions(built):
    _, model = built
    x = torch.rand(4, 26)
    x_hat = x + 0.1
    mu, logvar = torch.full((4, 10), 0.5), torch.zeros(4, 10)
    kl = 0.5 * 0.25 * 10  # per design: -0.5·Σ(1 + 0 - 0.25 - 1)
    assert torch.allclose(kl_divergence(mu, logvar), torch.full((4,), kl))
    expected_rec = {"sse": 4 * 26 * 0.01, "sse_per_design": 26 * 0.01, "mse": 0.01}
    for mode, rec in expected_rec.items():
        model.cfg.model.reconstruction = mode
        out = model.loss(x, x_hat, mu, logvar)
        assert out["reconstruction"].item() == pytest.approx(rec, rel=1e-5)
        assert out["kl"].item() == pytest.approx(kl)
        assert out["loss"].item() == pytest.approx(0.3 * rec + 0.7 * kl, rel=1e-5)


def test_training_step_is_a_function_of_seed_and_step(built):
    dm, model = built
    batch = tuple(t[:32] for t in dm.tensors["train"])
    a = model._step(batch, 0.5, model.step_generator(0))["loss"]
    b = model._step(batch, 0.5, model.step_generator(0))["loss"]
    c = model._step(batch, 0.5, model.step_generator(1))["loss"]
    assert a.item() == b.item() and a.item() != c.item()


def test_sample_api(built):
    dm, model = built
    designs = model.sample({"BikeStyle": "ROAD", "Teeth on chainring": 48}, n=5, seed=0)
    assert list(designs.columns) == dm.scaler.columns + ["BikeStyle", "Teeth on chainring"]
    assert len(designs) == 5
    same = model.sample({"BikeStyle": "ROAD", "Teeth on chainring": 48}, n=5, seed=0)
    pd.testing.assert_frame_equal(designs, same)
    assert len(model.sample(None, n=2, seed=0)) == 2  # unconditional
    with pytest.raises(UserError, match="no category 'CARGO-X'"):
        model.sample({"BikeStyle": "CARGO-X"}, n=1)
    with pytest.raises(UserError, match="unknown condition 'wheels'"):
        model.sample({"wheels": 2}, n=1)


def test_all_masked_conditions_give_the_unconditional_decoder_input(built):
    _, model = built
    model.eval()
    z = torch.randn(3, 10)
    all_masked = model.generate(model.masking.mask_all(3), z=z)
    via_api, _ = model.conditions_from({}, 3)
    assert torch.equal(model.generate(via_api, z=z), all_masked)


def test_ema_tracks_the_generative_path(biked_slice):
    args = common_parser("t").parse_args(["--cfg_name", "mcvae_biked", "--csv_path", str(biked_slice)])
    cfg, _ = load_run_config(args, MCVAE_SPEC.config_cls)
    cfg.model.ema_decay = 0.5
    _, model = MCVAE_SPEC.build(cfg)
    live = model.decoder[1].weight
    before = model.ema.shadow["decoder"][1].weight.clone()
    with torch.no_grad():
        live.add_(1.0)
    assert model.ema.current_decay() == pytest.approx(0.1)  # warm-up: (1 + 0) / (10 + 0)
    model.ema.update(model.generative_modules().parameters())
    assert torch.allclose(model.ema.shadow["decoder"][1].weight, before + 0.9)
    for _ in range(100):
        model.ema.update(model.generative_modules().parameters())
    assert model.ema.current_decay() == 0.5 and int(model.ema.updates) == 101
    assert not model.ema.shadow["decoder"][1].weight.requires_grad
    assert any(k.startswith("ema.shadow.decoder") for k in model.state_dict())  # saved in checkpoints
