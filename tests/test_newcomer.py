"""A newcomer's first hour (#19): the light install, honest summaries, warnings, and the small CLI manners."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import FIXTURES

from spinquant_onnx import __version__
from spinquant_onnx.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXPORTERS = FIXTURES / "exporters"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]):
    """The real command line in this process (main(argv)); stdout/stderr captured at the descriptor level."""

    def run(*args: str) -> Done:
        capfd.readouterr()
        code = main(list(args))
        captured = capfd.readouterr()
        return Done(code, captured.out, captured.err)

    return run


# ------------------------------------------------------------------------------------- install and README


def _bash_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S)]


def test_readme_quick_start_is_light_then_tests_and_ci_runs_exactly_these() -> None:
    first, second = _bash_blocks("Quick start")[:2]
    assert first.startswith("pip install . && spinquant-onnx rotate fixtures/llama_tied_dynamo.onnx")
    assert "install.sh" not in first and "--validate" in first
    assert second == "bash scripts/install.sh && python -m pytest -q"
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == [first, second]


# Packages behind an optional extra: imported only lazily (from inside a function) by the rest of the package.
OPTIONAL_PACKAGES = {"learn": ROOT / "spinquant_onnx" / "integrations" / "learn"}


def _third_party_imports() -> set[str]:
    """Top-level modules the package imports at module level (lazy imports inside functions are optional)."""
    found = set()
    for path in (ROOT / "spinquant_onnx").rglob("*.py"):
        if any(folder in path.parents for folder in OPTIONAL_PACKAGES.values()):
            continue
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found |= {n.split(".")[0] for n in names}
    return found - set(sys.stdlib_module_names) - {"spinquant_onnx"}


def test_runtime_dependencies_cover_every_module_level_import() -> None:
    """`pip install .` alone gives a working CLI: what the package imports on load is in its dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    provided = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("-", "_") for d in deps}
    provided |= {"onnxruntime"} if "onnxruntime_gpu" in provided else set()
    missing = {m for m in _third_party_imports() if m.lower() not in provided}
    assert not missing, f"imported on load but not in pyproject dependencies: {missing}"
    assert not {"torch", "aimet_onnx", "matplotlib"} & {d.split("=")[0] for d in provided}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(OPTIONAL_PACKAGES) <= set(extras)


# Modules of an optional package that need none of its extras (the CLI reads learn's defaults from here).
EXTRA_FREE = {"spinquant_onnx.integrations.learn.config"}


def _module_imports(path: Path) -> list[str]:
    """The modules a file imports at module level."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_optional_packages_are_imported_lazily() -> None:
    """Nothing outside an optional package imports it at module level (`pip install .` must not need torch),
    except its extra-free modules, which import nothing but the standard library and the package's core."""
    for path in (ROOT / "spinquant_onnx").rglob("*.py"):
        if any(folder in path.parents for folder in OPTIONAL_PACKAGES.values()):
            continue
        for module in _module_imports(path):
            if module.startswith("spinquant_onnx.integrations.learn"):
                assert module in EXTRA_FREE, path
    for module in EXTRA_FREE:
        path = ROOT / (module.replace(".", "/") + ".py")
        for name in _module_imports(path):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__" or (
                name.startswith("spinquant_onnx.") and not name.startswith("spinquant_onnx.integrations.learn")
            ), f"{path.name} imports {name}"


def test_tests_import_this_checkout() -> None:
    """After `pip install .` then install.sh's editable install, the suite must test this tree, not a copy."""
    import spinquant_onnx

    assert Path(spinquant_onnx.__file__).resolve().parent.parent == ROOT


def test_install_script_checks_the_imported_copy_is_this_checkout() -> None:
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert 'pip install -e ".[test]"' in script
    assert "spinquant_onnx.__file__" in script and "not this checkout" in script


# ------------------------------------------------------------------------------------------ small manners


