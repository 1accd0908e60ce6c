"""Train a conv-mcVAE on images: `python train_conv_mcvae.py --cfg_name conv_mcvae_biked_small`."""
import sys

from modules.errors import cli_entry
from modules.registry import CONV_MCVAE_SPEC
from modules.training import train_main


@cli_entry
def main(argv=None):
    return train_main(argv, CONV_MCVAE_SPEC)


if __name__ == "__main__":
    sys.exit(main())
