"""Checkpoints: one save/load interface for everything a resumed run needs.

    <run_dir>/checkpoints/
        step-000010/
            trainer.json     TrainerState: step, policy version, prompt-sampler cursors, run id
            learner/         the learner's own files (DeepSpeed engine, optimizer, scheduler, RNG)
              parts/rank-K.json   rank K's commit: the files it wrote, with their sizes
            policy/          the AR policy as a Hugging Face directory: vLLM and transformers load it
            manifest.json    every file of the checkpoint and its size, written by the driver last
        latest               name of the newest COMPLETE checkpoint
        best.json            {"step", "score"}: the checkpoint of the best in-run eval so far, kept by pruning
        guard.json           the reward-hacking guard's state (rl/guard/rules.py), rewritten after each
                             checkpoint and rollback; a resume drops what it saw after its step

A checkpoint is written into a temp folder and renamed into place, and `latest` is replaced
atomically after that, so a run killed mid-save resumes from the previous complete checkpoint.
`best.json` is written the same way (temp file + rename) after the checkpoint it names is committed.

Several nodes: every learner rank writes its own ZeRO shards and then commits its part (fsync,
then `parts/rank-K.json`). The driver commits the checkpoint only once it sees every rank's part
and every file a part lists, at its size: the folder must be on a filesystem shared by the learner
nodes and the driver, which the run proves at start (`write_probe` on each rank, `check_probes` on
the driver) or refuses. A resume takes a checkpoint only if every file of its manifest is there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl.prompts.sources import SamplerState

LATEST = "latest"
BEST_FILE = "best.json"
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be committed: a rank's part is missing or differs from what it wrote."""


def rank_files(directory: Path, rank: int) -> dict[str, int]:
    """The files of DeepSpeed's checkpoint in `directory` that `rank` wrote, with their sizes:
    its own ZeRO shards (`zero_pp_rank_<rank>_...`); rank 0 also the shared ones (model states,
    DeepSpeed's `latest`)."""
    mine = f"zero_pp_rank_{rank}_"
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not path.is_file() or relative.startswith(PARTS_DIR + "/"):
            continue
        if mine in path.name or (rank == 0 and "zero_pp_rank_" not in path.name):
            files[relative] = path.stat().st_size
    return files


def commit_rank_part(directory: Path, rank: int) -> dict[str, int]:
    """Rank `rank`'s commit of its part of a checkpoint in `directory`: its files are flushed to
    disk, then `parts/rank-<rank>.json` lists them (written last, so it never names a missing file)."""
    files = rank_files(directory, rank)
    for relative in files:
        with open(Path(directory) / relative, "rb") as handle:
            os.fsync(handle.fileno())
    parts = Path(directory) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": files}))
    os.replace(tmp, parts / f"rank-{rank}.json")
    return files


def check_rank_parts(directory: Path, world_size: int) -> None:
    """CheckpointError unless the driver sees every rank's part and every file it lists, at its size."""
    problems = []
    for rank in range(world_size):
        part = Path(directory) / PARTS_DIR / f"rank-{rank}.json"
        if not part.is_file():
            problems.append(f"rank {rank} committed no part ({part} not visible here)")
            continue
        for relative, size in json.loads(part.read_text())["files"].items():
            path = Path(directory) / relative
            if not path.is_file() or path.stat().st_size != size:
                problems.append(f"rank {rank}: {relative} is {'missing' if not path.is_file() else 'a different size'}")
    if problems:
        raise CheckpointError(f"checkpoint in {directory} is incomplete: " + "; ".join(problems[:5]))


def write_probe(root: Path, rank: int, nonce: str) -> str:
    """Run on a learner rank: write `<root>/.probe-<nonce>-rank-<rank>` holding its host name."""
    host = socket.gethostname()
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / f".probe-{nonce}-rank-{rank}").write_text(host)
    return host


def check_probes(root: Path, hosts: list[str], nonce: str) -> None:
    """Run on the driver after every rank's `write_probe`: CheckpointError naming
    the ranks whose file it cannot read (the checkpoint folder is not shared with their node)."""
    unseen = []
    for rank, host in enumerate(hosts):
        probe = Path(root) / f".probe-{nonce}-rank-{rank}"
        if not probe.is_file() or probe.read_text() != host:
            unseen.append(f"rank {rank} on {host}")
        probe.unlink(missing_ok=True)
    if unseen:
        raise CheckpointError(f"checkpoints need {root} on a filesystem shared by the driver "
                              f"({socket.gethostname()}) and every learner node, but the driver cannot see the "
                              f"files written there by {', '.join(unseen)}; mount one shared volume at that path "
                              "(docs/deploying.md, \"Where a run's files go\")")


@dataclass
class TrainerState:
    """The driver's state after a completed step."""

    step: int
    """Last completed step (0 = none)."""
    policy_version: int
    """AR weight version after that step's update."""
    run_id: str
    sampler: SamplerState = field(default_factory=SamplerState)
    decoder_version: int = 0
    """SANA transformer version after that step (the diffusion learner's; 0 while it is frozen)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        raw = json.loads(text)
        raw["sampler"] = SamplerState(**raw["sampler"])
        return cls(**raw)


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint of the best in-run eval so far (`best.json`)."""

    step: int
    score: float
    """The eval's score (rl/evaluation/in_run.py: GenEval overall, OCR mean reward); higher is better."""


