"""Image-based profiling: aggregate, normalise, sphere, batch-correct, select and evaluate profiles.

Tables are pandas DataFrames whose metadata columns start with ``Metadata_`` (pycytominer style);
every other column is a numeric feature.
"""

from phenoscope.profiling.metrics import (
    mean_average_precision,
    moa_micro_auprc,
    nsc_accuracy,
    nsc_predictions,
    replicate_map,
    retrieval_average_precision,
)
from phenoscope.profiling.preprocess import aggregate, feature_select, harmonize, normalize
from phenoscope.profiling.significance import benjamini_hochberg, map_with_p_values, random_ap
from phenoscope.profiling.sphere import Spherizer, fit_spherizer, spherize

__all__ = [
    "Spherizer",
    "aggregate",
    "benjamini_hochberg",
    "feature_select",
    "fit_spherizer",
    "harmonize",
    "map_with_p_values",
    "mean_average_precision",
    "moa_micro_auprc",
    "normalize",
    "nsc_accuracy",
    "nsc_predictions",
    "random_ap",
    "replicate_map",
    "retrieval_average_precision",
    "spherize",
]
