"""Parallelism applied from outside the model: degrees and mesh (dims), TP, EP, data-parallel
gradient reduction. Order of application: see docs/parallelism.md."""

from .dims import MESH_AXES, ParallelDims, backend_for

__all__ = ["MESH_AXES", "ParallelDims", "backend_for"]