class CheckpointDir:
    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def begin(self, step: int) -> Path:
        """A fresh temp folder to write step `step` into; `commit` makes it the latest."""
        tmp = self.root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: TrainerState, learner_ranks: int = 0, diffusion_ranks: int = 0) -> Path:
        """Make `tmp` step `state.step`'s checkpoint, once each of `learner_ranks` ranks committed its
        part of `tmp/learner` and each of `diffusion_ranks` its part of `tmp/diffusion_learner` (the
        diffusion learner's, beside the AR one; CheckpointError otherwise); the manifest lists every file."""
        if learner_ranks:
            check_rank_parts(tmp / "learner", learner_ranks)
        if diffusion_ranks:
            check_rank_parts(tmp / "diffusion_learner", diffusion_ranks)
        (tmp / TRAINER_FILE).write_text(state.to_json())
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"step": state.step, "learner_ranks": learner_ranks,
                                                     "files": files}, indent=1))
        final = self.path_for(state.step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint; None if there is none. CheckpointError if the newest one
        lost files since its manifest was written (a resume from it would not be exact)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / TRAINER_FILE).is_file():
            return None
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        """CheckpointError unless every file of the manifest at `path` is there, at its size."""
        manifest = path / MANIFEST_FILE
        if not manifest.is_file():
            raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE}: it was not committed completely")
        wrong = [relative for relative, size in json.loads(manifest.read_text())["files"].items()
                 if not (path / relative).is_file() or (path / relative).stat().st_size != size]
        if wrong:
            raise CheckpointError(f"checkpoint {path} is damaged: {len(wrong)} files missing or changed since it "
                                  f"was committed, e.g. {wrong[:3]}")

    def load_state(self, path: Path) -> TrainerState:
        return TrainerState.from_json((path / TRAINER_FILE).read_text())

    def complete_steps(self) -> list[int]:
        """Steps that have a committed checkpoint (trainer.json present), oldest first."""
        names = (p.name.removeprefix("step-") for p in self.root.glob("step-*") if (p / TRAINER_FILE).is_file())
        return sorted(int(name) for name in names if name.isdigit())

    def discard_after(self, step: int) -> None:
        """A rollback to step `step`'s checkpoint: `latest` names it (first, atomically), then the
        checkpoints of later steps are deleted; the run redoes those steps, so a resume must not
        land on the abandoned ones."""
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(self.path_for(step).name)
        os.replace(pointer, self.root / LATEST)
        for later in (s for s in self.complete_steps() if s > step):
            shutil.rmtree(self.path_for(later), ignore_errors=True)

    def mark_best(self, step: int, score: float) -> None:
        """Pin step `step`'s committed checkpoint as the best-eval one (replacing the previous best,
        which pruning may then delete). CheckpointError if that checkpoint is not complete."""
        self.verify(self.path_for(step))
        tmp = self.root / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(BestCheckpoint(step, float(score)))))
        os.replace(tmp, self.root / BEST_FILE)
        self._prune()

    def best_record(self) -> BestCheckpoint | None:
        """Step and score of the best-eval checkpoint; None before the first `mark_best`."""
        path = self.root / BEST_FILE
        return BestCheckpoint(**json.loads(path.read_text())) if path.is_file() else None

    def best(self) -> Path | None:
        """The best-eval checkpoint (what a rollback restores); None if none was marked. CheckpointError
        if it lost files since it was committed."""
        record = self.best_record()
        if record is None:
            return None
        path = self.path_for(record.step)
        self.verify(path)
        return path

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the best-eval one."""
        complete = self.complete_steps()
        best = self.best_record()
        for step in complete[: -self.keep_last] if self.keep_last > 0 else []:
            if best is None or step != best.step:
                shutil.rmtree(self.path_for(step), ignore_errors=True)


def _hash_tensors(tensors) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of (name, tensor) pairs, in the order given."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(named: dict) -> str:
    """sha256 of a state dict's tensors, sorted by name, without tied aliases (a tensor at the same
    address and shape as an earlier one: an export does not write it). Equal digests of this and
    `policy_digest`: bit-identical weights."""
    distinct, seen = {}, set()
    for name, tensor in named.items():  # state-dict order: a tied alias (lm_head) comes after its weight
        key = (tensor.data_ptr(), tuple(tensor.shape))  # not the storage: ZeRO views one flat buffer
        if key not in seen:
            seen.add(key)
            distinct[name] = tensor
    return _hash_tensors((name, distinct[name]) for name in sorted(distinct))


def policy_digest(policy_dir: Path) -> str:
    """`weights_digest` of a checkpoint's exported policy (its safetensors files), read one tensor at
    a time (never the whole model in memory)."""
    from safetensors import safe_open

    where = {}
    for path in sorted(Path(policy_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            where.update({name: path for name in handle.keys()})
    if not where:
        raise CheckpointError(f"{policy_dir} holds no safetensors weights")

    def tensors():
        for name in sorted(where):
            with safe_open(str(where[name]), framework="pt") as handle:
                yield name, handle.get_tensor(name)

    return _hash_tensors(tensors())
