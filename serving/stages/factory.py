"""Starting workers: as Ray actors (NIXL between them) or in this process (in-process transport).
The control plane starts, replaces and adds workers only through a factory; it never asks which."""

from __future__ import annotations

import abc
import asyncio
import os
from typing import Any

from serving.config import WorkerConfig
from serving.stages.handles import CONTROL_GROUP, LocalHandle, RayHandle, WorkerHandle
from serving.types import Roles, roles_label

# Ray's namespace of every deployment's named actors (workers, control actors).
NAMESPACE = "epd"
# The custom resource the Kubernetes head offers: gateway replicas and the control actor stay there.
GATEWAY_RESOURCE = "epd-gateway"


class WorkerFactory(abc.ABC):
    def __init__(self, template: WorkerConfig) -> None:
        self.template = template  # engine and limits every worker shares; name and roles vary

    def config(self, name: str, roles: Roles, cpus: tuple[int, ...] = ()) -> WorkerConfig:
        return self.template.model_copy(update={"name": name, "roles": roles_label(roles), "cpus": cpus})

    @abc.abstractmethod
    async def start(self, name: str, roles: Roles, cpus: tuple[int, ...] = ()) -> WorkerHandle:
        """A new worker, up and answering (its weights loaded)."""


class LocalWorkerFactory(WorkerFactory):
    def __init__(self, template: WorkerConfig, hub: Any) -> None:
        super().__init__(template)
        self.hub = hub

    async def start(self, name: str, roles: Roles, cpus: tuple[int, ...] = ()) -> WorkerHandle:
        from serving.stages.worker import StageWorker

        worker = await asyncio.to_thread(StageWorker, self.config(name, roles, cpus), hub=self.hub)
        return LocalHandle(worker)


class RayWorkerFactory(WorkerFactory):
    """One named Ray actor per worker. Data calls share a large thread pool (decode streams block in
    it); control calls have their own concurrency group so they never wait behind streams."""

    def __init__(
        self,
        template: WorkerConfig,
        namespace: str | None = None,
        gpus_per_worker: int = 0,
        role_resources: bool = False,
        detached: bool = False,
    ) -> None:
        super().__init__(template)
        self.namespace = namespace
        self.gpus = gpus_per_worker
        # On Kubernetes each worker group advertises a custom resource for its roles (`epd-e`,
        # `epd-pd`, ...); asking for one unit places a worker in the group sized for its stage.
        self.role_resources = role_resources
        # Started from a Serve config's build task, workers must outlive that task (their owner).
        self.detached = detached

    def actor_options(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "num_cpus": 0 if self.gpus else 0.5,
            "num_gpus": self.gpus,
            "max_concurrency": 256,
            "max_restarts": 0,  # the control plane replaces dead workers itself, under a new name
            "runtime_env": {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}},
        }

    def actor(self, name: str, roles: Roles, cpus: tuple[int, ...] = ()) -> Any:
        """Create the actor (it loads its weights in the background)."""
        import ray

        from serving.stages.worker import StageWorker

        options = self.actor_options(name)
        if not options["namespace"]:
            del options["namespace"]
        if self.role_resources:
            options["resources"] = {role_resource(roles): 1}
        if self.detached:
            options.update(lifetime="detached", get_if_exists=True)
        actor_class = ray.remote(concurrency_groups={CONTROL_GROUP: 16})(StageWorker)
        return actor_class.options(**options).remote(self.config(name, roles, cpus))

    async def start(self, name: str, roles: Roles, cpus: tuple[int, ...] = ()) -> WorkerHandle:
        handle = RayHandle(self.actor(name, roles, cpus), name)
        await handle.info()  # answers once the constructor (weights, transport) has finished
        return handle


def role_resource(roles: Roles) -> str:
    """The custom resource a worker group for these roles advertises: `epd-e`, `epd-pd`, `epd-epd`."""
    return f"epd-{roles_label(roles)}"


def worker_name(roles: Roles, index: int, cluster_id: str | None = None) -> str:
    """`d-1-<cluster id>`: the roles it started with, an index, and the deployment it belongs to."""
    return f"{roles_label(roles)}-{index}-{cluster_id or os.getpid()}"


def deployment_workers(actors: list[dict[str, str]], cluster_id: str) -> list[str]:
    """The live named actors of the deployment `cluster_id` in the workers' namespace (their names end
    with it: `worker_name`), sorted by index."""
    suffix = f"-{cluster_id}"
    found = [
        a["name"] for a in actors if a.get("namespace") == NAMESPACE and a.get("name", "").endswith(suffix)
    ]
    return sorted(found, key=lambda name: worker_index(name, cluster_id))


def worker_index(name: str, cluster_id: str) -> int:
    """The index in `<roles>-<index>-<cluster id>`."""
    return int(name[: -len(cluster_id) - 1].rsplit("-", 1)[1])
