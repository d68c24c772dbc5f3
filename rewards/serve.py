"""The same reward app as a Ray Serve application (for a training cluster).

    from ray import serve
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_serve_app(Settings(scorers=["ocr"])), name="rewards", route_prefix="/")

The FastAPI app is built inside the replica (ingress builder), so models load there, once, in the
app's lifespan, and its request batching works across all requests the replica receives.
"""

from __future__ import annotations

from ray import serve
from ray.serve.deployment import Application

from rewards.app.settings import Settings


def build_serve_app(settings: Settings, num_cpus: float = 1.0, max_ongoing_requests: int = 256, *,
                    num_replicas: int = 1, num_gpus: float = 0.0,
                    resources: dict[str, float] | None = None) -> Application:
    """A Serve application of `num_replicas` replicas running `create_app(settings)`, each with
    `num_cpus`, `num_gpus` and custom `resources` (the reward role's, rl/run/placement.py)."""

    def build():
        from rewards.app.main import create_app

        return create_app(settings)

    @serve.deployment(
        name="rewards",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,  # let many requests reach the app's batcher
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or {}},
    )
    @serve.ingress(build)
    class RewardServer:
        """Ray Serve replica wrapping the FastAPI reward app."""

    return RewardServer.bind()
