"""Users' files are never harmed (issue 15, defect classes 3 and 4): an --out that is, holds or
sits inside an input, a folder this project did not write, a file where a folder is meant, or a
folder that cannot be created ends in one line and exit code 2 before any work, and nothing
is written or deleted."""

import hashlib
import os
from pathlib import Path

import pytest

from nca_jax import device_train, evaluate, export_cli, finetune_cli, train_cli
from nca_jax.checkpoint import RunError
from nca_jax.cli import run_cli
from nca_jax.paths import check_output_file, check_output_folder
from nca_jax.phantoms import write_phantom_folder

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.json")


def _tree(p: Path) -> dict[str, str]:
    """Every file under p with its SHA-256 (what must not change)."""
    return {
        str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(p.rglob("*"))
        if f.is_file()
    }


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = write_phantom_folder(root / "data", n=4, seed=0, size=64)
    run = root / "run"
    assert (
        train_cli.main(
            [
                "--data",
                str(data),
                "--out",
                str(run),
                "--config",
                TINY,
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    return root, data, run


def test_rules_on_plain_paths(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"x")
    for out, why in [
        (tmp_path / "in", "is the input"),
        (tmp_path / "in" / "sub", "lies inside the input"),
        (tmp_path, "contains the input"),
    ]:
        with pytest.raises(RunError, match=why):
            check_output_folder(out, [tmp_path / "in"])
    with pytest.raises(RunError, match="did not write"):
        check_output_folder(tmp_path / "in")
    (tmp_path / "f").write_text("a file")
    with pytest.raises(RunError, match="is a file"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(RunError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "f" / "deeper" / "out")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    with pytest.raises(RunError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "m.tflite")
    with pytest.raises(RunError, match="is a folder"):
        check_output_file(tmp_path / "in")
    with pytest.raises(RunError, match="is the input"):
        check_output_file(tmp_path / "in" / "x.png", [tmp_path / "in" / "x.png"])


def test_train_refuses_a_folder_of_someone_elses_files(world, tmp_path, capsys):
    _, data, _ = world
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.npz").write_bytes(b"the user's own weights")
    (mine / "metrics.jsonl").write_text("the user's own log\n")
    before = _tree(mine)
    code, err = _exit(
        train_cli.main,
        ["--data", str(data), "--out", str(mine), "--config", TINY, "--no-progress"],
        capsys,
    )
    assert code == 2 and "did not write" in err and len(err.splitlines()) == 1
    assert _tree(mine) == before


@pytest.mark.parametrize("where", ["data", "inside-data", "file"])
def test_train_and_finetune_refuse_outputs_on_their_inputs(world, tmp_path, capsys, where):
    root, data, run = world
    out = {
        "data": data,
        "inside-data": data / "images" / "run",
        "file": data / "images" / "phantom_0_0000.png",
    }[where]
    before = _tree(root)
    code, err = _exit(
        train_cli.main,
        ["--data", str(data), "--out", str(out), "--config", TINY, "--no-progress"],
        capsys,
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    code, err = _exit(
        finetune_cli.main,
        ["--run", str(run), "--data", str(data), "--out", str(out), "--no-progress"],
        capsys,
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _tree(root) == before


@pytest.mark.parametrize("which", ["run", "data"])
def test_evaluate_overwrite_never_deletes_an_input(world, capsys, which):
    root, data, run = world
    before = _tree(root)
    out = {"run": run, "data": data}[which]
    code, err = _exit(
        evaluate.main,
        [
            "--run",
            str(run),
            "--data",
            str(data),
            "--out",
            str(out),
            "--overwrite",
            "--samples",
            "1",
        ],
        capsys,
    )
    assert code == 2 and "is the input" in err and len(err.splitlines()) == 1
    assert _tree(root) == before


def test_evaluate_overwrites_only_its_own_folder(world, tmp_path, capsys):
    _, data, run = world
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("keep me")
    argv = ["--run", str(run), "--data", str(data), "--samples", "1", "--no-png"]
    code, err = _exit(evaluate.main, [*argv, "--out", str(other), "--overwrite"], capsys)
    assert code == 2 and "did not write" in err
    assert (other / "thesis.txt").read_text() == "keep me"
    code, err = _exit(evaluate.main, [*argv, "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    code, err = _exit(evaluate.main, [*argv, "--out", str(tmp_path / "ev"), "--overwrite"], capsys)
    assert code == 0, err  # its own earlier evaluation: replaced


def test_export_checks_its_output_before_converting(world, tmp_path, capsys):
    _, _, run = world
    code, err = _exit(
        export_cli.main,
        ["--run", str(run), "--out", str(tmp_path / "missing" / "m.tflite")],
        capsys,
    )
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_device_train_refuses_foreign_folders_and_inputs(world, tmp_path, capsys):
    _, data, _ = world
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not opened: the output is checked first")
    for out, why in [(data, "is the input"), (model, "is the input")]:
        code, err = _exit(
            device_train.main,
            ["predict", "--model", str(model), "--data", str(data), "--out", str(out)],
            capsys,
        )
        assert code == 2 and why in err, err


def test_a_killed_evaluations_temporary_folder_is_cleaned_up(tmp_path):
    import subprocess
    import sys

    from nca_jax.evaluate import remove_stale_temporaries

    out = tmp_path / "ev"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".ev.{dead.stdout.strip()}.abc123"
    (stale / "cases").mkdir(parents=True)
    alive = tmp_path / f".ev.{os.getppid()}.def456"  # a running process's work
    alive.mkdir()
    unrelated = tmp_path / ".evolution.notes"
    unrelated.mkdir()
    assert remove_stale_temporaries(out) == [stale]
    assert not stale.exists() and alive.exists() and unrelated.exists()
