"""Image-based profiling: aggregate, normalise, sphere, batch-correct, select and evaluate profiles.

Tables are pandas DataFrames whose metadata columns start with ``Metadata_`` (pycytominer style);
every other column is a numeric feature.
"""

from phenoscope.profiling.metrics import (
    average_precision,
    mean_average_precision,
    moa_micro_auprc,
    nsc_accuracy,
    nsc_predictions,
)
from phenoscope.profiling.preprocess import aggregate, feature_select, harmonize, normalize
from phenoscope.profiling.sphere import Spherizer, fit_spherizer, spherize

__all__ = [
    "Spherizer",
    "aggregate",
    "average_precision",
    "feature_select",
    "fit_spherizer",
    "harmonize",
    "mean_average_precision",
    "moa_micro_auprc",
    "normalize",
    "nsc_accuracy",
    "nsc_predictions",
    "spherize",
]
