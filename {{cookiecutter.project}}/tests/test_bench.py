"""The pretrain benchmark runs end to end on a tiny shape and prints well-formed, positive figures."""

import argparse
import functools
import json
import os

import pytest
import torch

from {{ cookiecutter.package }} import bench, bench_timing
from {{ cookiecutter.package }}.config import ModelConfig
from {{ cookiecutter.package }}.model.presets import preset_fields

SHAPE = {
    "--layers": 1,
    "--dim": 32,
    "--heads": 4,
    "--kv-heads": 2,
    "--seq-len": 16,
    "--batch-size": 2,
    "--vocab-size": 64,
}
TINY = [str(token) for pair in SHAPE.items() for token in pair]


def run(capsys, *extra: str) -> list[dict]:
    bench.main(["pretrain", *TINY, "--steps", "2", "--warmup", "1", "--repeats", "2", *extra])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_pretrain_bench_fp32(capsys):
    rows = run(capsys)
    assert [r["model"] for r in rows] == ["ours", "transformers", "ratio"]
    for row in rows[:2]:
        assert row["bench"] == "pretrain" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] > 0 and row["preset"] == "tiny" and row["compile"] is False
        # MFU to 4 significant digits, not 4 decimals: a tiny fp32 model on a GPU reads ~1e-5, which must not be 0
        expected = row["tokens_per_s"] * rows[2]["flops_per_token"] / rows[2]["peak_flops"]
        assert row["mfu"] == pytest.approx(expected, rel=1e-3) and row["mfu"] > 0
        assert row["step_ms_min"] <= row["step_ms_q1"] <= row["step_ms_median"] <= row["step_ms_q3"]
        assert row["step_ms_median"] <= row["step_ms_max"]
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["timed_steps"] == 4 and row["steps_trained"] == 5  # 1 warm-up + 2 rounds x 2 steps
    ratio = rows[2]
    assert ratio["ours_over_transformers"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 1e-2)
    assert ratio["peak_flops"] > 0 and ratio["peak_source"] == "measured_matmul"
    assert ratio["flops_per_token"] > 0 and ratio["params"] > 0
    # same initial weights, same batches, same optimizer: the two implementations train identically
    assert ratio["loss_abs_diff"] < 1e-3


def test_pretrain_bench_bf16_reports_fp32_loss(capsys):
    rows = run(capsys, "--dtype", "bf16", "--untied")
    ratio = rows[-1]
    assert ratio["dtype"] == "bf16"
    assert ratio["loss_bf16"] > 0 and ratio["loss_fp32"] > 0
    assert abs(ratio["loss_bf16"] - ratio["loss_fp32"]) < 0.1


def test_significant_keeps_small_figures():
    assert bench_timing.significant(0.000012345678) == pytest.approx(1.235e-5)
    assert bench_timing.significant(0.41234567) == 0.4123


def test_presets_fill_only_the_flags_not_given():
    args = bench.build_parser().parse_args(["pretrain", "--preset", "gpt2-small", "--batch-size", "2"])
    bench.apply_preset(args)
    assert (args.layers, args.dim, args.heads, args.kv_heads) == (12, 768, 12, 12)
    assert (args.seq_len, args.vocab_size, args.batch_size) == (1024, 50304, 2)
    tiny = bench.apply_preset(bench.build_parser().parse_args(["lora"]))
    assert (tiny.layers, tiny.dim, tiny.seq_len, tiny.batch_size) == (4, 256, 128, 16)


def test_bench_shapes_come_from_the_model_presets():
    """bench --preset and --model.preset are one table: the model bench builds is the preset's, its flags applied."""
    args = bench.build_parser().parse_args(["pretrain", "--preset", "llama-3.2-1b", "--layers", "2", "--seq-len", "8"])
    _, config, _ = bench.setup(argparse.Namespace(**{**vars(args), "device": "cpu", "vocab_size": 64}))
    expected = ModelConfig(**preset_fields("llama-3.2-1b"))
    assert config.rope_scaling == expected.rope_scaling and config.hidden_dim == 8192 and config.n_kv_heads == 8
    assert (config.n_layers, config.vocab_size, config.max_seq_len) == (2, 64, 8)


@pytest.mark.slow  # ~20 s on 2 CPU cores: tracing both models, forward and backward, twice
def test_compile_flag_compiles_both_models(capsys, monkeypatch):
    # aot_eager traces forward and backward like inductor without generating code: the same path, in seconds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    rows = run(capsys, "--compile")
    assert all(r["compile"] is True for r in rows)
    assert rows[2]["loss_abs_diff"] < 1e-3  # compiled, both still train identically
    bench.main(["lora", *TINY, "--compile", "--steps", "1", "--warmup", "1", "--repeats", "1"])
    lora = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["compile"] for r in lora] == [True, True, True] and lora[2]["loss_abs_diff"] < 1e-3


