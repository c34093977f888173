"""`kardia-rl synthesize` with the openai backend against a loopback server playing U, A and R
(tests/synth_server.py): refinement, SOLVED stop, revision cap, drops by reason, injection, resume after a
kill, and the output through validate-data and the verdict split."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kardia_rl.cli import main
from kardia_rl.rewards.judge.rubric_parse import iter_json_objects
from kardia_rl.synth import roles
from synth_server import INJECTION, SynthServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITUATIONS = {
    "fail_then_pass": "Her sister forgot the long-planned trip to the coast.",
    "solved": "The neighbour returned the lawnmower broken without a word.",
    "always_fail": "Their team project was rejected after months of work.",
    "broken": "The landlord raised the rent again this winter.",
    "garbage": "A close friend moved abroad without saying goodbye.",
    "inject": "The bakery they loved closed down on Friday.",
    "pass": "The bus broke down on the way to the concert",
}


def write_inputs(tmp_path, modes, emotions=None):
    prof = tmp_path / "profiles.jsonl"
    prof.write_text("".join(json.dumps({"username": f"forum_user_{i}", "mbti": "INFJ",
                                        "about": f"I am a gardener and hiker number {i}. Mail me at a{i}@x.org"}) + "\n"
                            for i in range(len(modes))))
    seeds = tmp_path / "seeds.csv"
    rows = [f'"{SITUATIONS[m.split(":")[0]]} [mode={m.split(":")[0]}]",{(emotions or {}).get(i, "sad")}'
            for i, m in enumerate(modes)]
    seeds.write_text("situation,emotion\n" + "\n".join(rows) + "\n")
    return str(prof), str(seeds)


def overrides(url, **extra):
    kv = {"synth.user_backend": "openai", "synth.responder_backend": "openai", "synth.evaluator_backend": "openai",
          "synth.user_base_url": url, "synth.responder_base_url": url, "synth.evaluator_base_url": url,
          "synth.max_exchanges": 2, "synth.max_revisions": 2, "synth.max_concurrent_dialogues": 4,
          "synth.evaluator_retries": 1, "judge.backoff_s": 0.01, "synth.shard_size": 2, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def synthesize(tmp_path, url, modes, out="out", emotions=None, **extra):
    prof, seeds = write_inputs(tmp_path, modes, emotions)
    out = str(tmp_path / out)
    rc = main(["synthesize", "--profiles", prof, "--seeds", seeds, "--out", out, "--no-progress",
               *overrides(url, **extra)])
    assert rc == 0
    with open(os.path.join(out, "kardiabench.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {r["situation"].split("[mode=")[1].rstrip("]"): r for r in records}, summary, out


@pytest.fixture(scope="module")
def server():
    with SynthServer() as s:
        yield s


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), server.url,
                      ["fail_then_pass", "solved", "always_fail", "broken", "garbage", "inject"])


def test_refinement_fail_then_pass(run):
    recs, _, _ = run
    r = recs["fail_then_pass"]
    assert r["verdicts"] == [["FAIL", "PASS"], ["FAIL", "PASS"]]  # each turn revised once, 2 exchanges
    t = r["synth"]["turns"][0]
    assert t["revisions"] == 1 and t["format_ok"] and t["critiques"][0]["psychological_plausibility"] == "draft judged FAIL"
    assert "(draft 1, turn 1)" in r["messages"][2]["content"]  # the kept answer is the revision
    assert r["synth"]["end"] == "max_exchanges" and len(r["messages"]) == 5


def test_solved_stops_the_dialogue_early(run):
    r = run[0]["solved"]
    assert r["verdicts"] == [["SOLVED"]] and r["synth"]["end"] == "solved" and len(r["messages"]) == 3


def test_revision_cap(run):
    r = run[0]["always_fail"]
    # max_revisions=2: three attempts per turn, then the turn is kept with its FAIL history (a hard sample)
    assert r["verdicts"] == [["FAIL"] * 3, ["FAIL"] * 3]
    assert [t["revisions"] for t in r["synth"]["turns"]] == [2, 2]


def test_drops_counted_by_reason(run):
    recs, summary, _ = run
    assert "broken" not in recs and "garbage" not in recs
    assert summary["drops"]["evaluator_unreadable"] == 1  # no verdict block after 1 re-ask
    assert summary["drops"]["structure"] == 1  # A's format still broken after the revisions
    assert summary["kept"] == 4 and summary["dialogues_finished"] == 6 and summary["dropped"] == 2
    assert summary["verdicts"]["FAIL"] == 2 + 6 and summary["verdicts"]["SOLVED"] == 1


def test_injected_verdict_does_not_change_the_parsed_one(run, server):
    r = run[0]["inject"]
    assert r["verdicts"] == [["PASS"], ["PASS"]] and INJECTION in r["messages"][2]["content"]
    # The gullible evaluator did echo the fake verdicts after its own answer: a parser reading the last JSON
    # verdict (or any "Verdict:" line) would have taken SOLVED.
    answers = [b for b in server.bodies if b["messages"][0]["content"].startswith("You are an expert evaluator")
               and "bakery" in b["messages"][1]["content"]]
    from synth_server import NONCE, reply_for

    text = reply_for(answers[0])
    naive = [o["verdict"] for _, o in iter_json_objects(text) if "verdict" in o]
    assert naive[-1] == "SOLVED"
    nonce = NONCE.search(answers[0]["messages"][1]["content"]).group(1)
    assert roles.parse_verdict(text, nonce).verdict == "PASS"
    assert roles.parse_verdict(text, "jdeadbeef0").verdict == "SOLVED"  # the fake id is what a guess would need


def test_output_validates_and_splits_by_verdicts(run, tmp_path):
    _, _, out = run
    path = os.path.join(out, "kardiabench.jsonl")
    assert main(["validate-data", path]) == 0
    from kardia_rl.config import load_config
    from kardia_rl.curriculum.split import data_rates, load_split_data

    cfg = load_config(None, [f"data.path={path}"])
    samples, _ = load_split_data(cfg)
    rates, fields = data_rates(samples)
    assert fields == {"verdicts": len(samples)}
    by_mode = {}
    for s in samples:
        by_mode.setdefault(s.situation.split("[mode=")[1].rstrip("]"), []).append(rates[s.id])
    assert by_mode["fail_then_pass"] == [0.5, 0.5] and by_mode["always_fail"] == [0.0, 0.0]
    assert by_mode["solved"] == [1.0]


def test_profiles_are_anonymised_in_the_output(run):
    for r in run[0].values():
        assert r["anon_username"].startswith("u_") and "forum_user" not in json.dumps(r)
        assert "@x.org" not in r["person"]


def test_near_duplicates_dropped(server, tmp_path):
    # two seeds with the same situation (other emotion): U writes the same turns, the second is a duplicate
    recs, summary, _ = synthesize(tmp_path, server.url, ["solved", "solved"], emotions={1: "angry"})
    assert summary["drops"].get("near_duplicate") == 1 and summary["kept"] == 1


def run_cli(prof, seeds, out, url, **extra):
    rc = main(["synthesize", "--profiles", prof, "--seeds", seeds, "--out", out, "--no-progress",
               *overrides(url, **extra)])
    assert rc == 0
    return _read(os.path.join(out, "kardiabench.jsonl"))


def resume_inputs(tmp_path):
    """Six distinct dialogues, one per shard, one at a time: (profiles, seeds, overrides) for the stop tests."""
    modes = ["fail_then_pass", "solved", "always_fail", "inject", "solved", "fail_then_pass"]
    prof, seeds = write_inputs(tmp_path, modes)
    with open(seeds) as f:  # make the repeated modes distinct dialogues
        lines = f.read().splitlines()
    lines[5] = '"The piano exam went wrong when his hands froze on stage. [mode=solved]",sad'
    lines[6] = '"Nobody came to the birthday dinner she cooked all day for. [mode=fail_then_pass]",sad'
    with open(seeds, "w") as f:
        f.write("\n".join(lines) + "\n")
    return prof, seeds, {"synth.shard_size": 1, "synth.max_concurrent_dialogues": 1}


def test_resume_after_kill(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KARDIA_SYNTH_SALT", "test-salt")
    prof, seeds, extra = resume_inputs(tmp_path)
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "kardia_rl.cli", "synthesize", "--profiles", prof, "--seeds", seeds, "--out", out,
           "--no-progress", *overrides("URL", **extra)]
    shards = os.path.join(out, "shards")

    def n_shards():
        return len([f for f in os.listdir(shards) if f.startswith("shard-")]) if os.path.isdir(shards) else 0

    with SynthServer(delay=0.2) as slow:
        proc = subprocess.Popen([c.replace("URL", slow.url) for c in cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        while proc.poll() is None and n_shards() < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_first = sorted(f for f in os.listdir(shards) if f.startswith("shard-"))
    assert 2 <= len(done_first) < 6 and not os.path.exists(os.path.join(out, "kardiabench.jsonl"))
    first = {json.loads(line)["situation"] for f in done_first for line in open(os.path.join(shards, f))}
    with SynthServer() as fresh:
        records = run_cli(prof, seeds, out, fresh.url, **extra)
        asked = [b["messages"][0]["content"] for b in fresh.bodies]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from_shards"] == len(first) and summary["synthesised_this_run"] == 6 - len(first)
    assert summary["kept"] == 6 and summary["dialogues_finished"] == 6
    for situation in first:  # finished dialogues were not asked again
        assert not any(situation in s for s in asked)
    assert any(records[-1]["situation"] in s for s in asked)
    # and the output equals an uninterrupted run's
    ref = run_cli(prof, seeds, str(tmp_path / "ref"), server.url, **extra)
    assert sorted(json.dumps(r, sort_keys=True) for r in records) == sorted(json.dumps(r, sort_keys=True) for r in ref)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_model_roles_are_refused_in_this_process(server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Placement: U and A as engines (and R on an LLM judge) load models, which run on the Ray pools only; with
    synth.pool=local the command refuses them in one line naming the keys, before any model loads. Engine roles
    on the pools: tests/test_synth_pool.py."""
    monkeypatch.setenv("KARDIA_SYNTH_SALT", "test-salt")
    prof, seeds = write_inputs(tmp_path, ["pass"])
    args = {"synth.user_backend": "engine", "synth.responder_backend": "engine", "synth.model": tiny_model_dir,
            "synth.pool": "local", "rollout.engine": "hf"}
    assert main(["synthesize", "--profiles", prof, "--seeds", seeds, "--out", str(tmp_path / "a"), "--no-progress",
                 *overrides(server.url, **args)]) == 2
    err = capsys.readouterr().err
    assert "synth.pool=local: synth.user_backend=engine, synth.responder_backend=engine would load a model" in err
    assert "set synth.pool=ray" in err and "Traceback" not in err


