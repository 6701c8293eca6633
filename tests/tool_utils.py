"""Running the command-line tools (tools/*.py) in-process in tests: load one as a module, call its
main with captured output, read its one-line error, and the export refusal setup the HF tests share."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """tools/{name}.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of module.main(argv)."""
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The tool's only stderr line, which must be `error: ...` (progress bars ignored)."""
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused_export(convert, checkpoint: Path, model_change: dict, tmp_path: Path, capsys) -> str:
    """--to-hf of a copy of `checkpoint` whose config.model has `model_change`: its one-line error
    (asserting exit code 2 and that nothing was written)."""
    copy, out = tmp_path / "changed_ckpt", tmp_path / "hf_refused"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    index = json.loads((copy / "index.json").read_text())
    index["config"]["model"].update(model_change)
    (copy / "index.json").write_text(json.dumps(index))
    code, _, err = run_main(convert, ["--load", copy, "--to-hf", out], capsys)
    assert code == 2 and not out.exists(), err
    return one_line_error(err)