def test_gpu_check_refuses_without_cuda_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["gpu-check", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: gpu-check needs a CUDA GPU")


def test_gpu_check_table_lists_every_model_run():
    row = {"tokens_per_s": 123456.0, "mfu": 0.4123, "step_ms_median": 50.0, "step_ms_min": 49.0, "step_ms_max": 51.5}
    rows = [
        row | {"model": "ours", "compile": False, "peak_step_mem_mib": 2048.0},
        row | {"model": "transformers", "compile": True},
        {"model": "ratio", "ours_over_transformers": 1.0},
    ]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 4 and "tokens/s" in lines[0] and "MFU" in lines[0] and "peak step MiB" in lines[0]
    assert lines[2].split()[:5] == ["ours", "no", "123,456", "41.2%", "2048"]
    assert lines[3].split()[:5] == ["transformers", "yes", "123,456", "41.2%", "-"]


def test_summarize_spread():
    stats = bench_timing.summarize([0.004, 0.001, 0.002, 0.003])
    assert stats["step_ms_median"] == pytest.approx(2.5)
    assert stats["step_ms_min"] == pytest.approx(1.0) and stats["step_ms_max"] == pytest.approx(4.0)
    assert stats["timed_steps"] == 4


def test_cli_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "pretrain" in capsys.readouterr().out


def test_lora_bench_tiny(capsys):
    bench.main(["lora", *TINY, "--rank", "4", "--steps", "2", "--warmup", "1", "--repeats", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["model"] for r in rows] == ["ours", "transformers+peft", "ratio"]
    # r * (in + out) on q_proj (32 -> 32) and v_proj (32 -> 16), one layer, for both implementations
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"] == 4 * (32 + 32) + 4 * (32 + 16)
    for row in rows[:2]:
        assert row["bench"] == "lora" and row["tokens_per_s"] > 0 and row["timed_steps"] == 4
        assert row["steps_trained"] == 5 and row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"]
    assert rows[2]["ours_over_transformers"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 1e-2)
    # same base weights, same LoRA start, same batches and optimizer: the same losses
    assert rows[2]["loss_abs_diff"] < 1e-3


def test_loader_bench_reports_every_sampling_and_restores_the_process(capsys, tmp_path):
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    args = ["--tokens", "200000", "--batch-size", "3", "--seq-len", "16", "--vocab-size", "70000"]
    bench.main(["loader", *args, "--steps", "3", "--warmup", "1", "--repeats", "2", "--tmp-dir", str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["sampling"] for r in rows] == ["random", "sequential", "floor", "random-cold", "summary"]
    for row in rows[:4]:
        assert row["bench"] == "loader" and row["threads"] == 1 and (row["batch_size"], row["seq_len"]) == (3, 16)
        assert row["batches_per_s_min"] <= row["batches_per_s"] <= row["batches_per_s_max"]
        assert row["timed_steps"] == (3 if row["sampling"] == "random-cold" else 6)  # 2 alternating rounds of 3
    summary = rows[-1]
    assert summary["file_mb"] == 0.8  # vocabulary above 65536: uint32, as the token cache stores it
    assert summary["meets_target"] == (min(r["batches_per_s"] for r in rows[:2] + rows[3:4]) >= 30)
    assert summary["random_ms_over_floor"] > 0 and summary["sequential_ms_over_floor"] > 0
    assert ("pin_ms" in summary) == torch.cuda.is_available()  # else "transfer": "not measured: no CUDA device"
    # the process is as it was: torch threads, CPU affinity, and no token file left behind
    assert torch.get_num_threads() == threads and list(tmp_path.iterdir()) == []
    assert cores is None or os.sched_getaffinity(0) == cores


@pytest.mark.slow
def test_prepare_bench_counts_the_same_tokens_as_tokenizers(capsys, tmp_path):
    bench.main(
        ["prepare", "--mb", "0.3", "--repeats", "1", "--rss-mb", "0.1", "--vocab-size", "300", "--dir", str(tmp_path)]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["model"] for r in rows] == ["ours", "tokenizers", "ratio", "ours"]
    ours, library, ratio, small = rows
    # Same documents, same tokenizer: ours adds exactly one EOS per document to the library's tokens.
    assert ours["documents"] == library["documents"] > 30 and ours["tokens"] == library["tokens"] + ours["documents"]
    assert ratio["ours_over_tokenizers"] == pytest.approx(ours["tokens_per_s"] / library["tokens_per_s"], rel=1e-2)
    cpu_ratio = ours["tokens_per_cpu_s"] / library["tokens_per_cpu_s"]
    assert ratio["ours_over_tokenizers_cpu"] == pytest.approx(cpu_ratio, rel=1e-2)
    assert small["mb"] == 0.1 and 0 < small["tokens"] < ours["tokens"] / 2
    for r in (ours, library, small):
        assert r["peak_rss_mib"] > 0 and r["tokens_per_s_min"] <= r["tokens_per_s"] and r["tokens_per_cpu_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the generated corpus and caches are removed
