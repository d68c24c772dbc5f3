"""Where a run's files go (docs/deploying.md, "Where a run's files go"): relative config paths start
at the run root ($BLIP3O_RL_ROOT, else the launch directory), a run that would write into Ray's
temporary copy of the code is refused, every path of the GPU configs lies on a volume the cluster
manifests mount where it is used, and `deploy/ray_job.sh` with the shipped config puts the run in
the repository's runs/, where the dashboard lists it and `--resume` continues it."""

from __future__ import annotations

import os
import shlex
import shutil
import typing
from pathlib import Path, PurePosixPath

import pytest
import yaml
from pydantic import BaseModel

from rl.run.config import PATH_KEYS, ROOT_ENV, ConfigError, TrainConfig, dotted_items, load_config, written_keys
from tests.test_train import job_status, ray_head, submit_job  # noqa: F401  (ray_head is a fixture)
from tests.train_support import REPO, metric_table

CONFIGS = REPO / "deploy" / "configs"
GLYPH = CONFIGS / "tiny-cpu-glyph-ocr.yaml"
RAY_PKG = Path("ray", "session_2026-11-30_11-02-54_307787_8511", "runtime_resources", "working_dir_files",
               "_ray_pkg_7c5657c3ec0b756a")  # the layout Ray 2.60 gave a job's driver (measured)


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ----- the rule -----------------------------------------------------------------------------------


def test_relative_paths_start_at_the_root_and_hub_ids_stay(tmp_path):
    sana = load_config(CONFIGS / "tiny-cpu-sana.yaml", root=tmp_path)
    assert sana.model.path == str(tmp_path / "runs" / "models" / "tiny-sana")
    assert sana.rollout.engine.model == sana.decoder.decoder.model == sana.learner.model == sana.model.path
    assert sana.logging.runs_dir == tmp_path / "runs"  # the default, made absolute too
    assert sana.rewards.server.geneval.detector == str(tmp_path / "runs" / "models" / "tiny-geneval" / "mask2former")
    glyph = load_config(GLYPH, root=tmp_path)
    assert glyph.logging.runs_dir == tmp_path / "runs"
    assert glyph.rewards.server.geneval.clip == "openai/clip-vit-large-patch14"  # a hub id, not a path

    raw = yaml.safe_load(GLYPH.read_text())
    raw["model"] = {"path": "org/model"}  # looks like a hub id and is not written by the run
    raw["rewards"]["server"]["ocr"]["models_dir"] = "ocr-models"
    raw["logging"]["runs_dir"] = "/abs/runs"
    config = load_config(write(tmp_path, raw), root=tmp_path)
    assert config.model.path == config.learner.model == "org/model"
    assert config.rewards.server.ocr.models_dir == tmp_path / "ocr-models"
    assert config.logging.runs_dir == Path("/abs/runs")
    (tmp_path / "org" / "model").mkdir(parents=True)  # ... unless it exists under the root
    assert load_config(write(tmp_path, raw), root=tmp_path).model.path == str(tmp_path / "org" / "model")
    raw["model"]["make_tiny"] = "glyph"  # ... or the run builds it there
    (tmp_path / "org" / "model").rmdir()
    assert load_config(write(tmp_path, raw), root=tmp_path).model.path == str(tmp_path / "org" / "model")


def test_the_root_is_the_env_var_else_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config(GLYPH).logging.runs_dir == tmp_path / "runs"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "store"))
    assert load_config(GLYPH, {"logging.runs_dir": "elsewhere"}).logging.runs_dir == tmp_path / "store" / "elsewhere"
    monkeypatch.setenv(ROOT_ENV, "/home/someone-else/blip3o-rl")  # e.g. a laptop's path sent to a remote head
    with pytest.raises(ConfigError, match=f"{ROOT_ENV}=/home/someone-else/blip3o-rl is not an existing"):
        load_config(GLYPH)


def test_a_run_writing_into_rays_copy_of_the_code_is_refused(tmp_path, monkeypatch, capsys):
    from rl.run.train import main

    ray_dir = tmp_path / RAY_PKG
    ray_dir.mkdir(parents=True)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(ray_dir)  # where Ray starts a job's driver
    assert main(["--config", str(GLYPH), "--steps", "1"]) == 2  # before Ray or a model is touched
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: logging.runs_dir is {ray_dir / 'runs'}, inside Ray's temporary copy")
    assert f"set {ROOT_ENV}" in line
    raw = yaml.safe_load(GLYPH.read_text())
    raw["logging"]["runs_dir"] = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"^model\.path is .*_ray_pkg_.*: set BLIP3O_RL_ROOT"):
        load_config(write(tmp_path, raw))  # make_tiny would build the model there
    raw["model"] = {"path": str(tmp_path / "model")}
    raw["decoder"]["decoder"]["glyph"] = {"font_path": "fonts/bundled.ttf"}
    config = load_config(write(tmp_path, raw))  # reading from the copy (code, bundled files) is fine
    assert config.decoder.decoder.glyph.font_path == ray_dir / "fonts" / "bundled.ttf"
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert load_config(GLYPH).model.path == str(tmp_path / "runs" / "models" / "tiny-glyph")


