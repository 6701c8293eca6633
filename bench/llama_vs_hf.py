"""megazero's Llama block (and its GPT-2) vs Hugging Face's LlamaForCausalLM (GPT2LMHeadModel) trained
by plain PyTorch: training tokens/s, same shapes, same data, same batch, one run, CPU, fp32.

Two frameworks, each in a process of its own (--threads intra-op threads, 1 by default):

    megazero     the real Trainer at tp = pp = dp = 1, ZeRO stage 0: Trainer.train_step (what users run:
                 batch fetch, forward, backward, gradient reduction (a no-op at dp 1), clip 1.0, AdamW,
                 the step's mean loss as a Python float)
    HF           transformers' LlamaForCausalLM / GPT2LMHeadModel (attn_implementation "sdpa", use_cache
                 False), torch.optim.AdamW (same lr, betas, eps, weight decay, no decay on 1-D
                 parameters), clip_grad_norm_(1.0), loss = mean cross entropy of the logits; a step is
                 zero_grad, forward, backward, clip, optimizer step, loss.item()

Same model: the HF config has megazero's dims (hidden, layers, heads, kv heads, intermediate size =
ffn_size, rope theta, RMSNorm eps, untied output layer for Llama; GPT-2's tied one, tanh GELU, learned
positions: the config megazero's Hugging Face export writes), and by default (--same-init) the HF model
gets megazero's initial weights (its layout-invariant init) through the export's mapping
(megazero/model/hf_llama.py: fused QKV [group, (q.., k, v), d] -> q/k/v_proj, SwiGLU's interleaved
gate/up rows -> gate_proj/up_proj; megazero/model/hf_gpt2.py). Same data: both read
megazero's dataset through its sampler (the Trainer's batches). With the same init the two train the
same thing, so the per-step losses agree to ~1e-5 in fp32 (column max|dloss|): the check that the
speed comparison compares like with like.

Timing. The two processes take turns, one step each (semaphores; the waiting one sleeps), so they never
run at once and step i of each sees the machine as it was a second apart: on a shared, noisy box a
burst of someone else's work hits both sides instead of one. A step's time is its wall time (batch
fetch to the loss as a float). Per round: the median over --steps steps after --warmup steps; a round
is a fresh pair of processes, and which framework steps first alternates over the rounds. The table
shows the median over --rounds rounds with the [min-max] of the rounds beside it. tokens/s = micro x
seq / step time; megazero/HF = HF's step time / megazero's, > 1 means megazero is faster; `paired` is
the median over steps of HF step i / megazero step i (the two steps taken in turn), median over rounds:
the steadiest of the ratios on a shared machine.

--profile N runs each framework N more steps (still taking turns) under torch.profiler (CPU) in the last
round and prints where the time goes side by side: self CPU ms per step and calls per step by op, and
the largest differences. The profiled steps are not in the table.

    python bench/llama_vs_hf.py                          # llama-tiny shape and GPT-2 of the same dims, ~2-3 min
    python bench/llama_vs_hf.py --models llama --rounds 5 --steps 20
    python bench/llama_vs_hf.py --layers 8 --hidden 512 --heads 8 --groups 4 --ffn 1536 --seq 512 --micro 4
    python bench/llama_vs_hf.py --models llama --profile 5 --rounds 1
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_peers import adamw, peer_model_and_data  # noqa: E402
from zero_memory import bench_config, build_dataset, build_trainer, init_gloo  # noqa: E402

NAMES = {"megazero": "megazero", "hf": "HF + torch"}
TIMEOUT_S = 1800  # a process waiting this long for the other's step gives up
HF_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


# ----- the two models' configs ---------------------------------------------------------------------
def run_config(args, arch: str, prefix, tokenizer, steps: int):
    """The RunConfig both frameworks train: bench_config (fp32, no dropout, constant lr, clip 1.0,
    AdamW wd 0.1, dp 1, ZeRO 0) with the model's parts from a preset and the dims from the flags."""
    from megazero.presets import preset

    cfg = bench_config(args, prefix, tokenizer, dp=1, stage=0, dtype="fp32", grad_reduce="fp32", steps=steps,
                       lr=args.lr)
    if arch == "llama":
        fields = preset(args.preset)
        for name, value in (("num_query_groups", args.groups), ("ffn_hidden_size", args.ffn),
                            ("rotary_base", args.rotary_base)):
            if value:
                fields[name] = value
        fields["attention_backend"] = args.attention_backend
    else:  # GPT-2's parts; ffn = 4 x hidden (GPT-2's), positions up to max(seq, 1024)
        fields = preset("gpt2")
        fields.update(ffn_hidden_size=None, max_position_embeddings=max(args.seq, 1024),
                      attention_backend=args.attention_backend)
    fields.update(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                  seq_length=args.seq, hidden_dropout=0.0, attention_dropout=0.0)
    if fields["max_position_embeddings"] is not None and fields["max_position_embeddings"] < args.seq:
        fields["max_position_embeddings"] = args.seq
    return cfg.replace(model=fields)


