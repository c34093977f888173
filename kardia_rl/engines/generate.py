"""Generation outside the training loop (eval, the split's rater): an engine's generate in chunks with a
progress bar. Here, below both evaluation/ and curriculum/, so neither borrows the other's kit."""
from __future__ import annotations

from kardia_rl.utils.seeds import derive_seed

GEN_CHUNK = 64  # prompts per engine call: bounds memory and gives the progress bar something to count


def generate_chunked(engine, prompts: list[list[int]], n: int, *, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, greedy: bool, progress: bool, desc: str) -> list[list]:
    """engine.generate in chunks of GEN_CHUNK prompts with a progress bar; chunk c uses seed (seed, c), so
    the result depends only on the seed and the prompts (the engine derives per-prompt seeds itself)."""
    from tqdm.auto import tqdm

    out: list[list] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for c, start in enumerate(range(0, len(prompts), GEN_CHUNK)):
            chunk = prompts[start:start + GEN_CHUNK]
            chunk_seed = derive_seed(seed, c, scheme="colon48")
            out.extend(engine.generate(chunk, n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       seed=chunk_seed, greedy=greedy))
            bar.update(len(chunk))
    return out
