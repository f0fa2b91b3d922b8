"""An example package of your own: a network, a data source and a callback that cifar-lab builds
from the configs in ``examples/conf/`` (README: "Add your own model, dataset or callback")."""
