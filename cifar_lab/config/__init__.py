"""Everything about configs: composing saved runs, validating, trusting, resolvers, printing.

* :mod:`~cifar_lab.config.schema`: checks a composed config before any work starts.
* :mod:`~cifar_lab.config.trust`: what a config read back from a file may build.
* :mod:`~cifar_lab.config.compose`: compose a config in code, as the command line would.
* :mod:`~cifar_lab.config.resolvers`: the ``${cifar_lab.*:...}`` interpolations.
* :mod:`~cifar_lab.config.tree`: the config printed at start and saved with the run.
"""

from pathlib import Path

# The config tree (`conf/`) the entry points compose from.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
