"""`blip3o-rl rehearse`: the GPU configs run on this CPU (rl/rehearsal/).

Quick tier: the substitution of each deploy/configs/gpu-*.yaml against a hand-written table (what
changed, from what to what) and the proof that nothing else changed; the nodes of a 1- and a
2-node rehearsal; the tiny model carries the real model's choices. Slow tier: each GPU config
rehearsed for 2 steps (the joint one across two Ray nodes, with a guard rollback and a resume).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rl.rehearsal.cluster import NodeSpec, node_specs
from rl.rehearsal.command import apply_overrides, parse_overrides
from rl.rehearsal.models import build_tiny_model, read_model_choices
from rl.rehearsal.report import AR_AGREEMENT_METRIC, DECODER_AGREEMENT_METRIC, Report, agreements
from rl.rehearsal.substitution import BLIP3O_NEXT_CHOICES, rehearsal_config, tiny_spec
from rl.run.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
GENEVAL, TEXT, JOINT, EDIT = ("gpu-blip3o-next-grpo-geneval.yaml", "gpu-blip3o-next-grpo-text.yaml",
                              "gpu-blip3o-next-joint-geneval.yaml", "gpu-blip3o-next-grpo-edit.yaml")


def flatten(node, prefix: str = "") -> dict:
    """Leaves of a dumped config by dotted key (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def expected_changes(name: str, root: Path, work: Path) -> dict:
    """Hand-written: every key a rehearsal of `name` changes, (GPU config's value, rehearsal's value).

    Batch layout, hand-checked: the GPU configs train 8 prompts x 16 = 128 rows a step in one optimizer
    step (AR: 4 ranks x micro 4 x accumulation 8 = 128; diffusion: 2 x 4 x 16 = 128); the rehearsal's
    2 x 4 = 8 rows stay one optimizer step: 2 ranks x 2 x 2 = 8 for either learner."""
    model = str(root / ("runs/models/blip3o-next-sft-edit" if name == EDIT else "runs/models/blip3o-next-sft"))
    tiny = str(work / "model")
    changes = {
        "steps": (1000, 3),
        "model.path": (model, tiny), "rollout.engine.model": (model, tiny), "decoder.decoder.model": (model, tiny),
        "learner.model": (model, tiny),
        "rollout.engine.device": ("cuda", "cpu"), "decoder.decoder.device": ("cuda", "cpu"),
        "learner.device": ("cuda", "cpu"),
        "rollout.num_gpus_per_worker": (1.0, 0.0), "decoder.decoder.num_gpus": (1.0, 0.0),
        "rewards.num_gpus": (1.0, 0.0), "learner.num_gpus_per_rank": (1.0, 0.0),
        "learner.dist_backend": ("nccl", "gloo"), "learner.sync.broadcast_backend": ("nccl", "gloo"),
        "learner.sync.broadcast_device": ("cuda", "cpu"),
        "rollout.workers": (2, 1), "decoder.workers": (2, 1),
        "rollout.num_cpus_per_worker": (4.0, 0.5), "decoder.decoder.num_cpus": (4.0, 0.25),
        "rewards.num_cpus": (4.0, 0.25), "rollout.engine.kv_cache_gib": (20.0, 1.0),
        "data.prompts_per_step": (8, 2), "data.group_size": (16, 4),
        "schedule.chunk_prompts": (2, 1),  # 4 chunks of 2 prompts -> 2 chunks of 1
        "decoder.decoder.vae_micro_batch_size": (4, 2),  # a chunk's 32 images in 8 DC-AE calls -> 4 in 2
        "learner.world_size": (4, 2), "learner.micro_batch_size": (4, 2), "learner.gradient_accumulation_steps": (8, 2),
        "learner.num_cpus_per_rank": (4.0, 0.25), "learner.sync.bucket_mb": (256, 1),
        "rewards.port": (8000, 0), "logging.runs_dir": (str(root / "runs"), str(work / "runs")),
        "rollout.engine.sampling.top_k": (None, 0),  # the model's top-k 20 off on the flat random stand-in
    }
    if name == EDIT:  # its own mix is kept, but for the judge served elsewhere; its synthetic set is written here
        mix = load_config(CONFIGS / EDIT, root=root).model_dump(mode="json")["rewards"]["mix"]
        assert [c["name"] for c in mix] == ["judge", "edit", "keep"]
        changes["rewards.mix"] = (mix, mix[1:])
        source = load_config(CONFIGS / EDIT, root=root).model_dump(mode="json")["data"]["sources"][0]
        assert (source["path"], source["synthetic"]["n"]) == (str(root / "runs/data/edit/train.jsonl"), 4000)
        changes["data.sources"] = ([source], [{**source, "path": str(work / "data/edit-0/train.jsonl"),
                                               "synthetic": {**source["synthetic"], "n": 64}}])
        return changes
    task = "ocr" if name == TEXT else "geneval"
    signal = {"name": "compressibility", "scorer": "compressibility", "weight": 0.1, "normalize": "group"}
    changes["rewards.server.scorers"] = ([task], [task, "compressibility"])
    changes["rewards.mix"] = (None, [{"name": task, "scorer": task, "weight": 1.0, "normalize": "none"}, signal])
    if task == "geneval":
        changes.update({
            "rewards.server.geneval.detector": ("facebook/mask2former-swin-small-coco-instance",
                                                str(work / "tiny-geneval/mask2former")),
            "rewards.server.geneval.clip": ("openai/clip-vit-large-patch14", str(work / "tiny-geneval/clip")),
            "rewards.make_tiny_geneval": (False, True), "rewards.server.geneval.device": ("cuda", "cpu"),
        })
    if name == JOINT:  # world_size 2 is kept: >= 2 ranks stay 2
        changes.update({
            "diffusion_learner.model": (model, tiny), "diffusion_learner.device": ("cuda", "cpu"),
            "diffusion_learner.num_gpus_per_rank": (1.0, 0.0), "diffusion_learner.dist_backend": ("nccl", "gloo"),
            "diffusion_learner.sync.broadcast_backend": ("nccl", "gloo"),
            "diffusion_learner.sync.broadcast_device": ("cuda", "cpu"),
            "diffusion_learner.micro_batch_size": (4, 2), "diffusion_learner.gradient_accumulation_steps": (16, 2),
            "diffusion_learner.num_cpus_per_rank": (4.0, 0.25), "diffusion_learner.sync.bucket_mb": (256, 1),
            "diffusion_learner.ema.update_interval": (8, 2),
        })
    return changes


KEPT = {  # what a rehearsal must run as the GPU configs write it (spot checks beside the full diff above,
    # which proves every other key, the losses' sections included, unchanged)
    "learner.precision": "bf16", "learner.zero_stage": 1, "learner.sync.transport": "broadcast",
    "rollout.engine.dtype": "bfloat16", "decoder.decoder.dtype": "bfloat16", "rollout.engine.enforce_eager": False,
    "rollout.engine.compile_sampler": True, "decoder.decoder.num_inference_steps": 30, "learner.grpo.beta": 0.001,
    "learner.lr": 1e-6, "learner.lr_schedule": "cosine", "learner.total_steps": 1000, "schedule.mode": "sync",
    "ray.role_resources": True, "rewards.service": "serve", "rewards.num_replicas": 1, "checkpoint.every": 50,
}
KEPT_JOINT = {
    "train": ["ar", "diffusion"], "diffusion_learner.precision": "bf16", "diffusion_learner.zero_stage": 2,
    "diffusion_learner.world_size": 2, "diffusion_learner.sync.transport": "broadcast",
    "diffusion_learner.lora.rank": 32, "diffusion_learner.lora.alpha": 64.0,
    "diffusion_learner.lora.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "decoder.decoder.transformer_lora.rank": 32, "diffusion_learner.sampling.steps": 10,
    "diffusion_learner.sampling.noise_level": 0.7, "diffusion_learner.ema.decay": 0.9,
    "diffusion_learner.gradient_checkpointing": False,
}


@pytest.mark.parametrize("name", [GENEVAL, TEXT, JOINT, EDIT])
def test_substitution_changes_exactly_the_hand_checked_keys(name, tmp_path):
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir()
    gpu = load_config(CONFIGS / name, root=root)
    config, records = rehearsal_config(gpu, work)
    before, after = flatten(gpu.model_dump(mode="json")), flatten(config.model_dump(mode="json"))
    changed = {key for key in before if before[key] != after[key]}
    assert {r.key: (r.was, r.now) for r in records} == expected_changes(name, root, work)
    assert changed == {r.key for r in records}  # nothing changed without a record
    assert all(r.why for r in records)
    for key, value in {**KEPT, **(KEPT_JOINT if name == JOINT else {})}.items():
        assert before[key] == after[key] == value, key


def test_the_tiny_model_keeps_blip3o_next_choices(tmp_path):
    """Built with BLIP3o-NEXT's choices, the tiny model reads back the same choices: tied head,
    image markers before the image tokens, SANA 1.5's q/k norm, 6 DC-AE stages, bf16 on disk,
    the recorded sampling truncation."""
    spec = tiny_spec(BLIP3O_NEXT_CHOICES)
    assert (spec.tie_word_embeddings, spec.markers_first, spec.sana.qk_norm, spec.save_dtype) == \
        (True, True, "rms_norm_across_heads", "bfloat16")
    assert spec.sana.vae_channels == (8, 8, 16, 16, 32, 32) and spec.hidden_size == 128
    assert spec.max_position_embeddings == 40960  # the real context: a config's max_model_len 2048 is served
    assert build_tiny_model(tmp_path / "model", BLIP3O_NEXT_CHOICES)
    assert not build_tiny_model(tmp_path / "model", BLIP3O_NEXT_CHOICES)  # already there: kept
    read = read_model_choices(tmp_path / "model")
    assert read.sampling.top_k == 20 and read.sampling.top_p == 0.95
    assert read == replace(BLIP3O_NEXT_CHOICES, source=str(tmp_path / "model"))
    assert read_model_choices(tmp_path / "absent") == BLIP3O_NEXT_CHOICES


def test_nodes_hold_exactly_the_role_resources(tmp_path):
    """Hand-summed from the rehearsal counts: rollout 1 x 0.5 CPU, decoder 1 x 0.25, reward 1 x 0.25,
    AR learner 2 x 0.25, diffusion learner 2 x 0.25 (joint); CPUs rounded up per node."""
    joint, _ = rehearsal_config(load_config(CONFIGS / JOINT, root=tmp_path), tmp_path / "w")
    geneval, _ = rehearsal_config(load_config(CONFIGS / GENEVAL, root=tmp_path), tmp_path / "w")
    workers = ("rollout", "decoder", "reward")
    assert node_specs(joint, 1) == [NodeSpec((*workers, "learner"), 2,
                                             {"rollout": 1.0, "decoder": 1.0, "learner": 4.0, "reward": 1.0})]
    assert node_specs(joint, 2) == [NodeSpec(workers, 1, {"rollout": 1.0, "decoder": 1.0, "reward": 1.0}),
                                    NodeSpec(("learner",), 1, {"learner": 4.0})]
    assert node_specs(geneval, 2)[1] == NodeSpec(("learner",), 1, {"learner": 2.0})


def test_overrides_are_applied_after_the_substitution_and_recorded(tmp_path):
    config, _ = rehearsal_config(load_config(CONFIGS / JOINT, root=tmp_path), tmp_path / "w")
    changed, records = apply_overrides(config, parse_overrides(["checkpoint.every=1", "guard={rules: [{kind: band, "
                                                                "metric: policy/version, tolerance: 1}]}"]))
    assert changed.checkpoint.every == 1 and changed.guard.rules[0].metric == "policy/version"
    assert [(r.key, r.was) for r in records] == [("checkpoint.every", 50), ("guard", None)]


def test_the_verdict_needs_every_step_and_agreement_within_the_alarm_thresholds(tmp_path):
    """AR gaps 4e-3, 6e-3 (bf16 kernel noise) pass under 0.05; a decoder gap of 8.4e-4 (the old bf16
    merge's drift) fails against 1e-4, and so do a missing step and a never-logged metric."""
    config, records = rehearsal_config(load_config(CONFIGS / JOINT, root=tmp_path), tmp_path / "w")
    per_step = {1: {AR_AGREEMENT_METRIC: 4e-3, DECODER_AGREEMENT_METRIC: 0.0},
                2: {AR_AGREEMENT_METRIC: 6e-3, DECODER_AGREEMENT_METRIC: 8.4e-4}, 3: {}}
    report = Report(JOINT, "c.yaml", 1, 3, records, run_id="r", status="finished", exit_code=0, per_step=per_step,
                    agreement=agreements(config, per_step))
    ar, decoder = report.agreement
    assert (ar.policy, ar.precision, ar.tolerance, ar.max_abs_diff, ar.ok) == ("ar", "bf16", 0.05, 6e-3, True)
    assert (decoder.max_abs_diff, decoder.ok) == (8.4e-4, False)
    assert report.problems == ["decoder: sampler/learner log-probs differ by up to 0.00084 (diffusion/logprob_diff), "
                               "more than the bf16 tolerance 0.0001"]
    report.per_step = {1: per_step[1]}
    report.agreement = agreements(config, {1: {AR_AGREEMENT_METRIC: 4e-3}})
    assert report.problems == ["the run did not complete its 3 steps (exit 0, status finished, 1 steps logged)",
                               "decoder: diffusion/logprob_diff was never logged"]
    assert json.loads(json.dumps(report.to_json()))["ok"] is False


# ----- the rehearsals (slow) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One rehearsal folder for the module: the three GPU configs name the same model (BLIP3o-NEXT), so
    its tiny stand-in and the tiny GenEval models are built once, and vLLM's compile cache (keyed by the
    model's path) serves every run after the first."""
    return tmp_path_factory.mktemp("rehearsal")


def rehearse(work: Path, name: str, *extra: str, timeout: float = 1200) -> tuple[int, dict, str]:
    """`blip3o-rl rehearse` as a user runs it; (exit code, the --out report, console output)."""
    out = work / f"report-{name}.json"
    out.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "rehearse", "--config", str(CONFIGS / name),
                             "--workdir", str(work), "--out", str(out), *extra], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    console = result.stdout + result.stderr
    assert out.is_file(), console[-4000:]
    return result.returncode, json.loads(out.read_text()), console


