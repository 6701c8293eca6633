r"""Describe a megazero checkpoint: iteration, version, the layout that saved it, model config, trainer
state, files, tensors per kind; optionally every tensor (--tensors), machine-readable (--json), and
every file's size and sha256 checked against the index plus every piece against its file (--verify).

    python tools/checkpoint_info.py ckpt                    # the latest checkpoint in ckpt/
    python tools/checkpoint_info.py ckpt/iter_0000100 --tensors
    python tools/checkpoint_info.py ckpt --verify --json > info.json

Only index.json is read unless --verify. Bad input (not a checkpoint, a corrupted file with --verify):
one line `error: ...` on stderr and exit code 2. See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import megazero  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from megazero.checkpoint.api import checkpoint_folder
from megazero.checkpoint.format import INDEX, CheckpointError, kinds_of, optimizer_of, read_index
from megazero.cli import OneLineParser, run_tool

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1}


def build_parser():
    p = OneLineParser(description="Describe (and with --verify, check) a megazero checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="a --save folder (its latest checkpoint) or one iter_N folder")
    p.add_argument("--tensors", action="store_true", help="also list every tensor: name, shape, dtype, pieces")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--verify", action="store_true",
                   help="check every file's size and sha256 against the index and every piece against its file")
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def summarize(folder: Path, index: dict) -> dict:
    tensors = index["tensors"]
    kinds = {}
    for name, t in tensors.items():
        kind = name.split("/", 1)[0]
        k = kinds.setdefault(kind, {"tensors": 0, "elements": 0, "bytes": 0, "dtypes": set()})
        k["tensors"] += 1
        k["elements"] += math.prod(t["shape"])
        k["bytes"] += sum(p["flat"][1] - p["flat"][0] for p in t["pieces"]) * _ITEMSIZE.get(t["dtype"], 0)
        k["dtypes"].add(t["dtype"])
    known = kinds_of(index)
    order = [k for k in known if k in kinds] + sorted(set(kinds) - set(known))
    return {
        "path": str(folder),
        "format": index["format"], "version": index["version"], "megazero_version": index.get("megazero_version"),
        "iteration": index["iteration"], "layout": index["layout"], "model": index["config"]["model"],
        "state": index["state"], "optimizer": optimizer_of(index),
        "parameters": kinds.get("model", {}).get("elements", 0),
        "rng": sorted(index.get("rng", {})),
        "files": {name: meta for name, meta in sorted(index["files"].items())},
        "total_bytes": sum(meta["bytes"] for meta in index["files"].values()),
        "kinds": {k: {**kinds[k], "dtypes": sorted(kinds[k]["dtypes"])} for k in order},
        **{key: index[key] for key in ("converted_from", "imported_from") if key in index},
    }


def tensor_table(index: dict) -> list[dict]:
    return [{"name": name, "shape": t["shape"], "dtype": t["dtype"], "pieces": len(t["pieces"]),
             "files": len({p["file"] for p in t["pieces"]})} for name, t in sorted(index["tensors"].items())]


def verify(folder: Path, index: dict, show_progress: bool = True) -> None:
    """Sizes and sha256 of every file; every piece's key in its file with hi - lo elements; every region
    covered. Raises CheckpointError naming the first problem (and how many more there are)."""
    from safetensors import safe_open

    from megazero.checkpoint.format import check_file

    problems: list[str] = []
    total = sum(meta["bytes"] for meta in index["files"].values())
    headers: dict[str, dict] = {}
    with tqdm(total=total, desc="verifying", unit="B", unit_scale=True, file=sys.stderr, leave=False,
              disable=not show_progress) as bar:
        for name, meta in sorted(index["files"].items()):
            path = folder / name
            try:
                check_file(folder, name, meta)
            except CheckpointError as err:
                problems.append(str(err))
                bar.update(meta["bytes"])
                continue
            if name.endswith(".safetensors"):  # (the tokenizer copy is checked by its sha256 alone)
                try:
                    with safe_open(str(path), framework="pt") as f:
                        headers[name] = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
                except Exception as err:
                    problems.append(f"{path}: unreadable safetensors file ({' '.join(str(err).split())})")
            bar.update(meta["bytes"])
    for tname, t in sorted(index["tensors"].items()):
        regions: dict[tuple, int] = {}
        for p in t["pieces"]:
            numel = headers.get(p["file"], {}).get(p["key"])
            if p["file"] in headers and numel != p["flat"][1] - p["flat"][0]:
                problems.append(f"{folder / p['file']}: piece {p['key']} of {tname} "
                                f"{'missing' if numel is None else f'has {numel} elements'}, index says "
                                f"{p['flat'][1] - p['flat'][0]}")
            key = (tuple(p["start"]), tuple(p["stop"]))
            regions[key] = regions.get(key, 0) + p["flat"][1] - p["flat"][0]
        for (start, stop), covered in regions.items():
            numel = math.prod(b - a for a, b in zip(start, stop))
            if covered != numel:
                problems.append(f"{folder / INDEX}: pieces of {tname} region {list(start)}-{list(stop)} cover "
                                f"{covered} of {numel} elements")
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def print_text(info: dict, table: list[dict] | None, verified: bool) -> None:
    lt, m, st = info["layout"], info["model"], info["state"]
    vocab = m.get("vocab_size")
    print(f"checkpoint   {info['path']}")
    print(f"format       {info['format']} v{info['version']}, written by megazero {info['megazero_version']}")
    print(f"iteration    {info['iteration']}")
    cp = f" cp{lt['cp']}" if lt.get("cp", 1) > 1 else ""  # saved with context parallelism (a record only)
    print(f"layout       tp{lt['tp']} pp{lt['pp']} vp{lt['vp']} dp{lt['dp']}{cp} (world {lt['world']}), ZeRO stage "
          f"{lt['zero_stage']}, {lt['params_dtype']}, offload optimizer {lt.get('offload_optimizer', 'none')} / "
          f"param {lt.get('offload_param', 'none')}")
    for key in ("converted_from", "imported_from"):
        if key in info:
            src = info[key]
            extra = ""
            if "layout" in src:
                s = src["layout"]
                cp = f" cp{s['cp']}" if s.get("cp", 1) > 1 else ""
                extra = f" (tp{s['tp']} pp{s['pp']} vp{s['vp']} dp{s['dp']}{cp} zero{s['zero_stage']})"
            print(f"{'from':<12} {src['path']}{extra} ({key.split('_')[0]})")
    ffn = m.get("ffn_hidden_size") or 4 * m["hidden_size"]
    positions = m.get("max_position_embeddings") or m["seq_length"]
    print(f"model        {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
          f"ffn {ffn}, seq {m['seq_length']}, positions {positions}, vocab {vocab}: {info['parameters']:,} parameters")
    others = {k: v for k, v in m.items() if k not in ("num_layers", "hidden_size", "num_attention_heads",
                                                       "ffn_hidden_size", "seq_length", "max_position_embeddings",
                                                       "vocab_size")}
    print(f"             {', '.join(f'{k}={v}' for k, v in sorted(others.items()))}")
    scaler = st.get("loss_scaler", {})
    opt = info["optimizer"]
    rule = (f"{opt['type']} ({', '.join(opt['state']) or 'no state'})" if opt["type"] else "none saved")
    print(f"state        consumed samples {st['consumed_samples']:,}, optimizer steps {st['optimizer_steps']}, "
          f"optimizer {rule}, its steps {st['adam_steps']}, consecutive skipped steps {st['consecutive_skips']}, "
          f"loss scaler "
          f"{', '.join(f'{k} {v}' for k, v in sorted(scaler.items())) or '-'}")
    print(f"rng          {len(info['rng'])} (pp, tp) stream sets" + (f": {', '.join(info['rng'])}" if info["rng"] else
                                                                     " (a loading run keeps its own seeds)"))
    print(f"files        {len(info['files'])} files, {_mib(info['total_bytes'])}"
          + ("; sizes and sha256 verified" if verified else ""))
    for name, meta in info["files"].items():
        print(f"  {name:<24} {_mib(meta['bytes']):>10}  sha256 {meta['sha256'][:16]}")
    print("tensors")
    for kind, k in info["kinds"].items():
        print(f"  {kind:<11} {k['tensors']:>5} tensors {k['elements']:>14,} elements {_mib(k['bytes']):>10}  "
              f"{'/'.join(k['dtypes'])}")
    if table is not None:
        width = max(len(r["name"]) for r in table) if table else 4
        print(f"  {'name':<{width}}  {'shape':<16} {'dtype':<9} pieces")
        for r in table:
            print(f"  {r['name']:<{width}}  {'x'.join(map(str, r['shape'])):<16} {r['dtype']:<9} {r['pieces']} in "
                  f"{r['files']} file{'s' if r['files'] > 1 else ''}")


def run(args) -> None:
    folder = checkpoint_folder(args.checkpoint)
    index = read_index(folder)
    try:
        info = summarize(folder, index)
        table = tensor_table(index) if args.tensors else None
    except (KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{folder / INDEX}: malformed checkpoint index (missing or bad {err})") from None
    if args.verify:
        verify(folder, index, show_progress=sys.stderr.isatty())  # no bar remnants in logs
    if args.json:
        out = {**info, "verified": bool(args.verify)}
        if table is not None:
            out["tensors"] = table
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print_text(info, table, args.verify)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
