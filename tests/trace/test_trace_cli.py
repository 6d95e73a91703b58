"""``emulator trace`` through click's CliRunner, and once as a real subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from click.testing import CliRunner

from emulator.cli import cli
from emulator.trace.io import read_trace

REPO = Path(__file__).parents[2]
SHARED = REPO / ".." / "shared" / "data" / "traces"
AZURE_CONV = SHARED / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"


def run(*args: str):
    return CliRunner().invoke(cli, ["trace", *args])


def bad_csv(tmp_path: Path) -> Path:
    """An Azure-format CSV whose data row 7 has a negative prompt length."""
    rows = [f"2023-11-16 18:15:{10 + i:02d}.0000000,{-12 if i == 7 else 100},10"
            for i in range(10)]
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


def test_bad_row_7_import_fails_cleanly(tmp_path):
    out = tmp_path / "out.arrow"
    result = run("import", str(bad_csv(tmp_path)), "--format", "azure", "-o", str(out))
    assert result.exit_code == 2
    assert result.output == ("error: bad.csv: row 7 (line 9), column ContextTokens: -12 is not "
                             "a positive token count\n")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.csv"]


def test_bad_row_7_arrow_file_inspect_fails_cleanly(tmp_path):
    table = pa.table({"request_id": [str(i) for i in range(10)],
                      "arrival_time_s": [float(i) for i in range(10)],
                      "prompt_tokens": pa.array([5] * 7 + [-1] + [5] * 2, pa.int32()),
                      "output_tokens": pa.array([3] * 10, pa.int32())})
    with ipc.new_file(str(tmp_path / "bad.arrow"), table.schema) as w:
        w.write_table(table)
    result = run("inspect", str(tmp_path / "bad.arrow"))
    assert result.exit_code == 2
    assert result.output == ("error: bad.arrow: row 7, column prompt_tokens: -1 is not a "
                             "positive token count\n")


def test_bad_row_7_subprocess_has_no_traceback(tmp_path):
    out = tmp_path / "out.arrow"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "emulator", "trace", "import",
                           str(bad_csv(tmp_path)), "--format", "azure", "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: bad.csv: row 7 (line 9), column ContextTokens: -12 is not a positive token count"]
    assert not out.exists()


def test_synth_then_inspect(tmp_path):
    out = tmp_path / "r.arrow"
    result = run("synth", "--kind", "reasoning", "--num-requests", "200", "--seed", "0",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 200 requests to {out}\n"
    t = read_trace(out)
    assert len(t) == 200 and t.reasoning_tokens is not None
    shown = run("inspect", str(out))
    assert shown.exit_code == 0
    assert "│ 200 " in shown.output and "reasoning_tokens" in shown.output
    assert "n/a (all at t=0)" in shown.output


def test_synth_uniform_poisson_parquet(tmp_path):
    out = tmp_path / "u.parquet"
    result = run("synth", "--kind", "uniform", "--num-requests", "100", "--arrival", "poisson",
                 "--rate", "4", "--prompt-tokens", "10:20", "--output-tokens", "5:6",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    t = read_trace(out)
    assert t.prompt_tokens.min() >= 10 and t.prompt_tokens.max() <= 20
    assert t.arrival_time_s[-1] > 0


@pytest.mark.parametrize("args,message", [
    (["synth", "--kind", "fixed", "--num-requests", "3"],
     "error: lengths 'fixed' needs prompt_tokens (--prompt-tokens)"),
    (["synth", "--num-requests", "3", "--arrival", "poisson"],
     "error: arrival 'poisson' needs rate > 0 (requests per second), got None"),
    (["synth", "--kind", "fixed", "--num-requests", "3", "--prompt-tokens", "a:b",
      "--output-tokens", "4"], "error: --prompt-tokens 'a:b': expected N or LOW:HIGH (integers)"),
])
def test_synth_flag_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "x.arrow"
    result = run(*args, "-o", str(out))
    assert result.exit_code == 2
    assert result.output == message + "\n"
    assert not out.exists()


def test_import_flag_mismatch(tmp_path):
    result = run("import", str(bad_csv(tmp_path)), "--format", "azure", "--rate", "2",
                 "-o", str(tmp_path / "o.arrow"))
    assert result.exit_code == 2
    assert result.output == "error: --arrival/--rate/--cv apply to --format vidur only\n"


def test_import_vidur_length_only_and_mooncake(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("num_prefill_tokens,num_decode_tokens\n5,6\n7,8\n9,10\n")
    out = tmp_path / "v.arrow"
    result = run("import", str(csv), "--format", "vidur", "--arrival", "gamma", "--rate", "1",
                 "--cv", "2", "--seed", "3", "--num-requests", "2", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert read_trace(out).prompt_tokens.tolist() == [5, 7]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"timestamp": 5, "input_length": 600, "output_length": 2, '
                     '"hash_ids": [4, 9]}\n')
    result = run("import", str(jsonl), "--format", "mooncake", "-o", str(tmp_path / "m.arrow"))
    assert result.exit_code == 0, result.output
    assert [h.tolist() for h in read_trace(tmp_path / "m.arrow").prefix_block_hashes] == [[4, 9]]


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="../shared/data is absent")
def test_import_and_inspect_real_azure_conv(tmp_path):
    out = tmp_path / "conv.arrow"
    result = run("import", str(AZURE_CONV), "--format", "azure", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 19366 requests to {out}\n"
    t = read_trace(out)
    assert len(t) == 19366
    assert round(float(t.prompt_tokens.mean())) == 1155
    assert round(float(t.output_tokens.mean())) == 211
    shown = run("inspect", str(out))
    assert "│ 19,366   │ 3,501.7       │ 5.53              │" in shown.output
    assert "1,154.7" in shown.output and "211.1" in shown.output


@pytest.mark.skipif(not (SHARED / "servegen-deepseek-r1").is_dir(),
                    reason="../shared/data is absent")
def test_import_servegen_cli(tmp_path):
    out = tmp_path / "sg.arrow"
    result = run("import", str(SHARED / "servegen-deepseek-r1"), "--format", "servegen",
                 "--num-requests", "500", "--seed", "1", "--clients", "35,66",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert len(read_trace(out)) == 500
