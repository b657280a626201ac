"""The Matryoshka math in plain torch: no upstream imports here.

``config`` (the options), ``prefixes`` (checking prefix lengths, default ladders, levels),
``schedules`` (fixed/pareto/uniform prefixes), ``nested`` (one-decode nested loss),
``batch_topk``, ``truncation`` (zeroing latents beyond P), ``cross_layer`` (the CLT nested
loss), ``edge_scores`` (virtual weights, ERA/TWERA of global graphs), ``decomposition``
(which latents beyond P refine a feature), ``level_decoders`` (which decoder a prefix
uses), ``plain_state`` (reading state files as data), ``field_types`` (config field
checks), ``errors`` (the plugin's one error hierarchy).
"""

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
from .errors import MatryoshkaError, UsageError
from .prefixes import check_prefix_len, check_prefix_lens, default_prefix_ladder
from .truncation import PrefixActivation, truncate_dense, truncate_sparse

__all__ = [
    "BUSSMANN_GROUP_FRACTIONS",
    "PREFIX_SCHEDULES",
    "MatryoshkaConfig",
    "MatryoshkaConfigError",
    "MatryoshkaError",
    "UsageError",
    "PrefixActivation",
    "PrefixSampler",
    "check_prefix_len",
    "check_prefix_lens",
    "default_prefix_ladder",
    "cumulative_reconstructions",
    "level_decodes",
    "nested_fvu",
    "prefix_decodes",
    "truncate_dense",
    "truncate_sparse",
]