def _path_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of every field typed Path, or str fields naming a model, in the config tree."""
    found = set()
    for name, field in model.model_fields.items():
        key, annotation = f"{prefix}{name}", field.annotation
        args = typing.get_args(annotation)
        names_a_model = name in ("path", "model", "detector", "clip", "processor", "head")
        if annotation is Path or Path in args or (names_a_model and (annotation is str or str in args)):
            found.add(key)
        if typing.get_origin(annotation) is list:
            key, args = f"{key}.*", args
        elif isinstance(annotation, type):
            args = (annotation,)
        for inner in args:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                found |= _path_fields(inner, f"{key}.")
    return found


def test_every_path_field_of_the_config_follows_the_rule():
    """A new path field in any config section must be added to PATH_KEYS (and to USED_ON below)."""
    assert _path_fields(TrainConfig) == set(PATH_KEYS)
    assert set(USED_ON) == set(PATH_KEYS)


# ----- the cluster manifests ----------------------------------------------------------------------

# Which pods read or write each path (head = the job driver: store, model builders, prompt files).
USED_ON = {
    "model.path": {"head"},  # ensure_model / resolve_model_dir before Ray starts
    "rollout.engine.model": {"rollout"},
    "decoder.decoder.model": {"decoder"},
    "learner.model": {"learner"},
    "diffusion_learner.model": {"learner"},  # the diffusion learner's ranks run on learner nodes too
    "rewards.server.geneval.detector": {"reward"},
    "rewards.server.geneval.clip": {"reward"},
    "rewards.server.ocr.models_dir": {"reward"},
    "rewards.server.clipscore.model": {"reward"},
    "rewards.server.clipscore.processor": {"reward"},
    "rewards.server.pickscore.model": {"reward"},
    "rewards.server.pickscore.processor": {"reward"},
    "rewards.server.aesthetic.model": {"reward"},
    "rewards.server.aesthetic.processor": {"reward"},
    "rewards.server.aesthetic.head": {"reward"},
    "rewards.server.consistency.clip.model": {"reward"},
    "rewards.server.consistency.clip.processor": {"reward"},
    "decoder.decoder.glyph.font_path": {"decoder"},
    "rollout.engine.glyph.font_path": {"rollout"},  # its inverse reads edit sources into ids
    "data.sources.*.path": {"head"},
    "eval.edit_data.path": {"head"},  # the in-run eval reads the lines and sends the sources' pixels
    "eval.edit_data.images": {"head"},
    "logging.runs_dir": {"head", "learner"},  # the store on the head; learner ranks write checkpoints
}


def kuberay_layout() -> tuple[PurePosixPath, str, dict[str, set[PurePosixPath]]]:
    """(run root, entrypoint config, {role: mount paths of persistent volumes}) of the RayJob."""
    job = next(yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text()))
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    command = shlex.split(job["spec"]["entrypoint"])
    config = command[command.index("--config") + 1]
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods |= {group["groupName"]: group["template"]["spec"] for group in cluster["workerGroupSpecs"]}
    mounts = {}
    for role, pod in pods.items():
        persistent = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        container = pod["containers"][0]
        mounts[role] = {PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", [])
                        if m["name"] in persistent}
    return PurePosixPath(env["BLIP3O_RL_ROOT"]), config, mounts


def vm_layout() -> tuple[PurePosixPath, dict[str, set[PurePosixPath]]]:
    """(run root, {role: shared mounts}) of cluster.yaml: the code's file mount is the root; the
    docker `-v` mounts of hosts paths that initialization_commands mount over NFS are shared."""
    cluster = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    [root] = [PurePosixPath(remote) for remote, local in cluster["file_mounts"].items() if local == "."]
    nfs = " ".join(cluster.get("initialization_commands", []))
    shared = set()
    for option in cluster["docker"]["run_options"]:
        if option.startswith("-v "):
            host, container = option[3:].split(":")[:2]
            if "nfs4" in nfs and f" {host})" in nfs:
                shared.add(PurePosixPath(container))
    roles = set(cluster["available_node_types"])  # docker.run_options apply to every node type
    return root, {role: shared for role in roles}


def check_paths(config_path: Path, root: PurePosixPath, mounts: dict[str, set[PurePosixPath]]) -> list[str]:
    """Problems with every path `config_path` reads or writes when its run root is `root`."""
    config = load_config(config_path, root=Path(root))
    dumped = config.model_dump(mode="json")
    written = written_keys(yaml.safe_load(config_path.read_text()))
    problems = []
    for dotted in PATH_KEYS:
        for parent, key in dotted_items(dumped, dotted.split(".")):
            value = parent[key]
            if value is None or not value.startswith("/"):
                continue  # unset (the copy installed in the image) or a hub id (downloaded where used)
            path = PurePosixPath(value)
            if dotted not in written and path.is_relative_to(root) and path.relative_to(root).parts[0] != "runs" \
                    and (REPO / path.relative_to(root)).exists():
                continue  # read from the code the image ships, e.g. a bundled prompt file
            if dotted not in written and path.is_relative_to("/usr/share"):
                continue  # a system package of the image (the glyph decoder's font)
            for role in USED_ON[dotted]:
                if not any(path.is_relative_to(mount) for mount in mounts.get(role, ())):
                    problems.append(f"{config_path.name}: {dotted} = {value} is on no shared volume of the {role} pods")
    return problems


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("gpu-*.yaml")), ids=lambda p: p.name)
def test_every_path_a_gpu_config_uses_is_on_the_manifests_volumes(config):
    root, entrypoint_config, mounts = kuberay_layout()
    assert (REPO / entrypoint_config).is_file()
    assert check_paths(config, root, mounts) == []
    vm_root, vm_mounts = vm_layout()
    assert check_paths(config, vm_root, vm_mounts) == []


def test_the_manifests_agree_on_the_run_root():
    root, entrypoint_config, mounts = kuberay_layout()
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"WORKDIR {root}\n" in dockerfile and f"ENV {ROOT_ENV}={root}\n" in dockerfile
    job, *_ = yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    dashboard = next(c for c in head if c["name"] == "blip3o-rl-dashboard")
    runs_dir = load_config(REPO / entrypoint_config, root=Path(root)).logging.runs_dir
    assert dashboard["command"][dashboard["command"].index("--runs-dir") + 1] == str(runs_dir)
    assert PurePosixPath(runs_dir) in {PurePosixPath(m["mountPath"]) for m in dashboard["volumeMounts"]}


def test_the_checker_catches_the_old_layout(tmp_path):
    """The GPU configs as they were (absolute /data paths) fail against both manifests."""
    raw = yaml.safe_load((CONFIGS / "gpu-blip3o-next-grpo-geneval.yaml").read_text())
    raw["model"]["path"], raw["logging"]["runs_dir"] = "/data/models/blip3o-next-sft", "/data/runs"
    root, _, mounts = kuberay_layout()
    problems = check_paths(write(tmp_path, raw), root, mounts)
    assert any("model.path = /data/models" in p and "head" in p for p in problems)
    assert any("logging.runs_dir = /data/runs" in p for p in problems)


# ----- a stopped run's resume hint --------------------------------------------------------------------

RUN_ID = "glyph-ocr-20261205-0001"
SHIPPED = "deploy/configs/tiny-cpu-glyph-ocr.yaml"


class StoppedTrainer:
    """Stands in for the Trainer in `main`: its run stops at once, as a SIGTERM'd one does."""

    def __init__(self, config, resume=None):
        from types import SimpleNamespace

        self.run_id, self.state, self.stop_reason = RUN_ID, SimpleNamespace(step=0), None

    def start(self) -> None:
        pass

    def run(self) -> None:
        from rl.run.lifecycle import RunStopped

        raise RunStopped(f"run {RUN_ID} stopped after step 2: stop requested (SIGTERM); checkpoint step-000002", 0)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def stopping_driver(tmp_path, monkeypatch):
    """`rl.run.train.main` up to a run that stops, without Ray, models or signal handlers."""
    from rl.run import train

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("BLIP3O_RL_LAUNCHER", raising=False)
    monkeypatch.chdir(REPO)
    for name, stand_in in (("ensure_model", lambda config: None), ("resolve_model_dir", lambda path: None),
                           ("check_rows_fit_config", lambda config: None), ("init_ray", lambda config: None),
                           ("install_stop_handlers", lambda trainer: None), ("Trainer", StoppedTrainer)):
        monkeypatch.setattr(train, name, stand_in)
    return train


