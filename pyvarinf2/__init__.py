"""pyvarinf2: variational Bayesian deep learning for PyTorch."""
from . import optim, priors
from .posteriors import MeanFieldPosterior, Posterior
from .priors import (ConjugateKnownMeanPrior, ConjugatePrior, DistributionPrior, GaussianPrior,
                     MixtureGaussianPrior, Prior, make_prior)
from .variational import Sample, Variationalize, VariationalModel, variationalize

__version__ = "0.1.0"
