"""twa: Trainable Weight Averaging (Li et al., ICLR 2023) as a command-line tool and a library."""

__version__ = "0.1.0"

from twa_cli.errors import TwaError

__all__ = ["TwaError", "__version__"]
