"""One step's rollouts as a Ray dataflow: sample -> decode -> score, pipelined per chunk of prompts.

    chunk 0:  generate(worker a) --> decode(decoder a) --> score (Ray task -> reward API)
    chunk 1:  generate(worker b) --> decode(decoder b) --> score
    ...
Each arrow passes an ObjectRef, so a chunk's decoding starts the moment its tokens exist, while
other chunks are still sampling; the driver only polls.
Row r of chunk c is sampled with seed step_seed + (first row of c) + r: the same rows as one big
request, whatever the chunking or the number of workers.

Faults are found per chunk by `poll_steps` (every step in flight at once; `PendingStep.poll`: one):
  died          the worker's process is gone (Ray restarts it, with the weights on disk);
  hung          a stage has been RUNNING for longer than the stage timeout. Time spent queued does
                not count: each worker (and the reward service) is a `Lane` that runs one task at
                a time, and only the task at its head has a clock (rl/run/lanes.py; one lane per
                worker for all the steps in flight, so a chunk queued behind another step's is not timed);
  stale_weights a worker answered with weights older than those the chunk was launched with, or a
                decoder with weights older than the tokens' (a restarted worker not reloaded yet);
  resample      the decoder already serves newer weights than the tokens were sampled with (a
                publish landed between the two stages): images are only ever rendered with the
                tokens' own version, so the chunk is sampled again with the current weights; also
                a finished chunk whose rows lag the learner by more than `schedule.max_staleness`
                versions (`PendingStep.too_old`, asked by the trainer before it trains on them).
The caller brings the workers back to the current weights (not needed for a resample) and calls
`redo`, which submits the chunk again from that stage. Same seed, same weights: redone work is the
same work, nothing is lost. Any other error of a stage is its own (a bug, bad input, out of memory,
a 4xx from the reward API): `poll` raises it as StageError, and the run stops.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from rewards.scorer import EditSource
from rl.prompts.edit import edit_source
from rl.prompts.sources import PromptItem, SamplerState
from rl.ray_tasks import ray_task
from rl.run.lanes import Lanes, Stage, StageTask
from rl.scoring.latency import request_latencies
from rl.scoring.reward_mix import MixedRewards, RewardComponentConfig, mix_rewards, resolve_mix
from rl.scoring.service import RewardEndpoint, SampleReward, ScoredImages, score_images
from rollout.pool import concat_batches
from rollout.records import RolloutBatch

if TYPE_CHECKING:
    from rollout.decoder_worker import DecodeInfo
    from rollout.diffusion_rollout import DiffusionRollout, SdeSampling


class RewardOutageError(RuntimeError):
    """The reward service stayed down for longer than the outage budget."""


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: distinct per step, reproducible per run (rows add their index)."""
    return (seed * 1_000_003 + step * 65_537) % (2**31 - 1)


@dataclass(frozen=True)
class ChunkImages:
    """A chunk's images, left in the object store: rows [first, first + rows) of the step."""

    first: int
    rows: int
    ref: Any
    """ObjectRef of the decoder's [rows, H, W, 3] uint8 array."""


def _concat_rollouts(group_offsets: list[int], *parts: DiffusionRollout) -> DiffusionRollout:
    """The step's SDE rollouts in row order, each chunk's prompt indices moved to the step's."""
    from dataclasses import replace

    from rollout.diffusion_rollout import DiffusionRollout

    moved = [replace(part, group_index=[g + offset for g in part.group_index])
             for part, offset in zip(parts, group_offsets)]
    return DiffusionRollout.concat(moved)


def diffusion_rollout_ref(parts: list[tuple[int, Any]]):
    """ObjectRef of the step's `DiffusionRollout`, from each chunk's (first prompt, rollout ref): a
    Ray task concatenates them, so the latents and hidden states never reach the driver."""
    return ray_task(_concat_rollouts, num_cpus=0).remote([offset for offset, _ in parts], *[ref for _, ref in parts])


