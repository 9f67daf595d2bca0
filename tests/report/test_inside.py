"""The "Inside the model" report section, on run folders and analysis files written by hand (no model)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from peftlab.report import build_report
from peftlab.report.inside import subspace_similarity
from peftlab.store import write_atomic, write_json

TYPES = ("query", "value")
FIGURES = ("inside-drift", "inside-attention", "inside-spectra", "inside-intruders", "inside-r", "inside-subspaces")


def write_run(root: Path, name: str, method: str, score: float, point: dict | None = None, index: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"run": name, "method": method, "task": {"name": "classification"}}
    if point is not None or method == "full":
        config["sweep"] = {"base": method, "stage": "run", "point": point or {}, "index": index}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_json(folder / "status.json", {"state": "done"})
    metrics = {
        "task": {"primary_metric": "accuracy"},
        "eval": {"test": {"accuracy": score, "n": 10}},
        "params": {"trainable": 10, "total": 1000, "trainable_pct": 1.0 if method != "full" else 100.0},
        "train": {"train_seconds": 1.0},
    }
    write_json(folder / "metrics.json", metrics)
    return folder


def matrix(layer: int, kind: str, rank: int | None) -> dict[str, Any]:
    return {"name": f"encoder.layer.{layer}.{kind}", "layer": layer, "type": kind, "rank_limit": rank}


def write_analysis(folder: Path, method: str, rank: int | None, level: float, basis: np.ndarray | None) -> None:
    """An analysis.json whose numbers follow `level` (so each run's row is predictable), and subspaces.npz."""
    matrices = [matrix(layer, kind, rank) for layer in (0, 1) for kind in TYPES]
    summary = {
        "matrices": 4,
        "relative_change": 0.001234 * level,
        "effective_rank": 2.0 * level,
        "k90": 3.0 * level,
        "intruders": int(4 * level),
        "intruders_per_matrix": level,
        "intruder_energy": 0.1 * level,
        "intruders_by_epsilon": {f"{e / 10:.1f}": e * int(level) for e in range(1, 10)},
    }
    spectra = {kind: [1.0 / (i + 1) * level for i in range(8)] for kind in TYPES}
    drift = {
        split: {"n": 4, "layers": ["embeddings", "1", "2"], "cka": [1.0, 1 - 0.1 * level, 1 - 0.2 * level]}
        for split in ("test", "ood")
    }
    js = [[0.01 * level, 0.03 * level], [0.02 * level, 0.04 * level]]  # mean 0.025 * level
    data = {
        "version": 1,
        "run": folder.name,
        "method": method,
        "seconds": {"total": 12.34},
        "weights": {"matrices": matrices, "summary": summary, "by_type": {}, "spectra": spectra, "rest": None},
        "drift": {"splits": drift},
        "attention": {"splits": {"test": {"n": 4, "layers": 2, "heads": 2, "js": js}}},
        "errors": {},
    }
    write_json(folder / "analysis" / "analysis.json", data)
    if basis is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **{m["name"]: basis[:, : rank or 4].astype(np.float32) for m in matrices})
        write_atomic(folder / "analysis" / "subspaces.npz", buffer.getvalue())


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))[0]


def rank_study(root: Path) -> None:
    """lora r=2, r=8 and a second r=8 seed (same basis as the first), full FT, and ia3 without analysis."""
    root.mkdir(parents=True)
    spec = {"name": root.name, "methods": {"lora": {}, "full": {}, "ia3": {}}, "evaluate": {"splits": ["test"]}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec))
    shared = orthonormal(16, 8, 1)
    runs = [("lora-r8-seed0", 8, 2.0, shared), ("lora-r2", 2, 1.0, orthonormal(16, 8, 2))]
    runs.append(("lora-r8-seed1", 8, 3.0, shared))
    for i, (name, rank, level, basis) in enumerate(runs):
        folder = write_run(root, name, "lora", 0.5 + 0.1 * level, {"lora.r": rank}, index=i)
        write_analysis(folder, "lora", rank, level, basis)
    write_analysis(write_run(root, "full", "full", 0.9), "full", None, 4.0, orthonormal(16, 8, 3))
    write_run(root, "ia3", "ia3", 0.55)