def hf_model(cfg, arch: str):
    """transformers' model of the same shape (random init; --same-init then loads megazero's weights):
    the config megazero's own export writes (megazero/model/hf_gpt2.py, hf_llama.py), sdpa, no cache."""
    import transformers

    m = cfg.model
    if arch == "gpt2":
        from megazero.model.hf_gpt2 import hf_gpt2_config

        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2_config(m), attn_implementation="sdpa",
                                                                    use_cache=False))
    from megazero.model.hf_llama import hf_llama_config

    fields = hf_llama_config(m)  # ValueError naming the setting when no HF Llama-family class has the parts
    family, arch_class = fields.pop("model_type"), fields.pop("architectures")[0]
    fields.update(use_cache=False, attn_implementation="sdpa")
    return getattr(transformers, arch_class)(transformers.CONFIG_MAPPING[family](**fields))


def hf_state_dict(state: dict, cfg, arch: str) -> dict:
    """megazero's state dict (tp = 1) in the HF model's names and layouts (megazero's export mapping)."""
    if arch == "gpt2":
        from megazero.model.hf_gpt2 import to_hf_gpt2_state_dict

        return to_hf_gpt2_state_dict(state, cfg.model)
    from megazero.model.hf_llama import to_hf_llama_state_dict

    return to_hf_llama_state_dict(state, cfg.model)


def make_step(framework: str, arch: str, cfg, prefix, tokenizer, args):
    """A zero-argument callable running one training step and returning its loss as a float."""
    if framework == "megazero":
        trainer = build_trainer(cfg, 1, 0, prefix, tokenizer, args.vocab)
        batches = trainer._batches("train", 0)
        return lambda: trainer.train_step(batches).lm_loss

    # megazero's GPTModel at tp = 1 as the Trainer builds it (its initial weights) and the Trainer's batches
    mz_model, batches = peer_model_and_data(cfg, 1, 0, prefix)
    state = mz_model.state_dict()
    model = hf_model(cfg, arch)
    if args.same_init:
        missing, unexpected = model.load_state_dict(hf_state_dict(state, cfg, arch), strict=False)
        missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
    del state, mz_model
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.train()
    opt = adamw(model, cfg)  # megazero's decay rule (none on biases and norm weights) on HF's names
    vocab, clip = cfg.model.vocab_size, cfg.optimizer.clip_grad

    def step():
        b = next(batches)
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=b["tokens"], use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, vocab), b["labels"].view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()
    return step


def profile_table(prof) -> dict[str, tuple[float, int]]:
    """op name -> (self CPU ms, calls) of one profiled step."""
    return {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}


def worker(index, out, args, prefix, tokenizer, arch, order, ports, turns, ready, profile_steps):
    """Process `index` runs framework order[index]; the two processes take turns step by step (a
    semaphore each), so they never run at once and see the machine as it is within a step of each other."""
    warnings.filterwarnings("ignore")
    framework = order[index]
    result: dict = {"times": [], "losses": []}
    step = None
    try:
        init_gloo(0, 1, ports[index])  # the Trainer's (size-1) process groups; sets 1 thread
        torch.set_num_threads(args.threads)
        cfg = run_config(args, arch, prefix, tokenizer, args.warmup + args.steps + profile_steps)
        torch.manual_seed(1234)
        step = make_step(framework, arch, cfg, prefix, tokenizer, args)
    except Exception as exc:  # noqa: BLE001  (report why; keep taking turns so the other process finishes)
        result |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if profile_steps:  # a process's first profiler session costs ~1 s of set-up: spend it outside the steps
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]):
            torch.zeros(1).add_(1)
    ready.wait(timeout=TIMEOUT_S)
    profiles = []
    for k in range(args.warmup + args.steps + profile_steps):
        if not turns[index].acquire(timeout=TIMEOUT_S):
            result.setdefault("error", "timed out waiting for the other framework's step")
            break
        try:
            if step is not None:
                if k < args.warmup + args.steps:
                    t0 = time.perf_counter()
                    result["losses"].append(step())
                    result["times"].append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        step()
                    profiles.append((time.perf_counter() - t0, profile_table(prof)))
        except Exception as exc:  # noqa: BLE001
            result |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            step = None
        finally:
            turns[1 - index].release()
    if profiles:
        table: dict[str, list] = {}
        for _, t in profiles:
            for key, (ms, calls) in t.items():
                acc = table.setdefault(key, [0.0, 0])
                acc[0] += ms / len(profiles)
                acc[1] += calls
        result["profile"] = {k: (ms, round(c / len(profiles))) for k, (ms, c) in table.items()}
        result["profile_wall_ms"] = 1000 * statistics.mean(w for w, _ in profiles)
    torch.save(result, Path(out) / f"{index}.pt")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run_pair(args, prefix, tokenizer, arch, order, profile_steps=0) -> dict:
    """Both frameworks in two fresh processes taking turns, order[0] first; {framework: result}."""
    import torch.multiprocessing as mp

    from tests.dist_utils import free_port

    ctx = mp.get_context("spawn")
    turns = (ctx.Semaphore(1), ctx.Semaphore(0))
    ready = ctx.Barrier(2)
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(worker, args=(out, args, prefix, tokenizer, arch, order, (free_port(), free_port()),
                                             turns, ready, profile_steps), nprocs=2, start_method="spawn")
        except Exception as exc:  # noqa: BLE001  (a crashed process)
            return {fw: {"error": f"process failed: {exc}"} for fw in order}
        return {fw: torch.load(Path(out) / f"{i}.pt", weights_only=False) for i, fw in enumerate(order)}


