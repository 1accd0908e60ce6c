"""Train an mcVAE on parametric designs: `python train_mcvae.py --cfg_name mcvae_biked`."""
import sys

from modules.errors import cli_entry
from modules.registry import MCVAE_SPEC
from modules.training import train_main


@cli_entry
def main(argv=None):
    return train_main(argv, MCVAE_SPEC)


if __name__ == "__main__":
    sys.exit(main())