def hint(capsys) -> str:
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("continue it with: ")]
    return line.removeprefix("continue it with: ")


def test_the_resume_hint_is_the_command_the_user_ran(stopping_driver, tmp_path, monkeypatch, capsys):
    from deploy.cli import main as cli_main

    runs = tmp_path / "my runs"  # a space: the hint is quoted for a shell
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "--config", SHIPPED, "--runs-dir", str(runs)])
    assert exited.value.code == 0
    assert hint(capsys) == f"blip3o-rl train --config {SHIPPED} --resume {RUN_ID} --runs-dir '{runs}'"

    assert stopping_driver.main(["--config", SHIPPED, "--steps", "3"]) == 0
    assert hint(capsys) == f"python -m rl.run.train --config {SHIPPED} --resume {RUN_ID} --steps 3"


def test_inside_a_ray_job_the_resume_hint_is_the_job_script(stopping_driver, tmp_path, monkeypatch, capsys):
    """deploy/ray_job.sh's entrypoint (read from a stand-in `ray` CLI) names the script to the driver,
    which hints at the script's own form: the config first, then --resume (and --steps)."""
    import stat
    import subprocess

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    recorded = tmp_path / "ray-args"
    (fake_bin / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{recorded}"\n')
    (fake_bin / "ray").chmod((fake_bin / "ray").stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    subprocess.run([str(REPO / "deploy" / "ray_job.sh"), SHIPPED, "--steps", "2", "--no-wait"], env=env,
                   check=True, timeout=60)
    submitted = recorded.read_text().splitlines()
    entrypoint = submitted[submitted.index("--") + 1:]
    assert entrypoint == ["env", "BLIP3O_RL_LAUNCHER=deploy/ray_job.sh", "python", "-m", "rl.run.train",
                          "--config", SHIPPED, "--steps", "2"]
    assert "--no-wait" in submitted[:submitted.index("--")]  # other flags still go to `ray job submit`

    variable, value = entrypoint[1].split("=")
    monkeypatch.setenv(variable, value)  # what the job's driver sees
    assert stopping_driver.main(entrypoint[5:]) == 0
    assert hint(capsys) == f"deploy/ray_job.sh {SHIPPED} --resume {RUN_ID} --steps 2"


# ----- a real Ray job -----------------------------------------------------------------------------


@pytest.fixture
def repo_copy(tmp_path):
    """The repository's code (what `ray_job.sh` uploads) in a directory of its own, so the run lands
    in *its* runs/ and the test leaves the shared checkout's runs/ alone."""
    copy = tmp_path / "blip3o-rl"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "test-artifacts", "results", "*.egg-info", "__pycache__", ".pytest_cache"))
    return copy


