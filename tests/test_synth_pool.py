"""Synthesis' evaluator R on the judge pool (`synth.evaluator_backend=judge synth.pool=ray`): the same Ray
actors that score rubrics in training (cluster/judge_pool.py) serve R's raw chat calls, the least-loaded actor
per call. The judge's chat model here is the openai backend against the loopback server that plays U, A and R
(tests/synth_server.py), so the test checks the plumbing and the output, not a model."""
from __future__ import annotations

import json
import os

import pytest

from conftest import local_ray
from synth_server import SynthServer
from test_synth import synthesize

pytestmark = pytest.mark.ray
MODES = ["fail_then_pass", "solved", "always_fail", "inject"]


@pytest.fixture(scope="module")
def server():
    with SynthServer() as s:
        yield s


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


def _judge_on(url: str, pool: str) -> dict:
    return {"synth.evaluator_backend": "judge", "synth.pool": pool, "judge.backend": "openai",
            "judge.api_base": url, "judge.num_actors": 2, "ray.cpus_per_actor": 0}


def test_judge_pool_serves_evaluator_calls_on_every_actor(server, ray_cluster):
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.synth import roles
    from kardia_rl.cluster.judge_pool import JudgePool

    cfg = load_config(None, [f"{k}={v}" for k, v in _judge_on(server.url, "ray").items()])
    client = roles.judge_client(cfg)
    try:
        assert isinstance(client.backend, JudgePool) and len(client.backend.actors) == 2
        nonce = "jabc123"
        msgs = [{"role": "system", "content": "You are an expert evaluator"},
                {"role": "user", "content": f"[mode=solved] <<<ANSWER id={nonce}>>> fine <<<END id={nonce}>>>"}]
        reqs = [roles.Request(msgs, seed=i) for i in range(6)]
        out = client.complete(reqs, temperature=0.0, max_tokens=64)
        assert [roles.parse_verdict(t, nonce).verdict for t in out] == ["SOLVED"] * 6
        per_actor = [st.get("chat/requests", 0) for st in ray.get([a.stats.remote() for a in client.backend.actors])]
        # six concurrent calls on two actors: the least-loaded pick spreads them (3 + 3)
        assert sum(per_actor) == 6 and min(per_actor) >= 1, per_actor
    finally:
        client.close()


def test_synthesize_with_evaluator_on_the_pool_equals_local(server, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("KARDIA_SYNTH_SALT", "one-salt")  # both runs hash usernames alike (else each OUT/.salt differs)
    local, s_local, _ = synthesize(tmp_path, server.url, MODES, out="local", **_judge_on(server.url, "local"))
    pooled, s_pool, out = synthesize(tmp_path, server.url, MODES, out="pool", **_judge_on(server.url, "ray"))
    assert pooled == local and pooled["fail_then_pass"]["verdicts"] == [["FAIL", "PASS"], ["FAIL", "PASS"]]
    assert s_pool["verdicts"] == s_local["verdicts"] and s_pool["role_calls_this_run"] == s_local["role_calls_this_run"]
    with open(os.path.join(out, "kardiabench.jsonl")) as f:
        assert len([json.loads(line) for line in f]) == len(MODES)


def test_every_role_on_ray_pools_repeats_exactly(server, ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """U and A on two rollout-group actors (hf engines, the tiny model), R on two judge-pool actors: the same seed
    gives the same dialogues (each chunk's seed comes from its requests' seeds, so which actor served it does not
    matter). The engine roles run on the pools only: synth.pool=local refuses them (tests/test_synth.py)."""
    monkeypatch.setenv("KARDIA_SYNTH_SALT", "one-salt")
    engines = {"synth.user_backend": "engine", "synth.responder_backend": "engine", "synth.model": tiny_model_dir,
               "synth.num_engines": 2, "rollout.engine": "hf", "synth.max_exchanges": 1, "synth.max_revisions": 1,
               "synth.user_max_tokens": 8, "synth.responder_max_tokens": 16, "model.max_prompt_tokens": 256}
    modes = ["pass", "solved", "always_fail"]
    runs = {}
    for name in ("a", "b"):
        _, summary, out = synthesize(tmp_path, server.url, modes, out=name, **engines, **_judge_on(server.url, "ray"))
        shards = sorted(os.listdir(os.path.join(out, "shards")))
        runs[name] = summary, [json.loads(line) for f in shards for line in open(os.path.join(out, "shards", f))]
    # every finished dialogue (the random tiny A's, kept or dropped) is in the shards: compare those
    assert runs["a"][1] == runs["b"][1] and len(runs["a"][1]) == len(modes)
    assert runs["a"][0]["role_calls_this_run"] == runs["b"][0]["role_calls_this_run"]
    assert runs["a"][0]["role_calls_this_run"]["responder"] >= len(modes)