def test_section_shows_each_runs_numbers_the_sweep_and_the_figures(tmp_path: Path) -> None:
    root = tmp_path / "rank"
    rank_study(root)
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Inside the model" in md and "Not analysed: ia3." in md
    header = "| Run | Method | Trainable % | test accuracy | Matrices | ‖ΔW‖/‖W0‖ | Effective rank | k90 | Intruders |"
    assert header + " Intruders / matrix | Intruder energy | CKA (test) | JS (test) | Analysis time |" in md
    # level 2: relative change 0.002468, CKA mean (1 + 0.8 + 0.6) / 3, JS mean 0.05
    assert "| lora-r8-seed0 | lora | 1.000 | 0.7000 | 4 | 0.00247 | 4.00 | 6.0 | 8 | 2.00 | 0.200 | 0.8000 |" in md
    assert "| 0.0500 | 12.3 s |" in md
    assert "| full | full | 100.000 | 0.9000 | 4 | 0.00494 | 8.00 | 12.0 | 16 | 4.00 | 0.400 | 0.6000 | 0.1000 |" in md
    section = md.split("### Inside the model against r")[1].splitlines()
    sweep = [line for line in section if line.startswith(("| 2 |", "| 8 |", "| full FT |"))]
    assert [line.split(" | ")[1] for line in sweep] == ["lora-r2", "lora-r8-seed0", "lora-r8-seed1", "full"]
    assert sweep[0] == "| 2 | lora-r2 | 0.6000 | 2.00 | 3.0 | 4 | 0.9000 | 0.0250 |"
    # pairs: lowest vs highest rank, and the two seeds of r=8 (same basis: φ = 1)
    assert "| lora-r2 / lora-r8-seed0 | 2 / 8 |" in md
    assert "| lora-r8-seed0 / lora-r8-seed1 | 8 / 8 | 1.000 | 1.000 |" in md
    assert "`query` matrices" in md and "at ε near 1 almost any changed direction counts" in md
    for name in FIGURES:
        assert (root / "figures" / f"{name}.png").stat().st_size > 1000, name
        assert f"figures/{name}.png" in md
    assert "data:image/png;base64" in (root / "report.html").read_text()


def test_section_absent_without_analysis(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    (root / "experiment.yaml").write_text(yaml.safe_dump({"name": "plain", "methods": {"lora": {}}}))
    write_run(root, "lora", "lora", 0.7)
    build_report(root)
    md = (root / "report.md").read_text()
    assert "Inside the model" not in md and not list((root / "figures").glob("inside-*"))


def test_damaged_files_are_said_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "rank"
    rank_study(root)
    (root / "lora-r2" / "analysis" / "analysis.json").write_text('{"version": 1, "weights": ')
    (root / "lora-r8-seed1" / "analysis" / "subspaces.npz").write_bytes(b"PK\x03\x04 cut short")
    full = root / "full" / "analysis" / "analysis.json"
    write_json(full, json.loads(full.read_text()) | {"drift": {"error": "RuntimeError: out of memory"}})
    odd = root / "lora-r8-seed1" / "analysis" / "analysis.json"  # well-formed JSON of the wrong shapes
    odd_attention = {"splits": {"test": {"js": [[0.1], [0.1, "x"]]}}}
    write_json(
        odd, json.loads(odd.read_text()) | {"drift": {"splits": {"test": {"cka": 5}}}, "attention": odd_attention}
    )
    build_report(root)
    md = (root / "report.md").read_text()
    assert "Analysis unreadable (left out): lora-r2 (" in md and "not valid JSON" in md
    assert "subspaces.npz unreadable for lora-r8-seed1: no cross-run comparison." in md
    assert "full: drift failed (RuntimeError: out of memory)" in md
    assert "| lora-r8-seed0 | lora |" in md and "| lora-r8-seed0 / lora-r8-seed1 |" not in md
    assert "| 0.300 | — | 0.1000 | 12.3 s |" in md  # lora-r8-seed1: no CKA, the JS numbers it has
    assert "| full | full | 100.000 | 0.9000 | 4 | 0.00494 | 8.00 | 12.0 | 16 | 4.00 | 0.400 | — | 0.1000 |" in md


def test_subspace_similarity_is_one_with_itself_and_zero_when_orthogonal() -> None:
    basis = orthonormal(32, 16, 0)
    assert subspace_similarity(basis, basis).shape == (8, 16)
    np.testing.assert_allclose(subspace_similarity(basis, basis), 1.0, atol=1e-12)
    np.testing.assert_allclose(subspace_similarity(basis[:, :8], basis[:, 8:]), 0.0, atol=1e-12)
    # U2 holds U1's first direction and one orthogonal to it: φ(1, j) = 1, φ(2, 2) = 1/2
    grid = subspace_similarity(basis[:, :2], basis[:, [0, 5]])
    np.testing.assert_allclose(grid, [[1.0, 1.0], [1.0, 0.5]], atol=1e-12)


def test_multitask_report_has_a_section_per_group(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    root.mkdir()
    task = {"key": "cls", "task": "classification", "data": {"source": "x"}}
    (root / "experiment.yaml").write_text(yaml.safe_dump({"name": "multi", "tasks": [task], "methods": {"lora": {}}}))
    folder = write_run(root, "cls.lora", "lora", 0.7)
    config = yaml.safe_load((folder / "config.yaml").read_text()) | {"group": {"task": "cls", "method": "lora"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_analysis(folder, "lora", 4, 1.0, orthonormal(16, 8, 0))
    build_report(root)
    md = (root / "report.md").read_text()
    assert "## Inside the model (cls)" in md and "| cls.lora | lora | 1.000 | 0.7000 | 4 |" in md
    assert (root / "figures" / "inside-drift-cls.png").is_file()
