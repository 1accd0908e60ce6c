"""Train an mcLDM (latent diffusion with masked conditions): `python train_mcldm.py --cfg_name mcldm_biked_small`."""
import sys

from modules.errors import cli_entry
from modules.registry import MCLDM_SPEC
from modules.training import train_main


@cli_entry
def main(argv=None):
    return train_main(argv, MCLDM_SPEC)


if __name__ == "__main__":
    sys.exit(main())