def check_passed(report: dict, steps: list[int], policies: tuple[str, ...], measured: list[int] | None = None) -> None:
    """The run finished the steps with weights published every step, and each trained policy's
    sampler and learner agree on log-probs in bf16 within the stated tolerance, at the `measured`
    steps (default every step; in the async schedule only rows of the learner's own weights are)."""
    assert report["ok"] and report["problems"] == [], report["problems"]
    assert report["status"] == "finished" and sorted(map(int, report["per_step"])) == steps
    for step in steps:
        row = report["per_step"][str(step)]
        assert row["sync/gb_per_s"] > 0 and row["policy/version"] >= step
    assert sorted(report["agreement"]) == sorted(policies)
    for policy, metric in (("ar", AR_AGREEMENT_METRIC), ("decoder", DECODER_AGREEMENT_METRIC)):
        if policy in policies:
            agreement = report["agreement"][policy]
            assert agreement["metric"] == metric and agreement["precision"] == "bf16"
            assert sorted(map(int, agreement["per_step"])) == (measured or steps)  # measured at every update
            # the run's alarm thresholds (logging.alarms defaults): 0.05 AR, 1e-4 decoder
            assert agreement["tolerance"] == {"ar": 0.05, "decoder": 1e-4}[policy]
            assert agreement["max_abs_diff"] <= agreement["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [TEXT, EDIT])
def test_ar_only_gpu_config_rehearses(name, workdir):
    """The AR-only GPU configs: bf16 vLLM and DeepSpeed ZeRO-1 on 2 ranks, NCCL broadcast rehearsed on
    gloo, the config's scorers through Ray Serve, role resources on one node; 2 steps. The edit config's
    prompts hold the source's tiny TA-Tok ids (in bf16), its max_model_len 2048 as written. The text
    config runs the async schedule with 2 steps in flight (4 steps: rows 2 versions stale by step 3).
    The GenEval config is the text config's with another scorer (its tiny GenEval models through Serve
    run in the joint rehearsal below): bench/bench_rehearsal.py rehearses it, CI does not (time)."""
    if name == TEXT:
        steps = [1, 2, 3, 4]
        code, report, console = rehearse(workdir, name, "--steps", "4", "--set", "schedule.mode=async",
                                         "--set", "schedule.max_staleness=2")
        assert code == 0, console[-4000:]
        check_passed(report, steps, ("ar",), measured=[1])  # later rows were sampled by older weights
        staleness = [report["per_step"][str(s)]["schedule/staleness_max"] for s in steps]
        assert staleness == [0, 1, 2, 2] and report["per_step"]["1"]["schedule/in_flight_steps"] == 2
    else:
        code, report, console = rehearse(workdir, name, "--steps", "2")
        assert code == 0, console[-4000:]
        check_passed(report, [1, 2], ("ar",))
    written = yaml.safe_load((workdir / "config.yaml").read_text())
    assert (written["learner"]["precision"], written["rollout"]["engine"]["dtype"]) == ("bf16", "bfloat16")
    assert {s["key"] for s in report["substituted"]} >= {"learner.dist_backend", "model.path", "ray.address"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_joint_gpu_config_rehearses_across_two_nodes_with_a_rollback_and_a_resume(workdir):
    """The joint config on two Ray nodes (learners on one raylet, workers and the reward service on
    the other), both weight streams over broadcast into one decoder. A band guard on policy/version
    (centre 1, step 1's; +-0.5) fires at step 2: the run rolls back to the step-1 checkpoint (both
    learners, proven by sha256, served as v3 / transformer v3), redoes step 2 (v4), fires again and
    stops (exit 5, max_rollbacks 1). `--resume --steps 3` continues from the step-2 checkpoint (both
    streams published as v4), the excursion already reported, and finishes."""
    guard = ("guard={action: rollback, rollback: {max_rollbacks: 1, lr_scale: 0.5}, rules: [{kind: band, "
             "metric: policy/version, baseline_steps: 1, tolerance: 0.5, relative: false}]}")
    common = ("--nodes", "2", "--set", "checkpoint.every=1", "--set", guard)
    logs = workdir / "ray-logs"
    earlier = set(logs.iterdir()) if logs.is_dir() else set()
    code, report, console = rehearse(workdir, JOINT, "--steps", "2", *common)
    assert code == 5, console[-4000:]
    assert report["status"] == "stopped" and sorted(map(int, report["per_step"])) == [1, 2]
    rollbacks = [e for e in report["events"] if e.startswith("rollback:")]
    assert len(rollbacks) == 1 and "rollback 1/1 to step-000001" in rollbacks[0], report["events"]
    assert "policy sha256" in rollbacks[0] and "diffusion_policy sha256" in rollbacks[0]
    assert "served as v3, transformer v3" in rollbacks[0]
    assert report["per_step"]["2"]["policy/version"] == report["per_step"]["2"]["diffusion/version"] == 4

    code, report, console = rehearse(workdir, JOINT, "--steps", "3", "--resume", *common)
    assert code == 0, console[-4000:]
    check_passed(report, [1, 2, 3], ("ar", "decoder"))
    assert any(e.startswith("resume: weights v4, transformer v4 published") for e in report["events"]), report["events"]
    assert report["per_step"]["3"]["sync_diffusion/gb_per_s"] > 0
    # the placement: every learner rank on the second raylet, every worker and the reward replica on the head
    sessions = sorted(set(logs.iterdir()) - earlier)
    assert len(sessions) == 2  # one per invocation
    for session in sessions:
        actors = {node.name: {line.strip() for f in node.rglob("worker-*.out") for line in f.read_text().splitlines()
                              if line.startswith(":actor_name:")} for node in session.iterdir()}
        assert {":actor_name:LearnerRank", ":actor_name:DiffusionLearnerRank"} <= actors["node-1"]
        assert {":actor_name:ARRolloutWorker", ":actor_name:DiffusionDecoderWorker",
                ":actor_name:ServeReplica:rewards:rewards"} <= actors["node-0"]
        assert not any("Learner" in a for a in actors["node-0"]) and not any("Worker" in a for a in actors["node-1"])
