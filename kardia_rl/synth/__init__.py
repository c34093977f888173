"""KardiaBench construction (`kardia-rl synthesize`): profiles x seed situations -> dialogues written by three
LLM roles with rubric-guided refinement, filtered, written as KardiaBench records with verdict histories.

One file per concern:
- inputs.py: profiles (JSONL or PersonalityCafe-style text; usernames hashed, URLs/e-mails removed) and seeds
  (CSV/JSONL of situation, emotion; emotions from the active label set);
- roles.py: user simulator U, responder A (the training prompt and four-span format), rubric evaluator R
  (FAIL / PASS / SOLVED with a critique per criterion; A's text is untrusted, fenced with a nonce);
- loop.py: the refinement loop (FAIL -> A revises with R's critique, at most synth.max_revisions; a dialogue
  ends on SOLVED or after synth.max_exchanges), dialogues run concurrently;
- filters.py: the drop filters (identity drift, emotion jumps, structural degradation, near duplicates,
  unsafe user turns), each drop counted by reason;
- output.py: append-only atomic shards, resume, summary JSON, progress line;
- cli.py: `cmd_synthesize`.

Record contract (what loop.py produces, filters.py reads, output.py writes):
    {
      "id": str,                 # synthesis id from the (profile, seed) pair: resume key, stable across runs
      "person": str, "mbti": str, "emotion": str, "situation": str, "anon_username": str,
      "messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...],
                                 # the KardiaBench fields; passes `kardia-rl validate-data` (ends on assistant)
      "verdicts": [[str, ...], ...],
                                 # per assistant turn, EVERY verdict R gave during refinement, in order
                                 # ("FAIL" ... then the final one); curriculum/split.py `data_rates` maps each
                                 # turn's list to its resolution rate 1 - #FAIL/#verdicts (the paper's
                                 # easy when that rate >= split.tau, in the split and in summary.json)
      "synth": {
        "profile": "file:line", "seed": "file:line", "seed_index": int,
        "end": "solved" | "max_exchanges" | "format_broken" | "user_failed",
        "turns": [               # one entry per assistant turn, aligned with "verdicts"
          {"verdicts": [str, ...],          # same as the record's verdicts[i]
           "revisions": int,                # revisions made for this turn (len(verdicts) - 1)
           "critiques": [{criterion: str}, ...],  # R's critique per attempt, criteria below; an attempt
                                                  # failed locally for its format has {"format": why}
           "format_ok": bool,               # the FINAL assistant text is a well-formed four-span answer
           "user": str},                    # U's turn that the assistant answers (also in messages)
          ...],
      },
    }
Criteria keys: "psychological_plausibility", "emotional_fidelity", "persona_consistency".
filters.apply_filters(records: list[dict], cfg, cache_dir=None) -> (kept records, {reason: drop count}); cache_dir
    keeps the user turns' MiniLM vectors so a resumed run encodes only new turns.
"""
