"""Checkpoint tools: megazero.checkpoint.load_model, tools/convert_checkpoint.py (reshard, --to-hf,
--from-hf) and tools/checkpoint_info.py.

One 4-process launch trains a tiny bf16 GPT for 2 steps at tp2 pp2 ZeRO-1 and saves it (the source: it
has model, master and Adam tensors, and vocab padding), then reshards it offline to tp1 pp2 dp2 ZeRO-2,
loads that into a real tp1 pp2 dp2 ZeRO-2 trainer and saves again: the tool's files and pieces must be
exactly what that layout saves. Everything else runs in this process on the source.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megazero.checkpoint import format as fmt
from megazero.checkpoint.api import load_model, single_process_group
from megazero.checkpoint.format import CheckpointReader
from megazero.config import DataConfig, ModelConfig, OptimizerConfig, RunConfig, TrainingConfig
from megazero.validation import validate
from tests.checkpoint_utils import assert_same_tensors, checkpoint_tensors
from tests.dist_utils import run_distributed
from tests.tool_utils import one_line_error as _one_line_error
from tests.tool_utils import refused_export
from tests.tool_utils import run_main as _run

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert = _tool("convert_checkpoint")
info = _tool("checkpoint_info")


def _config(prefix, tokenizer_model, tp, pp, zero, dp_micro=2) -> RunConfig:
    # make_vocab_size_divisible_by 100: 512 pads to 600 at tp 1-2 and 800 at tp 4 (padding rows exercised)
    return RunConfig(
        model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                          make_vocab_size_divisible_by=100, hidden_dropout=0.0, attention_dropout=0.0),
        optimizer=OptimizerConfig(lr=1e-2, lr_warmup_iters=0),
        data=DataConfig(data_path=str(prefix), tokenizer_model=str(tokenizer_model), split="90,10,0"),
        training=TrainingConfig(micro_batch_size=dp_micro, global_batch_size=8, train_iters=2, seed=5, eval_iters=0,
                                log_interval=100, eval_interval=100),
    ).replace(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
              zero={"stage": zero, "reduce_bucket_size": 3000}, precision={"params_dtype": "bf16"})


def _train_save_reshard_resave(rank, world_size, prefix, tokenizer_model, root):
    from megazero.checkpoint.state import load_checkpoint, save_checkpoint
    from megazero.topology import GridShape, Topology
    from megazero.training.data_setup import ResolvedData
    from megazero.training.trainer import Trainer

    root = Path(root)
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=VOCAB, description="tiny")
    cfg = _config(prefix, tokenizer_model, tp=2, pp=2, zero=1)
    validate(cfg, world_size)
    cfg = cfg.resolved(world_size)
    trainer = Trainer(cfg, Topology.build(GridShape(world_size, tp=2, pp=2), rank), data, torch.device("cpu"),
                      run_dir=None, log=lambda _: None)
    trainer.train()
    save_checkpoint(trainer.checkpoint_subject(), root / "src")
    trainer.close()
    logits = None
    if rank == 0:  # the tools inside an initialised 4-rank job: private one-member groups, no collective
        code = _tool("convert_checkpoint").main(
            ["--load", str(root / "src"), "--save", str(root / "tp1pp2dp2"), "--target-tp", "1", "--target-pp", "2",
             "--target-dp", "2", "--target-zero-stage", "2"])
        assert code == 0
        logits = load_model(root / "src")(torch.arange(16).view(1, 16))
    dist.barrier()
    target = _config(prefix, tokenizer_model, tp=1, pp=2, zero=2)
    validate(target, world_size)
    target = target.resolved(world_size)
    trainer = Trainer(target, Topology.build(GridShape(world_size, tp=1, pp=2), rank), data, torch.device("cpu"),
                      run_dir=None, log=lambda _: None)
    # RNG not loaded: tp changed, so the converted checkpoint holds no RNG streams
    load_checkpoint(trainer.checkpoint_subject(), fmt.resolve_checkpoint(root / "tp1pp2dp2"), load_rng=False,
                    log=lambda _: None)
    save_checkpoint(trainer.checkpoint_subject(), root / "resaved")
    trainer.close()
    return logits


@pytest.fixture(scope="module")
def ckpts(tiny_dataset, tmp_path_factory):
    """{'src': tp2 pp2 ZeRO-1 bf16 iter folder, 'tp1pp2dp2': its reshard, 'resaved': that loaded into a real
    tp1 pp2 dp2 ZeRO-2 trainer and saved, 'logits': load_model(src) on tokens 0-15 inside the job}."""
    prefix, tokenizer_model = tiny_dataset
    root = tmp_path_factory.mktemp("ckpts")
    results = run_distributed(_train_save_reshard_resave, 4, prefix, tokenizer_model, str(root))
    out = {name: fmt.resolve_checkpoint(root / name) for name in ("src", "tp1pp2dp2", "resaved")}
    out["logits"] = results[0]
    out["tokenizer"] = tokenizer_model
    return out


def _assert_same_tensors(a: Path, b: Path, kinds=(*fmt.PARAM_KINDS, *fmt.ADAM_STATE)) -> None:
    """Exactly equal global tensors of the given kinds."""
    ta, tb = ({n: t for n, t in checkpoint_tensors(f).items() if n.split("/")[0] in kinds} for f in (a, b))
    assert_same_tensors(ta, tb, f"{a} vs {b}")


# ----- reshard -------------------------------------------------------------------------------------------
def test_reshard_writes_exactly_what_the_target_layout_saves(ckpts):
    tool, real = json.loads((ckpts["tp1pp2dp2"] / "index.json").read_text()), \
        json.loads((ckpts["resaved"] / "index.json").read_text())
    assert tool["layout"] == real["layout"] == {**real["layout"], "tp": 1, "pp": 2, "dp": 2, "zero_stage": 2}
    assert tool["config"]["parallel"] == real["config"]["parallel"]
    assert tool["config"]["zero"]["stage"] == 2 and tool["state"] == json.loads(
        (ckpts["src"] / "index.json").read_text())["state"]
    assert set(tool["files"]) == set(real["files"])
    assert tool["tensors"].keys() == real["tensors"].keys()
    for name, entry in tool["tensors"].items():  # same files, keys, regions and ZeRO flat ranges
        assert entry == real["tensors"][name], name
    assert any(p["flat"] != [0, math.prod([b - a for a, b in zip(p["start"], p["stop"])])]
               for t in tool["tensors"].values() for p in t["pieces"]), "ZeRO-2 dp2 splits some tensors"
    _assert_same_tensors(ckpts["src"], ckpts["tp1pp2dp2"])
    _assert_same_tensors(ckpts["src"], ckpts["resaved"])


@pytest.mark.parametrize("target", [("1", "1", "1", "1", None), ("4", "2", "2", "3", "3"), ("2", "2", "1", "2", "3")])
def test_reshard_any_target_reads_back_every_tensor(ckpts, tmp_path, capsys, target):
    tp, pp, vp, dp, zero = target
    argv = ["--load", ckpts["src"].parent, "--save", tmp_path / "out", "--target-tp", tp, "--target-pp", pp,
            "--target-vp", vp, "--target-dp", dp] + (["--target-zero-stage", zero] if zero else [])
    code, out, err = _run(convert, argv, capsys)
    assert code == 0, err
    folder = fmt.resolve_checkpoint(tmp_path / "out")
    _assert_same_tensors(ckpts["src"], folder)  # model, master, exp_avg, exp_avg_sq
    index = json.loads((folder / "index.json").read_text())
    world = int(tp) * int(pp) * int(dp)
    assert index["layout"]["world"] == world and index["layout"]["vp"] == int(vp)
    assert index["config"]["parallel"]["tensor_model_parallel_size"] == int(tp)
    assert index["config"]["zero"]["stage"] == int(zero or 1)
    assert all(int(f[4:9]) < world for f in index["files"] if f.startswith("rank"))
    src = json.loads((ckpts["src"] / "index.json").read_text())
    if (tp, pp, vp) == ("2", "2", "1"):  # same tp/pp/vp: the RNG streams are carried over to the dp-rank-0 files
        assert "RNG streams copied" in out and set(index["rng"]) == set(src["rng"])
        a, b = CheckpointReader(ckpts["src"]), CheckpointReader(folder)
        for coords, entry in src["rng"].items():
            for s in [*entry["streams"], "ambient"]:
                key = f"{entry['prefix']}/{s}"
                assert torch.equal(a.get(entry["file"], key), b.get(index["rng"][coords]["file"], key))
    else:
        assert "RNG streams not copied" in out and index["rng"] == {}
    assert index["converted_from"]["layout"] == src["layout"]


def test_reshard_bad_targets_are_one_line_and_write_nothing(ckpts, tmp_path, capsys):
    src = ckpts["src"]
    for argv, message in [
        (["--target-tp", "3", "--target-pp", "1"], "4 attention heads are not divisible by 3"),
        (["--target-tp", "1", "--target-pp", "3"], "not divisible by pp x vp = 3"),
        (["--target-tp", "1", "--target-pp", "1", "--target-vp", "2"], "needs --pipeline-model-parallel-size > 1"),
    ]:
        code, _, err = _run(convert, ["--load", src, "--save", tmp_path / "bad", *argv], capsys)
        assert code == 2 and message in _one_line_error(err)
        assert not (tmp_path / "bad").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = _run(convert, ["--load", src, "--save", tmp_path / "full", "--target-tp", "1", "--target-pp", "1"],
                        capsys)
    assert code == 2 and "already exists and is not an empty folder" in _one_line_error(err)
    with pytest.raises(SystemExit) as exit_info:  # usage errors: one line, exit 2
        convert.main(["--load", str(src), "--save", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "needs --target-tp and --target-pp" in _one_line_error(capsys.readouterr().err)
    code, _, err = _run(convert, ["--load", tmp_path / "nothing", "--to-hf", tmp_path / "hf"], capsys)
    assert code == 2 and "no such folder" in _one_line_error(err)
    corrupt = tmp_path / "corrupt"  # a bad source file: named, and nothing written
    shutil.copytree(src, corrupt)
    shard = corrupt / "rank00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, _, err = _run(convert, ["--load", corrupt, "--save", tmp_path / "o", "--target-tp", "1", "--target-pp", "1"],
                        capsys)
    assert code == 2 and f"{shard}: checksum mismatch" in _one_line_error(err) and not (tmp_path / "o").exists()


# ----- Hugging Face --------------------------------------------------------------------------------------
def test_hf_export_logits_match_load_model(ckpts, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    code, out, err = _run(convert, ["--load", ckpts["src"], "--to-hf", tmp_path / "hf"], capsys)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    # tokenizer.json + tokenizer_config.json: AutoTokenizer loads the run's sentencepiece model (test_hf_tokenizer.py)
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(ckpts["tokenizer"]).read_bytes()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == VOCAB and hf.config.eos_token_id == 1
    model = load_model(ckpts["src"].parent)  # the SAVE folder: its latest
    tokens = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (3, 16, VOCAB) and ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the model load_model built inside the 4-rank job (a one-member group there) is the same model
    torch.testing.assert_close(ckpts["logits"], model(torch.arange(16).view(1, 16)), rtol=0, atol=0)


def test_hf_import_of_export_is_exact(ckpts, tmp_path, capsys):
    src = checkpoint_tensors(ckpts["src"])
    assert _run(convert, ["--load", ckpts["src"], "--to-hf", tmp_path / "hf"], capsys)[0] == 0
    code, out, err = _run(convert, ["--from-hf", tmp_path / "hf", "--save", tmp_path / "bf16", "--params-dtype", "bf16",
                                    "--target-tp", "2", "--target-pp", "2"], capsys)
    assert code == 0, err
    back = fmt.resolve_checkpoint(tmp_path / "bf16")
    assert back.name == "iter_0000000" and (back / "tokenizer.model").is_file()
    imported = checkpoint_tensors(back)
    for name, t in src.items():
        if name.startswith(("model/", "master/")):  # bf16 values and fp32 masters: bit-exact
            assert torch.equal(imported[name], t), name
    assert all(not t.any() for n, t in imported.items() if n.startswith("exp_avg"))  # fresh Adam
    index = json.loads((back / "index.json").read_text())
    assert index["state"]["adam_steps"] == 0 and index["iteration"] == 0
    assert set(index["rng"]) == {"pp0.tp0", "pp0.tp1", "pp1.tp0", "pp1.tp1"}  # a fresh run's streams
    assert index["config"]["training"]["global_batch_size"] is not None  # resolved, as a run records it


def test_hf_round_trip_of_a_transformers_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.GPT2Config(vocab_size=300, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "orig")
    assert _run(convert, ["--from-hf", tmp_path / "orig", "--save", tmp_path / "mz"], capsys)[0] == 0
    code, out, err = _run(convert, ["--load", tmp_path / "mz", "--to-hf", tmp_path / "again"], capsys)
    assert code == 0 and "no tokenizer copied" in out
    a, b = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    a = {k if k.startswith(("transformer.", "lm_head")) else f"transformer.{k}": v for k, v in a.items()}
    a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a megazero model of it computes HF's logits
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "orig").eval()
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "mz")(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


def test_hf_refusals_are_one_line(ckpts, tmp_path, capsys):
    # a GPT-2 model with a part GPT-2 lacks; RMSNorm with learned positions (a Llama part without rope: neither
    # family). The Llama family's own refusals: tests/unit/test_hf_llama.py
    err = refused_export(convert, ckpts["src"], {"qk_layernorm": True}, tmp_path, capsys)
    assert "qk_layernorm=True has no Hugging Face GPT-2 equivalent" in err
    err = refused_export(convert, ckpts["src"], {"normalization": "RMSNorm"}, tmp_path, capsys)
    assert "position_embedding_type='learned_absolute' has no Hugging Face Llama-family equivalent" in err
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = _run(convert, ["--from-hf", tmp_path / "bert", "--save", tmp_path / "out"], capsys)
    assert code == 2 and "not a GPT-2 model" in _one_line_error(err) and not (tmp_path / "out").exists()


# ----- load_model ----------------------------------------------------------------------------------------
def test_load_model_leaves_no_global_state(ckpts):
    initialized, rng = dist.is_initialized(), torch.get_rng_state()
    model = load_model(ckpts["src"], dtype="bf16")
    assert dist.is_initialized() == initialized and torch.equal(rng, torch.get_rng_state())
    assert not model.training and model.iteration == 2
    reader = CheckpointReader(ckpts["src"])
    qkv = reader.read("model/layers.1.attention.query_key_value.weight", (0, 0), (96, 32))
    assert torch.equal(model.gpt.layers["1"].attention.query_key_value.weight, qkv)  # stored bf16 values
    assert model.gpt.word_embeddings.weight.shape[0] == 600 and not model.gpt.word_embeddings.weight[VOCAB:].any()
    with single_process_group() as group:
        assert dist.get_world_size(group) == 1
    assert dist.is_initialized() == initialized


# ----- checkpoint_info -----------------------------------------------------------------------------------
def test_checkpoint_info_text_json_and_verify(ckpts, capsys):
    code, out, err = _run(info, [ckpts["src"].parent, "--tensors", "--verify"], capsys)
    assert code == 0, err
    assert "iteration    2" in out and "tp2 pp2 vp1 dp1 (world 4), ZeRO stage 1, bf16" in out
    assert "sha256 verified" in out and "model/layers.3.mlp.dense_h_to_4h.weight" in out
    code, out, _ = _run(info, [ckpts["tp1pp2dp2"], "--json", "--tensors"], capsys)
    data = json.loads(out)
    assert data["iteration"] == 2 and data["layout"]["dp"] == 2 and data["converted_from"]["layout"]["tp"] == 2
    assert set(data["kinds"]) == {"model", "master", "exp_avg", "exp_avg_sq"}
    assert data["kinds"]["model"]["dtypes"] == ["bfloat16"]
    assert data["parameters"] == data["kinds"]["master"]["elements"]
    assert len(data["tensors"]) == sum(k["tensors"] for k in data["kinds"].values())


def test_checkpoint_info_errors_are_one_line(ckpts, tmp_path, capsys):
    code, _, err = _run(info, [tmp_path], capsys)
    assert code == 2 and "not a checkpoint folder" in _one_line_error(err)
    copy = tmp_path / "ck"
    shutil.copytree(ckpts["src"], copy)
    shard = copy / "rank00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert _run(info, [copy], capsys)[0] == 0  # without --verify only the index is read
    code, _, err = _run(info, [copy, "--verify"], capsys)
    assert code == 2 and f"{shard}: checksum mismatch" in _one_line_error(err)


def test_tools_run_as_scripts(ckpts):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_info.py"), str(ckpts["src"]), "--json"],
                            capture_output=True, text=True, cwd=REPO.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["iteration"] == 2
