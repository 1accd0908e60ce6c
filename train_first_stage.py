"""Train the mcLDM's first stage (a diffusers AutoencoderKL) on images:
`python train_first_stage.py --cfg_name first_stage_biked_small`; the autoencoder is exported to <run>/first_stage/."""
import sys

from modules.errors import cli_entry
from modules.registry import FIRST_STAGE_SPEC
from modules.training import train_main


@cli_entry
def main(argv=None):
    return train_main(argv, FIRST_STAGE_SPEC)


if __name__ == "__main__":
    sys.exit(main())