def _take_rows(images: np.ndarray, rows: list[int]) -> np.ndarray:
    return images[rows]  # [len(rows), H, W, 3]


def fetch_rows(chunks: list[ChunkImages], rows: list[int]) -> list[np.ndarray]:
    """The images [H, W, 3] of the step's `rows`, in that order. Only those rows reach the driver:
    a task placed by Ray next to each chunk's images (data locality) cuts them out."""
    import ray

    take_rows = ray_task(_take_rows, num_cpus=0)
    wanted = sorted(set(rows))
    refs, order = [], []
    for chunk in chunks:
        local = [row - chunk.first for row in wanted if chunk.first <= row < chunk.first + chunk.rows]
        if local:
            refs.append(take_rows.remote(chunk.ref, local))
            order.extend(chunk.first + r for r in local)
    if len(order) != len(wanted):
        raise IndexError(f"rows {sorted(set(wanted) - set(order))} are in no chunk of the step")
    fetched = [image for part in ray.get(refs) for image in part]
    by_row = dict(zip(order, fetched))
    return [by_row[row] for row in rows]


@dataclass
class ScoredStep:
    """Everything a step sampled, rendered and scored, row for row."""

    items: list[PromptItem]
    """One per group (prompt)."""
    batch: RolloutBatch
    images: list[ChunkImages]
    """Where the images are (the object store, chunk by chunk): `sample_images` fetches a few rows."""
    rewards: list[SampleReward]
    """Each row's breakdown: its task reward's details and every component's raw reward."""
    mixed: MixedRewards
    """The total the run trains on and its components (rl/scoring/reward_mix.py)."""
    timings: dict[str, float]
    """Busy seconds per stage summed over chunks (rollout, decode, reward) and the wall time (collect)."""
    retried_requests: list[str] = field(default_factory=list)
    """Reward requests that failed and were retried (replica restarts, blips)."""
    diffusion_parts: list[tuple[int, Any]] = field(default_factory=list)
    """With SDE decoding (the diffusion learner trains): each chunk's (first prompt, ObjectRef of its
    `DiffusionRollout`); `diffusion_rollout_ref` joins them for the learner."""
    reward_latency: dict[str, list[float]] = field(default_factory=dict)
    """Each reward component's request round trips (s), one per chunk it scored (rl/scoring/latency.py)."""
    row_versions: list[int] = field(default_factory=list)
    """The policy version that sampled each row (its chunk's; `batch.policy_version` is the oldest)."""

    def diffusion_rollout(self):
        """ObjectRef of the step's `DiffusionRollout`, row for row with `batch` (SDE decoding only)."""
        if not self.diffusion_parts:
            raise RuntimeError("this step was decoded without the SDE sampler: it has no diffusion rollout")
        return diffusion_rollout_ref(self.diffusion_parts)

    def reward_tensor(self) -> torch.Tensor:
        """The reward GRPO trains on: the mix's total (the task reward without `rewards.mix`)."""
        return torch.tensor(self.mixed.total, dtype=torch.float32)  # [R]

    def sample_images(self, rows: list[int]) -> list[np.ndarray]:
        """The images [H, W, 3] uint8 of these rows of the step (only they travel to the driver)."""
        return fetch_rows(self.images, rows)


def _score(endpoint: RewardEndpoint, images: np.ndarray, items: list[PromptItem],
           sources: list[EditSource] | None = None) -> ScoredImages:
    """The scoring task's body: the run's reward mix over one chunk's images (edits: with each row's source)."""
    return score_images(endpoint, images, items, endpoint.mix, sources)


def _remote_score_task():
    """The scoring Ray task (no CPU reserved: it waits on HTTP; retried if its process crashes)."""
    return ray_task(_score, num_cpus=0, max_retries=3)


FaultKind = Literal["died", "hung", "stale_weights", "resample"]
STAGES: tuple[Stage, ...] = ("rollout", "decode", "reward")


