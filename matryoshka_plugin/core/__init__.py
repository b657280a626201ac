"""The Matryoshka math in plain torch: no upstream imports here."""

from .config import (
    BUSSMANN_GROUP_FRACTIONS,
    PREFIX_SCHEDULES,
    MatryoshkaConfig,
    MatryoshkaConfigError,
)
from .nested import (
    cumulative_reconstructions,
    level_decodes,
    nested_fvu,
    prefix_decodes,
)
from .schedules import PrefixSampler
from .truncation import (
    PrefixActivation,
    check_prefix_len,
    truncate_dense,
    truncate_sparse,
)

__all__ = [
    "BUSSMANN_GROUP_FRACTIONS",
    "PREFIX_SCHEDULES",
    "MatryoshkaConfig",
    "MatryoshkaConfigError",
    "PrefixActivation",
    "PrefixSampler",
    "check_prefix_len",
    "cumulative_reconstructions",
    "level_decodes",
    "nested_fvu",
    "prefix_decodes",
    "truncate_dense",
    "truncate_sparse",
]