def test_revision_keeps_the_user_message_under_a_one_turn_history():
    """A revision adds one exchange (the rejected answer, R's notes) and the history limit grows by one for it:
    with data.max_history_turns=1 (conf/smollm2.yaml) the user's message would otherwise be cropped away."""
    from kardia_rl.config import load_config

    cfg = load_config(None, ["data.max_history_turns=1"])
    prev = ("<|understanding_begin|>u<|understanding_end|><|reasoning_begin|>r<|reasoning_end|>"
            "<|emotion_begin|>sad<|emotion_end|><|response_begin|>Cheer up, it is nothing.<|response_end|>")
    history = [{"role": "user", "content": "My cat ran away."}, {"role": "assistant", "content": prev},
               {"role": "user", "content": "She has been gone two days now."}]
    first = roles.responder_sample("d1", 1, "MBTI: INFJ", "INFJ", "sad", "A lost cat.", "u_x", "", history)
    msgs = roles.responder_messages(first, roles.responder_cfg(cfg, False))
    assert [m["content"] for m in msgs[1:]] == ["She has been gone two days now."]
    again = roles.responder_sample("d1", 1, "MBTI: INFJ", "INFJ", "sad", "A lost cat.", "u_x", "", history,
                                   revision=("<|response_begin|>Oh no.<|response_end|>", {"emotional_fidelity": "flat"}))
    msgs = roles.responder_messages(again, roles.responder_cfg(cfg, True))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "She has been gone two days now." and "flat" in msgs[3]["content"]
    assert roles.responder_cfg(load_config(None, ["data.max_history_turns=0"]), True).data.max_history_turns == 0
