"""Every bad input: one line on stderr naming the problem, exit code 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nca_jax import evaluate, train_cli
from nca_jax.cli import run_cli
from nca_jax.phantoms import write_phantom_folder

ROOT = Path(__file__).resolve().parent.parent


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    return write_phantom_folder(tmp_path / "data", n=3, seed=0, size=32)


def _train(tmp_path, data, *extra):
    return [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(ROOT / "configs" / "tiny.json"),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda d: (d / "masks" / "phantom_0_0001.png").unlink(), "image has no mask"),
        (lambda d: _png(d / "masks" / "extra.png", np.zeros((32, 32))), "mask has no image"),
        (
            lambda d: (d / "images" / "phantom_0_0000.png").write_text("not a png"),
            "not a readable image",
        ),
        (lambda d: _png(d / "masks" / "phantom_0_0002.png", np.zeros((16, 16))), "mask is 16x16"),
        (lambda d: [p.unlink() for p in (d / "images").iterdir()], "no image files"),
    ],
)
def test_train_bad_folders(tmp_path, folder, capsys, breakage, expected):
    breakage(folder)
    code, err = _exit(train_cli.main, _train(tmp_path, folder), capsys)
    assert code == 2
    assert expected in err and str(folder) in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_missing_folder_and_bad_config(tmp_path, capsys):
    code, err = _exit(train_cli.main, _train(tmp_path, tmp_path / "nope"), capsys)
    assert code == 2 and "nope" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"epochz": 3}}')
    code, err = _exit(
        train_cli.main, ["--out", str(tmp_path / "run"), "--config", str(bad)], capsys
    )
    assert code == 2 and "epochz" in err and "bad.json" in err
    assert not (tmp_path / "run").exists()


def test_evaluate_bad_runs(tmp_path, folder, capsys):
    (tmp_path / "notarun").mkdir()
    argv = ["--run", str(tmp_path / "notarun"), "--data", str(folder), "--out", str(tmp_path / "e")]
    code, err = _exit(evaluate.main, argv, capsys)
    assert code == 2 and "not a run" in err
    assert not (tmp_path / "e").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((ROOT / "configs" / "tiny.json").read_text())
    code, err = _exit(evaluate.main, ["--run", str(run), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "no weights.npz" in err
    np.savez(run / "weights.npz", foo=np.zeros(3))
    code, err = _exit(evaluate.main, ["--run", str(run), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "do not fit the model" in err
    (run / "weights.npz").write_text("garbage")
    code, err = _exit(evaluate.main, ["--run", str(run), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "not a readable weights" in err
    assert not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.")]  # no temporary left


def test_real_process_exit_code(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--run",
            str(tmp_path / "x"),
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
