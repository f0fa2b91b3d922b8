"""cifar-lab: a Lightning + Hydra experiment framework for CIFAR-10/100 classification."""

from cifar_lab.config.resolvers import register as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()
