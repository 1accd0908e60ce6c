"""Command-line flags shared by sample.py and evaluate.py (cheap to import: heavy modules load on use)."""


def add_sampling_arguments(parser) -> None:
    """The sampling flags of sample.py and evaluate.py: the VAEs' temperature and the diffusion sampler's."""
    parser.add_argument_group("VAEs (mcVAE, conv-mcVAE)").add_argument(
        "--temperature", type=float,
        help="sampling temperature τ, z = μ_p(c) + τ·σ_p(c)·ε (default: the config's model.temperature; < 1: more "
             "typical, less varied designs; 0: one design per set of conditions)")
    g = parser.add_argument_group("diffusion models (mcLDM)")
    g.add_argument("--sampler", choices=["ddim", "ddpm", "dpm_solver", "unipc", "euler"],
                   help="default: the config's diffusion.sampler; dpm_solver (DPM-Solver++) and unipc need 10–20 steps")
    g.add_argument("--steps", type=int, help="denoising steps (default: diffusion.sampling_steps; ddpm: all)")
    g.add_argument("--sampling_precision", choices=["32", "bf16"],
                   help="UNet precision while sampling (default: the config's sampling.precision); bf16 on GPUs")
    g.add_argument("--eta", type=float, help="DDIM η: 0 deterministic … 1 DDPM-like")
    g.add_argument("--cfg_scale", type=float, help="classifier-free guidance w: ε = (1+w)·ε_cond − w·ε_uncond")


def apply_sampling_arguments(model, args) -> None:
    """Pass the sampling flags to the model; refuse the flags that do not apply to it."""
    from modules.errors import UserError

    temperature = getattr(args, "temperature", None)
    if temperature is not None:
        if not hasattr(model.cfg.model, "temperature"):
            raise UserError(f"--temperature applies to VAE checkpoints (mcVAE, conv-mcVAE); this one holds a "
                            f"'{model.model_type}' model.")
        if temperature < 0:
            raise UserError(f"--temperature must be ≥ 0, got {temperature}.")
        model.cfg.model.temperature = temperature
    names = ("sampler", "steps", "eta", "cfg_scale", "sampling_precision")
    given = {k: getattr(args, k, None) for k in names if getattr(args, k, None) is not None}
    if not given:
        return
    from modules.mcldm import MCLDM

    if not isinstance(model, MCLDM):
        raise UserError(f"--{next(iter(given))} applies to diffusion models (mcLDM) only; this checkpoint holds a "
                        f"'{model.model_type}' model.")
    if "sampling_precision" in given:
        given["precision"] = given.pop("sampling_precision")
    model.set_sampling(**given)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")


def model_device(name: str):
    """torch.device of --device, with a clear error for a GPU that is not there."""
    import torch

    from modules.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu.")
    return device