def print_profile(arch: str, results: dict, top: int) -> None:
    mz, hf = results["megazero"], results["hf"]
    if "profile" not in mz or "profile" not in hf:
        print(f"profile ({arch}): failed: {mz.get('error') or hf.get('error')}")
        return
    a, b = mz["profile"], hf["profile"]
    print(f"\nprofile, {arch}: self CPU time per step by op (torch.profiler; wall per step under the profiler: "
          f"megazero {mz['profile_wall_ms']:.1f} ms, HF {hf['profile_wall_ms']:.1f} ms; "
          f"profiled totals {sum(v[0] for v in a.values()):.1f} / {sum(v[0] for v in b.values()):.1f} ms)")
    print(f"{'op':<46}{'megazero ms':>12}{'calls':>7}{'HF ms':>10}{'calls':>7}{'mz-HF ms':>10}")
    keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
    for k in keys[:top]:
        (ma, ca), (mb, cb) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
        print(f"{k[:45]:<46}{ma:>12.2f}{ca:>7}{mb:>10.2f}{cb:>7}{ma - mb:>+10.2f}")
    diffs = sorted(keys, key=lambda k: -(a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]))
    print("largest megazero - HF differences: " + ", ".join(
        f"{k} {a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]:+.2f}" for k in diffs[:8]))
    print("largest HF - megazero differences: " + ", ".join(
        f"{k} {b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0]:+.2f}" for k in diffs[::-1][:8]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["llama", "gpt2"], default=["llama", "gpt2"])
    ap.add_argument("--preset", default="llama-tiny", help="the Llama parts (norm, rope, SwiGLU, GQA, untied, "
                    "no biases) and defaults for --groups/--ffn/--rotary-base come from this preset")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=None, help="Llama: key/value heads (default: the preset's, 2)")
    ap.add_argument("--ffn", type=int, default=None, help="Llama: ffn_size = HF intermediate_size (default: the "
                    "preset's, 768); GPT-2 always uses 4 x hidden")
    ap.add_argument("--rotary-base", type=float, default=None, help="Llama: rope theta (default: the preset's, 10000)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8, help="batch size (one microbatch per step)")
    ap.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary (trained on the shared corpus)")
    ap.add_argument("--data", default=None, help="existing dataset prefix (with --tokenizer); default: build one "
                    "in a temp dir")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "fused", "unfused"],
                    help="megazero's attention backend (HF always runs sdpa)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat the interleaved (megazero, HF) sequence; the table shows the median over rounds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per process (1: steadier on a shared machine; the two processes "
                         "never run at once, so --threads 2 uses both cores of the dev box)")
    ap.add_argument("--same-init", action=argparse.BooleanOptionalAction, default=True,
                    help="HF starts from megazero's initial weights (then the losses agree)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the rounds, profile STEPS steps of each framework (torch.profiler) and print where "
                         "the time goes")
    ap.add_argument("--profile-top", type=int, default=25, help="ops listed in the profile table")
    args = ap.parse_args()

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average before the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(1/5/15 min); torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}; "
          f"{args.threads} thread(s) per process, the two frameworks taking turns step by step")
    t_start = time.perf_counter()
    results: dict[tuple, list] = {}
    profiles: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            prefix, tokenizer = Path(args.data), Path(args.tokenizer)
        else:
            prefix, tokenizer = build_dataset(Path(tmp), args.vocab)
        for r in range(args.rounds):  # which framework steps first alternates over the rounds
            order = tuple(NAMES) if r % 2 == 0 else tuple(NAMES)[::-1]
            for arch in args.models:
                last = r == args.rounds - 1
                pair = run_pair(args, prefix, tokenizer, arch, order, args.profile if last else 0)
                for framework, res in pair.items():
                    results.setdefault((arch, framework), []).append(res)
                    if last and args.profile:
                        profiles.setdefault(arch, {})[framework] = res
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()

    tokens = args.micro * args.seq
    print(f"{args.layers} layers x hidden {args.hidden}, {args.heads} heads, seq {args.seq}, micro batch {args.micro} "
          f"({tokens} tokens/step), vocab {args.vocab}, fp32, AdamW lr {args.lr} wd 0.1, clip 1.0, no dropout; "
          f"megazero attention backend {args.attention_backend}, HF sdpa; "
          f"{'same initial weights' if args.same_init else 'independent initial weights'}, same batches")
    print(f"tokens/s and ms/step: median of {args.steps} steps after {args.warmup} warm-up, median over {args.rounds} "
          f"interleaved round(s) [min-max of the rounds]; megazero/HF = HF ms / megazero ms, > 1: megazero faster; "
          f"paired = median of HF step i / megazero step i (taken in turn), median over rounds")
    print(f"{'model':<46}{'framework':<12}{'tokens/s':>10}{'[rounds]':>17}{'ms/step':>10}{'megazero/HF':>13}"
          f"{'paired [rounds]':>20}"
          f"{f'loss@{args.warmup + args.steps}':>11}{'max|dloss|':>12}")
    errors, verdicts = [], []
    for arch in args.models:
        summary = {}
        for framework in NAMES:
            rounds = results[(arch, framework)]
            bad = [r for r in rounds if "error" in r]
            if bad:
                summary[framework] = {"error": bad[0]["error"]}
                errors.append((arch, framework, bad[0]))
                continue
            per_round = [statistics.median(r["times"][args.warmup:]) for r in rounds]
            summary[framework] = {"s": statistics.median(per_round), "lo": min(per_round), "hi": max(per_round),
                                  "losses": rounds[-1]["losses"], "rounds": rounds}
        paired = "-"
        if all("rounds" in summary[fw] for fw in NAMES):  # HF step i / megazero step i, the turns next to each other
            per_round = [statistics.median(h / m for h, m in zip(hr["times"][args.warmup:], mr["times"][args.warmup:]))
                         for hr, mr in zip(summary["hf"]["rounds"], summary["megazero"]["rounds"])]
            paired = f"{statistics.median(per_round):.2f} [{min(per_round):.2f}-{max(per_round):.2f}]"
        label = ("GPT-2" if arch == "gpt2" else f"Llama ({args.preset} parts)") + f" vs {HF_CLASS[arch]}"
        mz = summary.get("megazero", {})
        for framework in NAMES:
            s = summary[framework]
            if "error" in s:
                print(f"{label:<46}{NAMES[framework]:<12}failed: {s['error'][:200]}")
                continue
            ratio = f"{s['s'] / mz['s']:.2f}" if framework == "hf" and "s" in mz else "-"
            pair = paired if framework == "hf" else "-"
            dl = "-"
            if framework == "hf" and "losses" in mz:
                dl = f"{max(abs(x - y) for x, y in zip(s['losses'], mz['losses'])):.1e}"
            spread = f"[{tokens / s['hi']:.0f}-{tokens / s['lo']:.0f}]"
            print(f"{label:<46}{NAMES[framework]:<12}{tokens / s['s']:>10.0f}{spread:>17}{1000 * s['s']:>10.1f}"
                  f"{ratio:>13}{pair:>20}{s['losses'][-1]:>11.5f}{dl:>12}")
        if "s" in mz and "s" in summary.get("hf", {}):
            verdicts.append(f"{arch} {summary['hf']['s'] / mz['s']:.2f}x")
    print(f"total {elapsed:.0f} s; load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("target (megazero/HF >= 1.0): " + ", ".join(verdicts))
    for arch in profiles:
        print_profile(arch, profiles[arch], args.profile_top)
    for arch, framework, r in errors:  # the error, then the last lines of its traceback
        tail = r.get("traceback", "").strip().splitlines()[-12:]
        print("\n".join([f"\n{arch} {NAMES[framework]} failed: {r['error']}"] + ["  " + line for line in tail]))


if __name__ == "__main__":
    main()