def test_version_and_debug_after_the_subcommand(cli, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capfd.readouterr().out.strip() == f"spinquant-onnx {__version__}"
    done = cli("inspect", str(FIXTURES / "llama_ts.onnx"), "--debug")
    assert done.returncode == 0, done.stderr
    missing = cli("inspect", "nowhere.onnx", "--debug")
    assert missing.returncode == 2 and "Traceback" in missing.stderr and "no such file" in missing.stderr


def test_inspect_into_head_exits_quietly() -> None:
    reader = subprocess.Popen([sys.executable, "-m", "spinquant_onnx.cli", "inspect",
                               str(FIXTURES / "phi3_dynamo.onnx")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT)
    reader.stdout.readline()
    reader.stdout.close()  # `| head -1`: the reader goes away after one line
    stderr = reader.stderr.read().decode()
    assert reader.wait() == 0, stderr
    assert stderr == ""


def test_inspect_json_creates_its_folder_and_reports_heads(cli, tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "roles.json"
    done = cli("inspect", str(EXPORTERS / "genai_llama" / "model.onnx"), "--json", str(target))
    assert done.returncode == 0, done.stderr
    assert "attention: 2 blocks, 4 heads, 2 kv heads, head_dim 16" in done.stdout
    assert "R2: possible" in done.stdout and "R3: not possible:" in done.stdout
    assert "GroupQueryAttention" in done.stdout.split("R3: not possible:")[1].splitlines()[0]
    data = json.loads(target.read_text())
    info = data["inspect"]
    assert [b["head_dim"] for b in info["attention"]["blocks"]] == [16, 16]
    assert info["attention"]["blocks"][0]["num_kv_heads"] == 2
    assert info["rotations"]["r1"] is None and info["rotations"]["r4"] is None
    assert "GroupQueryAttention" in info["rotations"]["r3"]
    out = tmp_path / "r.onnx"  # the map with its informational part is still a valid --roles input
    assert main(["rotate", str(EXPORTERS / "genai_llama" / "model.onnx"), str(out), "--roles", str(target),
                 "--providers", "cpu"]) == 0


def test_inspect_says_all_rotations_possible_on_a_plain_export(cli) -> None:
    done = cli("inspect", str(FIXTURES / "qwen3_ts.onnx"))
    assert done.returncode == 0, done.stderr
    for name in ("R1", "R2", "R3", "R4"):
        assert f"{name}: possible" in done.stdout


def test_external_data_file_names_its_model(cli) -> None:
    done = cli("inspect", str(EXPORTERS / "genai_llama" / "model.onnx.data"))
    assert done.returncode == 2
    assert "this is the external data file of" in done.stderr
    assert str(Path("genai_llama") / "model.onnx") in done.stderr and "not a valid ONNX" not in done.stderr


def test_onnxruntime_log_lines_stay_off_stderr(tmp_path: Path) -> None:
    """A run that fails inside onnxruntime prints our one line and nothing of ORT's own logging."""
    import onnx
    from test_reliability import _fails_at_run  # the reliability suite's model that ORT refuses at run time

    path = tmp_path / "m.onnx"
    onnx.save(_fails_at_run(), str(path))
    done = subprocess.run([sys.executable, "-m", "spinquant_onnx.cli", "rotate", str(path), str(tmp_path / "r.onnx"),
                           "--validate"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spinquant-onnx: error:"), done.stderr
    assert "[E:onnxruntime" not in done.stderr and "[W:onnxruntime" not in done.stderr


def test_role_map_with_null_hidden_size_is_one_line(cli, tmp_path: Path) -> None:
    roles = tmp_path / "roles.json"
    assert main(["inspect", str(FIXTURES / "llama_ts.onnx"), "--json", str(roles)]) == 0
    data = json.loads(roles.read_text())
    data["hidden_size"] = None
    roles.write_text(json.dumps(data))
    done = cli("rotate", str(FIXTURES / "llama_ts.onnx"), str(tmp_path / "r.onnx"), "--roles", str(roles))
    assert done.returncode == 2
    assert done.stderr.strip() == ("spinquant-onnx: error: role map entry hidden_size: must be a positive integer, "
                                   "got null")


# ---------------------------------------------------------------------------------------- rotate summary


def test_summary_names_everything_and_report_keeps_an_r1_only_file(cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    q += 3e-6 * rng.standard_normal(q.shape)  # off orthogonal by ~1e-5: snapped back, and the report says so
    np.savez(tmp_path / "r1.npz", R1=q)
    out, report = tmp_path / "r.onnx", tmp_path / "report.json"
    done = cli("rotate", str(FIXTURES / "qwen3_ts.onnx"), str(out), "--r2", "--r3", "--r4", "--validate",
               "--providers", "cpu", "--rotation-file", str(tmp_path / "r1.npz"), "--rotation", "random-hadamard",
               "--report", str(report))
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[0]
    data = json.loads(report.read_text())
    assert data["rotation"]["rotation_file"]["r1"] == 64 and data["rotation"]["rotation_file"]["r2_layers"] == []
    for part in ("R1 ", "n=64", "float64", f"rotation file {tmp_path / 'r1.npz'} (R1", "re-orthogonalized",
                 "R2 (head_dim 16) in 2 blocks", "R3 online on Q and K in 2 blocks", "R4 online (order 96) in 2 blocks",
                 "validated on CPUExecutionProvider"):
        assert part in line, (part, line)
    nodes = sum(int(o.get("nodes", 1)) for o in data["online_rotations"])
    assert f"{len(data['online_rotations'])} online rotations ({nodes} nodes)" in line
    assert "--rotation ignored: R1 comes from the rotation file" in done.stderr
    assert any("--rotation ignored" in w for w in data["warnings"])


def test_block_size_precision_and_seed_in_the_summary(cli, tmp_path: Path) -> None:
    done = cli("rotate", str(FIXTURES / "llama_ts.onnx"), str(tmp_path / "r.onnx"), "--rotation",
               "random-hadamard", "--seed", "5", "--block-size", "16", "--precision", "float32")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "R1 block-diagonal random-hadamard (n=64, blocks of 16, seed 5, float32)" in line
    assert line.endswith("not validated") and done.stderr == ""


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        (["--seed", "3"], "--seed is ignored with --rotation hadamard"),
        (["--trust-roles"], "--trust-roles is ignored without --roles"),
        (["--providers", "cpu"], "--providers is ignored without --validate"),
    ],
)
def test_ignored_options_warn(cli, extra: list[str], warning: str, tmp_path: Path) -> None:
    done = cli("rotate", str(FIXTURES / "llama_ts.onnx"), str(tmp_path / "r.onnx"), *extra)
    assert done.returncode == 0, done.stderr
    assert f"spinquant-onnx: warning: {warning}" in done.stderr


def test_cuda_asked_but_absent_warns(cli, tmp_path: Path) -> None:
    import onnxruntime as ort

    from spinquant_onnx.core.equivalence import resolve_providers

    done = cli("rotate", str(FIXTURES / "llama_ts.onnx"), str(tmp_path / "r.onnx"), "--validate",
               "--providers", "gpu,cpu")
    assert done.returncode == 0, done.stderr
    cuda_loads = "CUDAExecutionProvider" in ort.get_available_providers() and resolve_providers(["cuda"])[0] != (
        "CPUExecutionProvider")
    assert ("CUDA was asked for (--providers gpu,cpu) but does not load here" in done.stderr) is not cuda_loads


@pytest.mark.parametrize("size", ["0", "-4"])
def test_block_size_zero_or_negative_is_refused_as_such(size: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rotate", str(FIXTURES / "llama_ts.onnx"), str(tmp_path / "r.onnx"), f"--block-size={size}"])
    assert exited.value.code == 2
    assert f"argument --block-size: must be a positive integer, got {int(size)}" in capsys.readouterr().err
    assert not (tmp_path / "r.onnx").exists()


def test_block_size_zero_refused_in_python(tmp_path: Path) -> None:
    from spinquant_onnx import SpinQuantError, convert

    with pytest.raises(SpinQuantError, match="block size must be a positive integer, got 0"):
        convert(FIXTURES / "llama_ts.onnx", tmp_path / "r.onnx", block_size=0)


# ---------------------------------------------------------------------------------------------- scripts

# Scripts that run in the test environment (the fixture exporters need their own venvs with transformers).
TEST_ENV_SCRIPTS = ["aimet_quantsim_error.py", "bench_hadamard_factors.py", "bench_online_hadamard.py",
                    "benchmark_rotate.py", "conformance.py", "make_routed_deepstack_fixture.py", "migrate_paths.py",
                    "output_hashes.py", "survey.py"]


def test_every_script_has_argparse_help() -> None:
    scripts = sorted(p for p in (ROOT / "scripts").glob("*.py") if "__main__" in p.read_text())
    assert scripts
    for path in scripts:
        assert "ArgumentParser(" in path.read_text(), path.name
    assert set(TEST_ENV_SCRIPTS) <= {p.name for p in scripts}


def test_script_help_runs_nothing(tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (ROOT / "README.md", FIXTURES / "conformance.json")}
    running = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), "--help"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in TEST_ENV_SCRIPTS]
    for name, process in zip(TEST_ENV_SCRIPTS, running, strict=True):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err)
        assert out.startswith("usage:"), name
    assert before == {p: p.read_bytes() for p in before}
    assert list(tmp_path.iterdir()) == []