@pytest.mark.slow
def test_ray_job_with_the_shipped_config_writes_the_repository_runs_and_resumes(repo_copy, ray_head):
    """deploy/ray_job.sh with tiny-cpu-glyph-ocr.yaml as shipped (relative paths): the run, its
    checkpoints and the built model go to <repository>/runs, not Ray's copy; the dashboard's API
    lists the run; a second job with --resume continues it from the first job's checkpoint."""
    from fastapi.testclient import TestClient

    from deploy.dashboard.app import create_app

    address, env = ray_head
    env = {k: v for k, v in env.items() if k != ROOT_ENV}
    config = "deploy/configs/tiny-cpu-glyph-ocr.yaml"
    assert (repo_copy / config).read_text() == GLYPH.read_text()
    first, output = submit_job(address, env, config, "--steps", "1", repo=repo_copy)
    assert f"Job '{first}' succeeded" in job_status(address, env, first), output[-4000:]
    runs = repo_copy / "runs"
    assert (runs / "models" / "tiny-glyph").is_dir()
    with TestClient(create_app(runs)) as client:
        [run] = client.get("/api/runs").json()
    assert run["status"] == "finished"
    assert (runs / "checkpoints" / run["id"] / "step-000001").is_dir()

    second, output = submit_job(address, env, config, "--resume", run["id"], "--steps", "2", repo=repo_copy)
    assert f"Job '{second}' succeeded" in job_status(address, env, second), output[-4000:]
    assert f"run {run['id']}: steps 2..2" in output
    with TestClient(create_app(runs)) as client:
        [resumed] = client.get("/api/runs").json()
        events = [e["kind"] for e in client.get(f"/api/runs/{run['id']}").json()["events"]]
    assert resumed["id"] == run["id"] and resumed["status"] == "finished" and "resume" in events
    from rl.run_store import RunStore

    assert sorted(metric_table(RunStore(runs), run["id"]))[-2:] == [1, 2]
    assert sorted(p.name for p in (runs / "checkpoints" / run["id"]).glob("step-*"))[-1] == "step-000002"
    ray_temp = Path("/tmp") / f"rayjob{os.getpid()}"  # the ray_head fixture's --temp-dir
    assert list(ray_temp.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))  # Ray's copy ...
    assert list(ray_temp.glob("session_*/runtime_resources/working_dir_files/*/runs")) == []  # ... holds no run