class StageError(RuntimeError):
    """A stage's own error (a bug, bad input, out of memory, a 4xx from the reward API): trying
    again would fail the same way, so the run stops (with a checkpoint)."""

    def __init__(self, chunk: int, stage: Stage, cause: BaseException):
        first_line = (str(cause).strip().splitlines() or [""])[0][:300]
        super().__init__(f"chunk {chunk} {stage}: {type(cause).__name__}: {first_line}")
        self.chunk, self.stage, self.cause = chunk, stage, cause


@dataclass(frozen=True)
class ChunkResult:
    """A finished chunk: its tokens, their images (rendered with the tokens' version) and rewards."""

    batch: RolloutBatch
    decoded: DecodeInfo
    images_ref: Any
    """The images themselves stay in the object store."""
    scored: ScoredImages
    diffusion_ref: Any = None
    """SDE decoding: the chunk's `DiffusionRollout`, also left in the object store."""


@dataclass
class Chunk:
    """A few prompts' groups on their way through one sampler and one decoder."""

    index: int
    start: int
    """Index of the chunk's first prompt in the step."""
    items: list[PromptItem]
    seed: int
    sampler: Any
    """ARRolloutActor handle."""
    decoder: Any
    """DiffusionDecoderActor handle."""
    launched_version: int
    """The policy version every worker served when the chunk was submitted."""
    launched_decoder_version: int = 0
    """The SANA transformer version every decoder served then (checked with SDE decoding only)."""
    rollout_ref: Any = None
    decode_ref: Any = None
    """The decode's `DecodeInfo` (small: what the driver reads)."""
    images_ref: Any = None
    """The decode's images (read by the scoring task only)."""
    diffusion_ref: Any = None
    """SDE decoding: the decode's `DiffusionRollout` (read by the diffusion learner only)."""
    score_ref: Any = None
    attempts: int = 0
    """Tries that count against `faults.max_chunk_attempts` (a resample is not a failure)."""
    result: ChunkResult | None = None
    sources: list[EditSource] | None = None
    """Edits: the sources' pixels, read on the first submit (a redo sends the same arrays)."""

    def ref(self, stage: Stage):
        return {"rollout": self.rollout_ref, "decode": self.decode_ref, "reward": self.score_ref}[stage]

    def edit_sources(self) -> list[EditSource]:
        """The pixels of the chunk's edit sources (none for text to image: a run's prompts are all one kind)."""
        if self.sources is None:
            self.sources = [edit_source(item.edit) for item in self.items] if self.items[0].edit else []
        return self.sources


@dataclass(frozen=True)
class ChunkFault:
    chunk: int
    stage: Stage
    """The stage to redo the chunk from."""
    kind: FaultKind
    detail: str
    actor: Any
    """The worker at fault (None for the reward stage and for a resample)."""
    attempts: int
    """Tries of this chunk so far (resamples not counted)."""
    step: int = 0
    """The step the chunk belongs to (several are in flight in the async schedule)."""

    def describe(self) -> str:
        if self.kind == "resample":
            return f"chunk {self.chunk}: {self.detail}; sampling it again with the current weights"
        return f"chunk {self.chunk} {self.stage}: worker {self.kind} ({self.detail}); try {self.attempts} failed"


