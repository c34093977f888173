"""`synthesize` end to end with a real pretrained model: synthesis -> filters -> KardiaBench file ->
validate-data -> split by the evaluator's verdicts -> a short SFT on the easy turns.

Roles: U is the real SmolLM2-135M-Instruct (hf engine, sampled); R is a deterministic scripted evaluator
behind the same client interface as the real backends (FAIL on the first attempt of every turn, so every turn
is revised at least once; then PASS in the first exchange and, in the second, FAIL once more and SOLVED).
A is the tiny policy after its short SFT (fixture `sft_model_dir`, hf engine, sampled), NOT SmolLM2: the
base SmolLM2 cannot write the four spans (0 well-formed answers of 16 sampled at temperature 0.7 on bundled
prompts, measured 2026-11-30), so every one of its turns would end as a format failure and the structural
filter would drop every dialogue; it learns the format only through SFT (conf/smollm2.yaml), too slow for a
test: after conf/smollm2.yaml's SFT (30 LoRA steps, ~16 min here) SmolLM2 as A passes this whole test (2 of 3
dialogues kept, verdicts FAIL 11 / PASS 2 / SOLVED 2, 1 easy and 3 hard turns; 151 s; 2026-11-30); after 8 or 16 steps
(2-4 min) it wrote emotion words outside the label set or broke spans on revisions, and every dialogue was
dropped. Set KARDIA_TEST_SYNTH_RESPONDER=DIR (e.g. runs/smollm2/sft_model) to run A on such a model.
The SFT at the end trains SmolLM2 (LoRA, 2 steps) on the synthesised easy turns.

Slow (marked `slow`): 83 s on 2 cores at load average ~4, 432 s at load average 15-25 (other jobs); fixtures
cached. The run is repeatable: 3 dialogues kept, verdicts FAIL 12 / PASS 3 / SOLVED 3, 3 easy and 3 hard turns.
The split uses the default tau = 0.5 (rate >= tau is easy), so a turn passed after one FAIL (p_FAIL = 0.5)
is easy; under the paper's strict p_FAIL < 0.5 (tau 0.501) a turn is easy only when it never failed.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest

from kardia_rl.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Profiles state no age, occupation or name and the situations use no pronouns: the small simulator invents
# such details freely, and the identity-drift filter would (rightly) drop those dialogues; this test is about
# the plumbing, the filters have their own tests (tests/test_synth_filters.py).
PROFILES = [
    {"username": "quiet_reader", "mbti": "INFJ", "about": "I love long walks by the lake and baking bread.",
     "signature": "Be gentle.", "recent_activities": "Posted a photo of a sourdough loaf."},
    {"username": "trail_runner", "mbti": "ESTP", "about": "Weekends are for trail running and camping with friends.",
     "signature": "Keep moving.", "recent_activities": "Asked for advice on a first marathon."},
    {"username": "night_owl", "mbti": "INTP", "about": "I build model trains and read science fiction late at night.",
     "signature": "Curious about everything.", "recent_activities": "Shared a tiny railway bridge build."},
]
SEEDS = [
    {"situation": "A close friend moved abroad last week and the apartment feels empty.", "emotion": "lonely"},
    {"situation": "A long-awaited job interview is tomorrow morning.", "emotion": "anxious"},
    {"situation": "An old letter from a grandparent turned up while cleaning the attic.", "emotion": "nostalgic"},
]


class ScriptedEvaluator:
    """R: finds which (turn, attempt) it is judging from the nonce of R's real prompt (the test knows the
    nonce secret and the dialogue ids), FAILs the first attempt of every turn (and the second attempt in the
    second exchange), else PASS in the first exchange and SOLVED in the second; answers in R's JSON shape.
    An attempt A wrote malformed never reaches R: the loop fails it locally."""

    def __init__(self, secret: str, rec_ids, max_attempts: int):
        from kardia_rl.synth.roles import evaluator_nonce

        # the loop keys a nonce by the number of attempts so far (1 = the first attempt)
        self.where = {evaluator_nonce(secret, rid, turn, n): (turn, n - 1)
                      for rid in rec_ids for turn in range(2) for n in range(1, max_attempts + 1)}

    def complete(self, reqs, *, temperature, max_tokens):
        from kardia_rl.synth.roles import CRITERIA

        out = []
        for r in reqs:
            nonce = re.search(r"markers with id=(\w+)\)", r.messages[1]["content"]).group(1)
            turn, attempt = self.where[nonce]
            verdict = "FAIL" if attempt <= turn else ("PASS" if turn == 0 else "SOLVED")
            crit = {c: ("needs work" if verdict == "FAIL" else "fine") for c in CRITERIA}
            out.append(json.dumps({"id": nonce, "critique": crit, "verdict": verdict}))
        return out

    def close(self):
        pass


class Serialized:
    """One client's calls under a lock shared with another: the loop runs U's and A's batches at the same time
    when they use different clients, and two in-process hf engines would race on torch's global RNG (each
    seeds it per call), which makes a run unrepeatable."""

    def __init__(self, client, lock):
        self.client, self.lock = client, lock

    def complete(self, reqs, **kw):
        with self.lock:
            return self.client.complete(reqs, **kw)

    def close(self):
        self.client.close()


def _cfg(tmp_path, model, *extra):
    return load_config(os.path.join(ROOT, "conf", "smollm2.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"model.path={model}", "logging.wandb_mode=disabled", "rollout.engine=hf",
        "synth.max_exchanges=2", "synth.max_revisions=4", "synth.user_max_tokens=48", "synth.responder_max_tokens=160",
        "synth.user_temperature=0.9", "synth.responder_temperature=0.3", "synth.shard_size=2",
        "split.use_data_difficulty=true", "split.tau=0.5",
        # the tiny A names emotions almost at random (Emotion Acc 0 in docs/results.md), so its label often flips
        # valence between turns and the emotion-jump filter (rightly) dropped 2 of 3 dialogues in a trial run
        "synth.max_emotion_jump=2", *extra])


def _write_inputs(tmp_path):
    prof, seeds = tmp_path / "profiles.jsonl", tmp_path / "seeds.jsonl"
    prof.write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    return str(prof), str(seeds)


def test_synthesize_validate_split_and_sft(smollm2_dir, sft_model_dir, tmp_path, monkeypatch):
    from kardia_rl.cli import main
    from kardia_rl.curriculum.split import load_split_data, split_samples
    from kardia_rl.data import label_set
    from kardia_rl.engines import make_engine
    from kardia_rl.learner.sft import run_sft
    from kardia_rl.synth import inputs, output
    from kardia_rl.synth.filters import DROP_REASONS
    from kardia_rl.synth.loop import RefinementLoop, Roles
    from kardia_rl.synth.roles import EngineClient

    cfg = _cfg(tmp_path, smollm2_dir)
    labels = label_set(None)
    out = str(tmp_path / "synth")
    prof_path, seed_path = _write_inputs(tmp_path)
    todo = inputs.pairs(inputs.load_profiles(prof_path, "test-salt"), inputs.load_seeds(seed_path, labels), "zip")
    assert len(todo) == 3

    # U: SmolLM2; A: the tiny SFT policy or $KARDIA_TEST_SYNTH_RESPONDER (its own tokenizer; cfg's prompt rules)
    user = EngineClient([make_engine("hf", smollm2_dir, seed=1, dtype="float32", max_model_len=1024,
                                     verify_reference=False)], cfg)
    responder_dir = os.environ.get("KARDIA_TEST_SYNTH_RESPONDER") or sft_model_dir
    responder = EngineClient([make_engine("hf", responder_dir, seed=2, dtype="float32", max_model_len=1024,
                                          verify_reference=False)], cfg)
    lock = threading.Lock()
    user, responder = Serialized(user, lock), Serialized(responder, lock)
    judge = ScriptedEvaluator("test-secret", [inputs.dialogue_id(p, sd) for p, sd in todo], cfg.synth.max_revisions + 1)
    loop = RefinementLoop(cfg, Roles(user, responder, judge, labels, secret="test-secret"))
    store = output.ShardStore(out, cfg.synth.shard_size)
    try:
        loop.run(todo, lambda rec_id, record, drop: store.add(rec_id, record, drop))
    finally:
        store.flush()
        loop.close()
        for c in (user, responder):
            c.close()
    kept, drops = output.finalize(out, store.results, cfg, labels)
    summary = output.write_summary(out, total=len(todo), results=store.results, kept=kept, drops=drops, resumed=0,
                                   new=len(store.results), seconds=1.0, startup=0.0, calls=loop.calls,
                                   tau=cfg.split.tau)
    print("synthesis summary:", json.dumps({k: summary[k] for k in ("kept", "drops", "verdicts", "easy_turns",
                                                                      "hard_turns", "dialogue_ends")}))
    assert len(store.results) == 3 and loop.calls["user"] >= 3
    assert set(DROP_REASONS) <= set(summary["drops"])  # every filter ran and reported its count
    assert kept, f"every dialogue was dropped: {dict(drops)}"
    for rec in kept:
        turns = rec["synth"]["turns"]
        assert [t["verdicts"] for t in turns] == rec["verdicts"]
        assert all(t["revisions"] >= 1 and t["verdicts"][0] == "FAIL" for t in turns)  # revised at least once
        assert all(t["format_ok"] for t in turns)
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        assert users == [t["user"] for t in turns] and all(u.strip() for u in users)

    # the written file passes validate-data unchanged
    data = os.path.join(out, output.OUTPUT_FILE)
    assert main(["validate-data", data]) == 0
    with open(data, encoding="utf-8") as f:
        assert [json.loads(line)["id"] for line in f] == [r["id"] for r in kept]

    # split by the verdicts: rate = 1 - #FAIL / #verdicts per turn, easy when rate >= tau
    samples, sources = load_split_data(cfg, data)
    doc = split_samples(cfg, samples, None, str(tmp_path / "split"), progress=False, sources=sources, data=data)
    assert doc["method"] == "data" and doc["fields"] == {"verdicts": len(samples)}
    verdicts = {r["id"]: r["verdicts"] for r in kept}
    for s in samples:  # each turn's rate from its own verdict list
        v = verdicts[s.dialogue_id][s.turn]
        assert doc["rates"][s.id] == pytest.approx(1 - v.count("FAIL") / len(v)), (s.id, v)
    easy = [s for s in samples if doc["rates"][s.id] >= 0.5]
    assert doc["sizes"]["easy"] == len(easy) and doc["sizes"]["hard"] == len(samples) - len(easy)
    assert doc["sizes"]["hard"] >= 1  # second exchanges fail twice before SOLVED: p_FAIL >= 2/3
    assert easy, f"no easy turn (every turn also failed on format): {doc['rates']}"
    # synthesis' summary counts easy turns by the same rule (it said 0 while the split gave 2 under p_FAIL < 0.5)
    assert (summary["easy_turns"], summary["hard_turns"]) == (doc["sizes"]["easy"], doc["sizes"]["hard"])

    # a short SFT of SmolLM2 on the easy turns
    sft_cfg = _cfg(tmp_path, smollm2_dir, "sft.max_steps=2", "sft.batch_size=1", "sft.micro_batch_size=1",
                   "sft.lr=1e-3", "sft.warmup_steps=0", "sft.lr_schedule=constant", "learner.zero_stage=0",
                   "sft.max_seq_len=512")
    # in a child process: an in-process vLLM engine of an earlier test (same pytest process) leaves
    # torch.distributed groups that DeepSpeed's initialize trips over ("Group ... is not registered"); the child must not inherit the
    # MASTER_PORT an earlier in-process learner set (its store still listens there: EADDRINUSE), so it picks a free one
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = pool.submit(run_sft, sft_cfg, str(tmp_path / "sft"), train_samples=easy, val_samples=easy[:1],
                          progress=False).result()
    assert math.isfinite(res["val_loss_final"]) and os.path.isfile(os.path.join(tmp_path, "sft", "model.safetensors"))
