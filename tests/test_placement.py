"""Every role's devices from the config (rl/run/placement.py), and a run refused before anything
starts when the Ray cluster cannot hold them all."""

from __future__ import annotations

import time

import pytest

from rl.run.config import ConfigError, load_config
from rl.run.placement import check_cluster_fits, role_demands, role_resources, total_demand
from tests.train_support import small_config


def gpu_config(tmp_path, **changes):
    """The demo config asking for GPUs everywhere: 2 rollout x 1, 1 decoder x 1, 2 learner ranks x 1
    and 2 reward replicas x 0.5 (GenEval on cuda), role resources on."""
    return load_config(small_config(tmp_path, tmp_path / "no-model", **{
        "rollout.workers": 2, "rollout.num_gpus_per_worker": 1, "decoder.decoder.num_gpus": 1,
        "learner.num_gpus_per_rank": 1, "rewards.num_replicas": 2, "rewards.num_gpus": 0.5,
        "rewards.server.scorers": ["ocr", "geneval"], "rewards.server.geneval.device": "cuda",
        "ray.role_resources": True, **changes}))


def test_each_role_asks_for_its_devices_and_its_role_resource(tmp_path):
    config = gpu_config(tmp_path)
    demands = {d.role: d for d in role_demands(config)}
    # demo: rollout 0.5 CPU, decoder 0.25, learner 2 ranks x 0.5, reward 0.25
    assert demands["rollout"].units == 2 and demands["rollout"].per_unit == {"CPU": 0.5, "GPU": 1.0, "rollout": 1.0}
    assert demands["decoder"].per_unit == {"CPU": 0.25, "GPU": 1.0, "decoder": 1.0}
    assert demands["learner"].units == 2 and demands["learner"].per_unit == {"CPU": 0.5, "GPU": 1.0, "learner": 1.0}
    assert demands["reward"].units == 2 and demands["reward"].per_unit == {"CPU": 0.25, "GPU": 0.5, "reward": 1.0}
    # GPUs: 2 x 1 + 1 + 2 x 1 + 2 x 0.5 = 6; CPUs: 2 x 0.5 + 0.25 + 2 x 0.5 + 2 x 0.25 = 2.75
    assert total_demand(role_demands(config)) == {"CPU": 2.75, "GPU": 6.0, "rollout": 2.0, "decoder": 1.0,
                                                  "learner": 2.0, "reward": 2.0}
    assert role_resources(config, "learner") == {"learner": 1.0}


def test_without_role_resources_the_demo_asks_for_cpus_only_and_fits_two_cores(tmp_path):
    config = load_config(small_config(tmp_path, tmp_path / "no-model"))
    assert role_resources(config, "rollout") == {}
    assert total_demand(role_demands(config)) == {"CPU": 2.0}  # 0.5 + 0.25 + 2 x 0.5 + 0.25
    check_cluster_fits(role_demands(config), {"CPU": 2.0})
    url = load_config(small_config(tmp_path, tmp_path / "no-model", **{"rewards.service": "url",
                                                                       "rewards.url": "http://x"}))
    assert [d.role for d in role_demands(url)] == ["rollout", "decoder", "learner"]  # not ours to place


def test_a_shortfall_names_each_resource_and_who_asks(tmp_path):
    demands = role_demands(gpu_config(tmp_path))
    with pytest.raises(ConfigError) as refused:
        check_cluster_fits(demands, {"CPU": 64.0, "GPU": 4.0, "rollout": 2.0, "decoder": 1.0, "learner": 2.0})
    message = str(refused.value)
    assert "6 GPU (rollout 2 x 1, decoder 1 x 1, learner 2 x 1, reward 2 x 0.5) but the cluster has 4" in message
    assert "2 reward (reward 2 x 1) but the cluster has 0" in message
    assert "CPU" not in message.split(":", 1)[1].split("(lower")[0]  # 2.75 of 64 CPUs: no complaint


def test_geneval_on_cuda_needs_a_gpu_per_replica(tmp_path):
    with pytest.raises(ConfigError, match="geneval.device is cuda but rewards.num_gpus is 0"):
        gpu_config(tmp_path, **{"rewards.num_gpus": 0})


def test_a_cpu_cluster_refuses_a_gpu_config_before_anything_starts(ray_cluster, tmp_path):
    """The test cluster has no GPU; the model directory does not even exist: the refusal comes
    before the reward service, the workers or the learner start."""
    from rl.run.train import Trainer

    config = load_config(small_config(tmp_path, tmp_path / "no-model", **{"rollout.num_gpus_per_worker": 1}))
    trainer = Trainer(config)
    with pytest.raises(ConfigError, match=r"needs more than the Ray cluster has: 1 GPU \(rollout 1 x 1\) "
                                          r"but the cluster has 0"):
        trainer.start()
    assert not hasattr(trainer, "endpoint") and not hasattr(trainer, "fleet")


def test_the_reward_app_is_deployed_with_the_configured_replicas_and_devices():
    from rewards.app.settings import Settings
    from rewards.serve import build_serve_app

    app = build_serve_app(Settings(scorers=["ocr"]), num_cpus=2, num_replicas=3, num_gpus=0.5,
                          resources={"reward": 1.0})
    deployment = app._bound_deployment  # what serve.run deploys
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"reward": 1.0}}


def _pid_after(seconds: float) -> int:
    import os

    time.sleep(seconds)
    return os.getpid()


@pytest.mark.slow
def test_a_cluster_started_by_a_run_keeps_its_idle_task_workers_between_steps(tmp_path):
    """Each step runs a few small tasks at once (scoring per chunk, image statistics, sample rows).
    Ray's default kept one idle worker per CPU (2 here) and killed the others after 1 s idle, so every
    step started Python processes that imported torch again. Four tasks at once, three times with 3 s
    idle between: the same four processes must run every round (the default starts new ones)."""
    import ray

    from rl.run.train import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(load_config(small_config(tmp_path, tmp_path / "no-model", **{"rewards.service": "url",
                                                                         "rewards.url": "http://127.0.0.1:9"})))
    try:
        task = ray.remote(num_cpus=0)(_pid_after)
        rounds = []
        for _ in range(3):
            rounds.append(set(ray.get([task.remote(1.0) for _ in range(4)])))
            time.sleep(3.0)  # Ray kills an idle worker above its limit after 1 s
        assert len(rounds[0]) == 4  # four at once: four processes
        assert rounds[1] == rounds[0] and rounds[2] == rounds[0]
    finally:
        ray.shutdown()
