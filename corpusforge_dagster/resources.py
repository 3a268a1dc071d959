"""Resources: where pipelines keep their data, where runs are tracked, which device encodes.

The defaults are the local ones (a ``workspace/`` folder in the repository, SQLite MLflow inside
it, snapshots under it, device ``auto``). `resources_from_env` swaps them per environment: each
``CORPUSFORGE_*`` variable that is set is bound as a Dagster ``EnvVar`` (read at run time and
shown as such in the UI), e.g. ``CORPUSFORGE_PUBLISH_ROOT=s3://bucket/snapshots`` publishes to S3.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
from dagster_ray import Lifecycle, LocalRay, RayResource

from corpusforge.pipeline import Pipeline
from corpusforge.spec import Overrides

ROOT = Path(__file__).resolve().parent.parent


class StorageResource(dg.ConfigurableResource):
    """The storage root: the local workspace, and optionally where snapshots are published.

    Attributes:
        workspace: the workspace root (datasets, state, caches); relative paths resolve against
            the repository root.
        publish_root: snapshot root overriding each spec's ``publish.root`` (``s3://...`` or a folder).
        s3_endpoint_url: S3 endpoint of the publish root (MinIO, moto, ...).
    """

    workspace: str = "workspace"
    publish_root: str | None = None
    s3_endpoint_url: str | None = None

    def workspace_path(self) -> Path:
        """The workspace root as an absolute path."""
        path = Path(self.workspace).expanduser()
        return path if path.is_absolute() else ROOT / path


class TrackingResource(dg.ConfigurableResource):
    """MLflow: tracking URI and experiment overriding the spec's (default: the spec's own, else
    SQLite in the workspace)."""

    tracking_uri: str | None = None
    experiment: str | None = None


class DeviceResource(dg.ConfigurableResource):
    """The encoding device overriding the spec's ``model.device``: ``auto``, ``cpu`` or ``cuda``."""

    device: str | None = None


def local_ray() -> LocalRay:
    """dagster-ray's `LocalRay`, connected only by the assets of a spec with ``execution.engine: ray``.

    The default Ray resource: a spec on the Ray engine without an ``execution.address`` runs its
    stages on the Ray this resource connects (a local one here; bind a dagster-ray
    ``KubeRayCluster`` as ``ray_cluster`` to get a cluster per run on Kubernetes). A spec with an
    address joins that cluster itself; local-engine specs never start Ray.
    """
    return LocalRay(lifecycle=Lifecycle(connect=False))


def connect_ray(context: dg.AssetExecutionContext, ray_cluster: RayResource, pipeline: Pipeline) -> bool:
    """Connect this step to the resource's Ray when the spec runs on Ray and names no address.

    Returns:
        True when the step now runs its stage on the resource's cluster.
    """
    from corpusforge.engines import uses_ray

    if not uses_ray(pipeline.spec) or pipeline.spec.execution.address:
        return False
    import ray

    if not ray.is_initialized():
        ray_cluster.connect(context)
    return True


def pipeline_for(spec: Path, storage: StorageResource, tracking: TrackingResource,
                 device: DeviceResource) -> Pipeline:
    """Open a spec's pipeline with the resources' settings.

    Args:
        spec: the spec file.
        storage: the storage resource.
        tracking: the MLflow resource.
        device: the device resource.

    Returns:
        The pipeline.
    """
    overrides = Overrides(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment,
                          device=device.device, publish_root=storage.publish_root,
                          s3_endpoint_url=storage.s3_endpoint_url)
    return Pipeline.open(spec, storage.workspace_path(), overrides)


def _env(environ: Mapping[str, str], name: str, default: str | None = None):
    """An EnvVar when the variable is set (resolved at run time), else the default."""
    return dg.EnvVar(name) if environ.get(name) else default


def workspace_pool(environ: Mapping[str, str] | None = None) -> str:
    """The Dagster concurrency pool of this environment's workspace.

    Every stage asset runs in it. With the repository's ``dagster.yaml`` (``pools: granularity: run,
    default_limit: 1``) at most one run holding a pool is in progress at a time, so two runs that share
    a workspace queue instead of running at once (a second code location pointed at another
    workspace gets another pool). The workspace's own file lock is the backstop outside Dagster.

    Args:
        environ: the environment (default ``os.environ``): ``CORPUSFORGE_WORKSPACE`` as the
            storage resource reads it.

    Returns:
        ``corpusforge-workspace-<8 hex digits of the workspace's absolute path>``.
    """
    env = os.environ if environ is None else environ
    path = StorageResource(workspace=env.get("CORPUSFORGE_WORKSPACE") or "workspace").workspace_path()
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return f"corpusforge-workspace-{digest}"


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of this environment.

    Variables: ``CORPUSFORGE_WORKSPACE``, ``CORPUSFORGE_PUBLISH_ROOT``, ``CORPUSFORGE_S3_ENDPOINT_URL``,
    ``CORPUSFORGE_MLFLOW_TRACKING_URI``, ``CORPUSFORGE_MLFLOW_EXPERIMENT``, ``CORPUSFORGE_DEVICE``.
    The Ray cluster resource is `local_ray`.

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        ``{"storage": ..., "tracking": ..., "device": ..., "ray_cluster": ...}``.
    """
    env = os.environ if environ is None else environ
    return {
        "storage": StorageResource(workspace=_env(env, "CORPUSFORGE_WORKSPACE", "workspace"),
                                   publish_root=_env(env, "CORPUSFORGE_PUBLISH_ROOT"),
                                   s3_endpoint_url=_env(env, "CORPUSFORGE_S3_ENDPOINT_URL")),
        "tracking": TrackingResource(tracking_uri=_env(env, "CORPUSFORGE_MLFLOW_TRACKING_URI"),
                                     experiment=_env(env, "CORPUSFORGE_MLFLOW_EXPERIMENT")),
        "device": DeviceResource(device=_env(env, "CORPUSFORGE_DEVICE")),
        "ray_cluster": local_ray(),
    }
