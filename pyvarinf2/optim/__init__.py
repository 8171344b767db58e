"""Natural-gradient variational optimizers.

All share the conventions of :class:`pyvarinf2.optim._base.VariationalOptimizer`: the model owns
the posterior, ``dataset_size`` is given once, the loss is the plain mean NLL.
"""
import importlib

from ._base import NonFiniteError, VariationalOptimizer

_LOCATIONS = {
    "NoisyAdam": ".noisy_adam",
    "VOGN": ".vogn",
    "IVON": ".ivon",
    "NoisyKFAC": ".noisy_kfac",
    "NoisyEKFAC": ".noisy_kfac",
}

__all__ = ["NonFiniteError", "VariationalOptimizer"] + list(_LOCATIONS)


def __getattr__(name):
    if name in _LOCATIONS:
        module = importlib.import_module(_LOCATIONS[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LOCATIONS))
