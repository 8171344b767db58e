"""pyvarinf2: variational Bayesian deep learning for PyTorch."""
from . import optim, priors
from .posteriors import MeanFieldPosterior, Posterior
from . import kronecker
from .kronecker import KroneckerPosterior, use_kronecker_posteriors
from .priors import (ConjugateKnownMeanPrior, ConjugatePrior, DistributionPrior, GaussianPrior,
                     MixtureGaussianPrior, Prior, make_prior)
from .variational import Sample, Variationalize, VariationalModel, variationalize
from . import predict
from .predict import (ClassificationPrediction, RegressionPrediction, classification_predictive,
                      expected_entropy, mutual_information, predictive_entropy, predictive_mean,
                      predictive_probs, regression_predictive, sample_predictions)

__version__ = "0.1.0"
