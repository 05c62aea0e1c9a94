"""The parts of OpenDP the site draws its noise with, imported without ``opendp.prelude``.

``import opendp.prelude`` also imports ``opendp.extras`` (scikit-learn, polars hooks): about
2 s per process, and a deployed SuperNode starts one process per message. The modules below
are the ones the prelude re-exports for what the site uses; ``dp.m.make_gaussian`` and the
rest read as they do with the prelude.
"""

from __future__ import annotations

from opendp import measurements
from opendp import measurements as m
from opendp.domains import atom_domain, vector_domain
from opendp.metrics import absolute_distance, l2_distance
from opendp.mod import enable_features

__all__ = [
    "absolute_distance",
    "atom_domain",
    "enable_features",
    "l2_distance",
    "m",
    "measurements",
    "vector_domain",
]

enable_features("contrib")
