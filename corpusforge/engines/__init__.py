"""Execution engines: where a stage of the graph runs.

``execution.engine: local`` (the default) runs every stage in this process, as the functions of
`corpusforge.stages` do. ``execution.engine: ray`` runs the data stages (extract, clean, chunk),
embed and the dense index on a Ray cluster (`corpusforge.engines.ray`); evaluate and publish stay
on the driver either way, and both engines write the same datasets, vectors and index files.

Nothing here imports ray: the Ray modules are imported only when a spec asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corpusforge.spec import PipelineSpec


def uses_ray(spec: "PipelineSpec") -> bool:
    """True when the spec runs its distributable stages on Ray.

    Args:
        spec: the pipeline spec.

    Returns:
        ``spec.execution.engine == "ray"``.
    """
    return spec.execution.engine == "ray"