def _cause(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's RayTaskError."""
    return getattr(error, "cause", None) or error


class PendingStep:
    """A step whose chunks are in flight; `poll` until `done`, then `result`."""

    def __init__(self, items: list[PromptItem], group_size: int, seed: int, rollout_actors: list,
                 decoder_actors: list, endpoint: RewardEndpoint, chunk_prompts: int, policy_version: int,
                 sampler_state: SamplerState, sde: SdeSampling | None = None, decoder_version: int = 0,
                 step: int = 0, lanes: Lanes | None = None):
        """`sde`: decode with the SDE sampler (`decode_sde_split`) and keep each chunk's
        `DiffusionRollout` for the diffusion learner; every decoder must then serve transformer
        `decoder_version`. `lanes`: the lanes it shares with the other steps in flight (None: its own)."""
        self.items, self.group_size, self.seed, self.endpoint = items, group_size, seed, endpoint
        self.sde, self.step = sde, step
        self.sampler_state = copy.deepcopy(sampler_state)
        """The prompt sampler's state before this step drew its prompts (to give them back if it is abandoned)."""
        self.launched_at = time.perf_counter()
        self.chunks = [
            Chunk(index=c, start=start, items=items[start : start + chunk_prompts], seed=seed + start * group_size,
                  sampler=rollout_actors[c % len(rollout_actors)], decoder=decoder_actors[c % len(decoder_actors)],
                  launched_version=policy_version, launched_decoder_version=decoder_version)
            for c, start in enumerate(range(0, len(items), chunk_prompts))
        ]
        self.lanes = lanes if lanes is not None else Lanes(rollout_actors, decoder_actors)
        self.error: StageError | RewardOutageError | None = None
        """The first stage's own error or reward outage `check` found: raised when the step is waited for
        (not while an earlier step is: that one still trains)."""
        for chunk in self.chunks:
            self._submit(chunk, "rollout")

    def _submit(self, chunk: Chunk, stage: Stage, counts: bool = True) -> None:
        """(Re)submit `chunk` from `stage` on: later stages chain on the earlier refs."""
        # edits: the sources' pixels, not their paths, leave the driver (the workers and the scoring task
        # may run on other nodes)
        sources = chunk.edit_sources()
        if stage == "rollout":
            captions = [item.caption for item in chunk.items]
            edits = {"sources": [source.image for source in sources]} if sources else {}
            chunk.rollout_ref = chunk.sampler.generate.remote(captions, self.group_size, chunk.seed, **edits)
            self.lanes.of(chunk.sampler).tasks.append(StageTask(self, chunk.index, "rollout", chunk.rollout_ref))
        if stage in ("rollout", "decode"):
            if self.sde is None:
                chunk.decode_ref, chunk.images_ref = chunk.decoder.decode_split.remote(chunk.rollout_ref, chunk.seed)
            else:
                chunk.decode_ref, chunk.images_ref, chunk.diffusion_ref = chunk.decoder.decode_sde_split.remote(
                    chunk.rollout_ref, chunk.seed, self.sde)
            self.lanes.of(chunk.decoder).tasks.append(
                StageTask(self, chunk.index, "decode", chunk.decode_ref, after=chunk.rollout_ref))
        row_items = [item for item in chunk.items for _ in range(self.group_size)]
        row_sources = {"sources": [source for source in sources for _ in range(self.group_size)]} if sources else {}
        chunk.score_ref = _remote_score_task().remote(self.endpoint, chunk.images_ref, row_items, **row_sources)
        chunk.attempts += int(counts)

    @property
    def done(self) -> bool:
        return all(chunk.result is not None for chunk in self.chunks)

    def open_refs(self, stage: Stage) -> list:
        """The `stage` results of the chunks not finished yet (what a poll waits for)."""
        return [chunk.ref(stage) for chunk in self.chunks if chunk.result is None and chunk.ref(stage) is not None]

    def sampled(self, ready: set) -> bool:
        """Every chunk's images exist: nothing of this step is left on a worker, only rewards may be."""
        return all(chunk.result is not None or chunk.decode_ref in ready for chunk in self.chunks)

    def refs(self) -> list:
        """Every ref of its unfinished chunks (what `ready_refs` asks Ray about)."""
        return [chunk.ref(stage) for chunk in self.chunks if chunk.result is None for stage in STAGES]

    def poll(self, stage_timeout_s: float, wait_s: float = 1.0) -> list[ChunkFault]:
        """This step alone (`poll_steps`): wait up to `wait_s` for its rewards; the faults found. Raises
        RewardOutageError when the reward service stayed down past its budget, and StageError for a
        stage's own error (not fixed by trying again)."""
        faults = poll_steps([self], self.lanes, stage_timeout_s, self.open_refs("reward"), wait_s)
        if self.error is not None:
            raise self.error
        return faults

    def check(self, ready: set) -> list[ChunkFault]:
        """Each unfinished chunk's stages that finished: its fault (at most one), its result stored, or
        its error kept in `error`."""
        faults = []
        for chunk in (c for c in self.chunks if c.result is None):
            try:
                fault = self._check(chunk, ready)
            except (StageError, RewardOutageError) as error:
                self.error = self.error or error
                continue
            faults += [fault] if fault is not None else []
        self._queue_rewards(ready)
        return faults

    def _ready(self) -> set:
        return ready_refs([self], self.lanes)

    def drain(self, stage_timeout_s: float, wait_s: float = 0.2) -> list:
        """This step alone: `drain_steps`."""
        return drain_steps([self], self.lanes, stage_timeout_s, wait_s)

    def _queue_rewards(self, ready: set) -> None:
        """The reward service takes a chunk once its images exist: it joins the reward lane."""
        queued = {task.ref for task in self.lanes.reward.tasks}
        for chunk in self.chunks:
            if chunk.result is None and chunk.decode_ref in ready and chunk.score_ref not in queued:
                self.lanes.reward.tasks.append(StageTask(self, chunk.index, "reward", chunk.score_ref))
                queued.add(chunk.score_ref)

    def _check(self, chunk: Chunk, ready: set) -> ChunkFault | None:
        """The chunk's finished stages, in order: a fault, its result, or None while it runs."""
        import ray
        from ray.exceptions import RayActorError

        from rewards.client import RewardServerError
        from rollout.decoder_worker import DecoderVersionError

        def fault(stage: Stage, kind: FaultKind, detail: str, actor) -> ChunkFault:
            return ChunkFault(chunk.index, stage, kind, detail, actor, chunk.attempts, self.step)

        if chunk.rollout_ref not in ready:
            return None
        try:
            batch: RolloutBatch = ray.get(chunk.rollout_ref)
        except RayActorError as error:
            return fault("rollout", "died", str(error).splitlines()[0][:200], chunk.sampler)
        except Exception as error:
            raise StageError(chunk.index, "rollout", _cause(error)) from None
        if batch.policy_version < chunk.launched_version:
            return fault("rollout", "stale_weights", f"served v{batch.policy_version}, launched at "
                                                     f"v{chunk.launched_version}", chunk.sampler)
        if chunk.decode_ref not in ready:
            return None
        try:
            decoded: DecodeInfo | None = ray.get(chunk.decode_ref)
            served = decoded.policy_version
        except RayActorError as error:
            return fault("decode", "died", str(error).splitlines()[0][:200], chunk.decoder)
        except Exception as error:
            if not isinstance(_cause(error), DecoderVersionError):
                raise StageError(chunk.index, "decode", _cause(error)) from None
            served, decoded = _cause(error).served, None
        # The images must come from the weights the tokens were sampled with (the decoder's
        # hidden states condition SANA): a publish between the two stages breaks that.
        if served < batch.policy_version:  # a restarted decoder that was not reloaded yet
            return fault("decode", "stale_weights", f"decoder serves v{served}, tokens are "
                                                    f"v{batch.policy_version}", chunk.decoder)
        if served > batch.policy_version:  # new weights landed on the decoder after sampling
            return fault("rollout", "resample", f"tokens sampled at v{batch.policy_version}, decoder serves "
                                                f"v{served}", None)
        # SDE rollouts train the transformer version the step was launched with (on-policy): a
        # restarted decoder serves the weights on disk until recovery publishes the current ones
        if self.sde is not None and decoded.decoder_version != chunk.launched_decoder_version:
            return fault("decode", "stale_weights", f"decoder serves transformer v{decoded.decoder_version}, the "
                                                    f"step needs v{chunk.launched_decoder_version}", chunk.decoder)
        if chunk.score_ref not in ready:
            return None
        try:
            scored: ScoredImages = ray.get(chunk.score_ref)
        except Exception as error:
            if isinstance(error, RewardServerError) or isinstance(_cause(error), RewardServerError):
                raise RewardOutageError(str(_cause(error)).strip().splitlines()[-1]) from None
            raise StageError(chunk.index, "reward", _cause(error)) from None
        chunk.result = ChunkResult(batch, decoded, chunk.images_ref, scored, chunk.diffusion_ref)
        return None

    def too_old(self, learner_version: int, max_staleness: int) -> list[ChunkFault]:
        """Resamples of the finished chunks whose rows lag `learner_version` by more than
        `max_staleness` versions (never trained on: `redo` samples them again with the current weights)."""
        return [ChunkFault(chunk.index, "rollout", "resample", f"its rows of v{chunk.result.batch.policy_version} are "
                           f"{learner_version - chunk.result.batch.policy_version} versions behind the learner's "
                           f"v{learner_version} (max_staleness {max_staleness})", None, chunk.attempts, self.step)
                for chunk in self.chunks
                if chunk.result is not None and learner_version - chunk.result.batch.policy_version > max_staleness]

    def rows(self, chunk: int) -> int:
        return len(self.chunks[chunk].items) * self.group_size

    def redo(self, fault: ChunkFault) -> None:
        """Submit the faulty chunk again from the failed stage (the workers must serve current
        weights). Its superseded tasks that have not started are cancelled; a resample samples
        with whatever the sampler serves now, and does not count as a failed try."""
        import ray

        chunk = self.chunks[fault.chunk]
        chunk.result = None
        for stage in STAGES[STAGES.index(fault.stage):]:
            if chunk.ref(stage) is not None:
                ray.cancel(chunk.ref(stage))
        self._submit(chunk, fault.stage, counts=fault.kind != "resample")

    def result(self) -> ScoredStep:
        """The step, row for row in prompt order; every row of every chunk, or an error."""
        if not self.done:
            raise RuntimeError("result() before every chunk finished")
        parts = [chunk.result.batch for chunk in self.chunks]
        decoded = [chunk.result.decoded for chunk in self.chunks]
        scored = [chunk.result.scored for chunk in self.chunks]
        batch = concat_batches(parts, [chunk.start for chunk in self.chunks], self.seed)
        images, first = [], 0
        for chunk in self.chunks:
            images.append(ChunkImages(first, chunk.result.decoded.rows, chunk.result.images_ref))
            first += chunk.result.decoded.rows
        rewards = [r for s in scored for r in s.rewards]
        rows = len(self.items) * self.group_size
        if not (len(batch.prompt_ids) == first == len(rewards) == rows):
            raise RuntimeError(f"step lost rows: {len(batch.prompt_ids)} rollouts, {first} images, "
                               f"{len(rewards)} rewards for {rows} rows")
        timings = {
            "rollout": sum(p.timings.get("generate", 0.0) for p in parts),
            "decode": sum(d.timings.get("decode_total", sum(d.timings.values())) for d in decoded),  # not total + stages
            "reward": sum(s.seconds for s in scored),
            "collect": time.perf_counter() - self.launched_at,
        }
        retried = [failure for s in scored for failure in s.failures]
        mixed = step_mix(resolve_mix(self.endpoint.mix, {item.task for item in self.items}), rewards, scored,
                         batch.group_index)
        diffusion = [(chunk.start, chunk.result.diffusion_ref) for chunk in self.chunks] if self.sde else []
        row_versions = [part.policy_version for part in parts for _ in part.prompt_ids]
        return ScoredStep(self.items, batch, images, rewards, mixed, timings, retried, diffusion,
                          reward_latency=request_latencies(scored), row_versions=row_versions)


def ready_refs(steps: list[PendingStep], lanes: Lanes) -> set:
    """Every ref of these steps and of the lanes that has a value or an error now (one call for all)."""
    import ray

    refs = [ref for step in steps for ref in step.refs()] + lanes.refs()
    refs = list(dict.fromkeys(ref for ref in refs if ref is not None))
    if not refs:
        return set()
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return set(ready)


def poll_steps(steps: list[PendingStep], lanes: Lanes, stage_timeout_s: float, wait_for: list,
               wait_s: float = 1.0) -> list[ChunkFault]:
    """Wait up to `wait_s` for every ref of `wait_for`, then look at every step in flight: the faults
    found (each chunk at most one), each naming its step. Every step is looked at, whichever one the
    caller waits for: a chunk redone behind another step's hung chunk would otherwise wait forever.
    A stage's own error or a reward outage is kept in its step's `error` (the caller raises it)."""
    import ray

    if wait_for:
        ray.wait(wait_for, num_returns=len(wait_for), timeout=wait_s)
    now = time.perf_counter()
    ready = ready_refs(steps, lanes)
    faults = {(id(step), fault.chunk): fault for step in steps for fault in step.check(ready)}
    for lane in lanes.all():
        head = lane.running(ready, now)
        if (head is None or now - lane.head_since <= stage_timeout_s or head.owner not in steps
                or (id(head.owner), head.chunk) in faults):
            continue
        busy_for, attempts, step = now - lane.head_since, head.owner.chunks[head.chunk].attempts, head.owner.step
        if lane.actor is None:
            ray.cancel(head.ref, force=True)
            fault = ChunkFault(head.chunk, "reward", "hung", f"no rewards after {busy_for:.0f} s", None, attempts, step)
        else:
            fault = ChunkFault(head.chunk, head.stage, "hung", f"no answer after {busy_for:.0f} s", lane.actor,
                               attempts, step)
        faults[(id(head.owner), head.chunk)] = fault
    return list(faults.values())


def drain_steps(steps: list[PendingStep], lanes: Lanes, stage_timeout_s: float, wait_s: float = 0.2) -> list:
    """Wait out dropped steps (a guard rollback drops every step in flight): none of their tasks may
    keep a worker or the reward service busy in front of the next steps', whose stage clocks would
    start behind them (a false hang). Each task is timed like a stage, from when it can run. Returns
    the workers whose task ran past `stage_timeout_s` (hung: the caller restarts them); a hung reward
    task is no longer waited for.

    Why not `ray.cancel` (Ray 2.60, measured here): a synchronous actor runs its queued tasks
    anyway; cancelling an actor task not sent yet (a decode waiting for its tokens) leaves a gap in
    the driver's sequence numbers that stalls the actor's later tasks for 30 s, then fails them;
    and cancelling a scoring task waiting for its images aborted the driver when the images came
    (reference counter check failure). Draining costs at most the dropped steps' own sampling time."""
    import ray

    hung: list = []
    while True:
        ready, now = ready_refs(steps, lanes), time.perf_counter()
        for step in steps:
            step._queue_rewards(ready)
        running = [lane for lane in lanes.all() if lane not in hung and lane.running(ready, now)]
        hung += [lane for lane in running if now - lane.head_since > stage_timeout_s]
        heads = [lane.tasks[0].ref for lane in running if lane not in hung]
        if not heads:  # all done, or the rest waits for a hung worker's output
            return [lane.actor for lane in hung if lane.actor is not None]
        ray.wait(heads, num_returns=1, timeout=wait_s, fetch_local=False)


def step_mix(components: tuple[RewardComponentConfig, ...], rewards: list[SampleReward], scored: list[ScoredImages],
             group_index: list[int]) -> MixedRewards:
    """The step's total from its rows' raw component rewards (groups never straddle chunks, but
    normalizing over the whole step's rows by group is the same and simpler); a component answered
    by different scorer versions in different chunks keeps them all, joined with "|"; each
    component's regions (spatial credit) row for row."""
    raw = {c.name: np.array([r.scores.get(c.name, np.nan) for r in rewards], dtype=np.float64) for c in components}
    regions = {c.name: [r.regions.get(c.name, ()) for r in rewards] for c in components}
    versions: dict[str, str] = {}
    for c in components:
        seen = sorted({s.versions[c.name] for s in scored if c.name in s.versions})
        if seen:
            versions[c.name] = "|".join(seen)
    return mix_rewards(components, raw, group_index, versions, regions)
