"""`python -m benchmarks.gpu` without a GPU: the fp8 and embeddings legs end to end on tiny shapes (`--device cpu`),
the summary tables and the PNG from a results JSON, the random checkpoint the fp8 leg builds from."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu
from benchmarks.gpu_fp8 import write_random_checkpoint
from benchmarks.gpu_plot import plot
from benchmarks.peers.base import REPO_ROOT

GPU_RESULT = REPO_ROOT / "benchmarks" / "results" / "gpu-llama8b.json"
SMOKE = [
    "--device", "cpu", "--shape", "tiny", "--concurrency", "1,2", "--input-len", "16", "--output-len", "8",
    "--max-seconds", "3", "--quantizer", "engine_builder", "--encoders", "tiny-bert", "--embed-concurrency", "1,2",
    "--embed-batch", "4", "--embed-input-len", "8", "--embed-texts", "32", "--phase-timeout", "400",
]


def fp8_and_embeddings(document: dict[str, Any]) -> dict[str, Any]:
    """The last H200 run's document with fp8 and embeddings results added as the phases write them."""
    document = copy.deepcopy(document)
    serve_points = document["serve"]["points"]
    fp8_points = []
    for point in serve_points:
        if point["concurrency"] in (1, 64):
            faster = {**point["summary"], "output_throughput": 1.5 * point["summary"]["output_throughput"]}
            fp8_points.append({**point, "variant": "fp8", "summary": faster})
    build = {"calibration_s": 20.0, "compute": {"device": "cuda:0"}, "quantizer": "engine_builder"}
    document["fp8"] = {"build_s": 80.0, "build": build, "checkpoint": {"seconds": 30.0}, "points": fp8_points}
    summary = {"items_per_s": 3000.0, "latency_ms": {"p50": 30.0, "p99": 60.0}}
    document["embeddings"] = {
        "input_len": 32, "texts_per_request": 32,
        "models": {
            name: {
                "dtype": "float16", "min_cosine_vs_st": 0.99999, "st_items_per_s": {"32": 6000.0, "256": 12000.0},
                "points": [{"concurrency": c, "summary": summary} for c in (4, 16)],
            }
            for name in ("minilm", "bge-large")
        },
    }
    return document


def test_summaries_and_plot_from_a_results_json(tmp_path: Path) -> None:
    document = fp8_and_embeddings(json.loads(GPU_RESULT.read_text()))
    gpu.summarize(document)
    fp8_rows = [row for row in document["summary"] if row["variant"] == "fp8"]
    assert [row["concurrency"] for row in fp8_rows] == [1, 64]
    assert all(row["vs_bf16"] == pytest.approx(1.5, abs=1e-3) for row in fp8_rows)
    assert document["fp8_build_summary"] == {
        "build_s": 80.0, "target_s": 90, "calibration_s": 20.0, "device": "cuda:0", "quantizer": "engine_builder",
        "checkpoint_write_s": 30.0,
    }
    rows = document["embeddings_summary"]
    assert [(row["encoder"], row["concurrency"]) for row in rows] == [
        ("minilm", 4), ("minilm", 16), ("bge-large", 4), ("bge-large", 16)
    ]
    assert rows[0]["vs_st_batch32"] == 0.5 and rows[0]["vs_st_best"] == 0.25
    pytest.importorskip("matplotlib")
    png = plot(document, tmp_path / "gpu.json")
    assert png is not None and png.stat().st_size > 10_000
    # The PNG of a run with only one of the legs is drawn too.
    assert plot({**document, "summary": []}, tmp_path / "embeddings-only.json") is not None
    assert plot({**document, "embeddings_summary": []}, tmp_path / "decoders-only.json") is not None


def test_unknown_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu.main(["--phases", "serve,fp9"])
    assert "--phases: unknown fp9; known: parity, serve, hf, profile, fp8, embeddings" in capsys.readouterr().err


def test_random_checkpoint_loads_in_transformers(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = gpu.model_folder(smollm2_dir, tmp_path / "tiny", gpu.SHAPES["tiny"], "bfloat16")
    written = write_random_checkpoint(folder, "cpu")
    assert written["shards"] == 1 and written["bytes"] > 0
    loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    layer = model.model.layers[0]
    assert float(layer.input_layernorm.weight.detach().float().mean()) == 1.0
    assert 0.015 < float(layer.mlp.up_proj.weight.detach().float().std()) < 0.025


@pytest.mark.slow
def test_serve_fp8_and_embeddings_phases_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main([*SMOKE, "--phases", "serve,fp8,embeddings", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert not [key for key in ("serve", "fp8", "embeddings") if "error" in document[key]], document
    build = document["fp8"]["build"]
    assert document["fp8"]["build_s"] > 0 and build["compute"]["device"] == "cpu"
    assert build["quantizer"] == "engine_builder" and build["weights"]["linear_ratio"] < 0.6
    assert document["fp8_build_summary"]["device"] == "cpu" and document["fp8_build_summary"]["target_s"] == 90
    fp8_rows = [row for row in document["summary"] if row["variant"] == "fp8"]
    assert [row["concurrency"] for row in fp8_rows] == [1, 2] and all(row["vs_bf16"] > 0 for row in fp8_rows)
    (encoder,) = document["embeddings"]["models"].values()
    assert encoder["dtype"] == "float32" and encoder["min_cosine_vs_st"] > 0.9999
    rows = document["embeddings_summary"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    assert all(row["items_per_s"] > 0 and row["vs_st_best"] > 0 for row in rows)
    if plot(document, out) is not None:
        assert out.with_suffix(".png").exists()


def test_a_phase_past_its_timeout_is_recorded_and_the_json_written(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main([*SMOKE, "--phases", "embeddings", "--phase-timeout", "2", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["embeddings"]["error"] == "phase embeddings ran past 2 s"
    assert document["embeddings_summary"] == []
