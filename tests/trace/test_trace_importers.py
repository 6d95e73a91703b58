"""Importers of public traces: small fixtures written here, plus the shared files if present."""

import json
from pathlib import Path

import numpy as np
import pytest

from emulator.errors import TraceError
from emulator.trace.importers import import_azure, import_mooncake, import_vidur

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data" / "traces"
AZURE = SHARED / "azure-llm-2023"
VIDUR = SHARED / "vidur-processed"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


AZURE_CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,31
2023-11-16 18:15:51.2224670,91,5
"""


def test_azure_fixture_exact_values(tmp_path):
    t = import_azure(write(tmp_path / "conv.csv", AZURE_CSV))
    assert t.request_id.tolist() == ["azure-000000", "azure-000001", "azure-000002",
                                     "azure-000003"]
    # Seven fractional digits: 50.9951690 - 46.6805900 = 4.314579 s exactly in ns.
    assert t.arrival_time_s.tolist() == [0.0, 4.314579, 4.541877, 4.541877]
    assert t.prompt_tokens.tolist() == [374, 396, 879, 91]
    assert t.output_tokens.tolist() == [44, 109, 31, 5]
    assert t.reasoning_tokens is None


def test_azure_unsorted_input_is_sorted_stably(tmp_path):
    lines = AZURE_CSV.splitlines()
    text = "\n".join([lines[0], lines[3], lines[1], lines[4], lines[2]]) + "\n"
    t = import_azure(write(tmp_path / "u.csv", text))
    # File rows: 0 = 51.22 s (879), 1 = 46.68 s, 2 = 51.22 s (91), 3 = 50.99 s.
    assert t.request_id.tolist() == ["azure-000001", "azure-000003", "azure-000000",
                                     "azure-000002"]
    assert t.arrival_time_s.tolist() == [0.0, 4.314579, 4.541877, 4.541877]
    assert t.prompt_tokens.tolist() == [374, 396, 879, 91]  # the tie keeps file order


def test_azure_num_requests_keeps_first_arrivals(tmp_path):
    t = import_azure(write(tmp_path / "c.csv", AZURE_CSV), num_requests=2)
    assert t.prompt_tokens.tolist() == [374, 396]


def test_azure_negative_tokens_name_row_line_and_csv_column(tmp_path):
    rows = [f"2023-11-16 18:15:{10 + i:02d}.0000000,{-5 if i == 7 else 100},10"
            for i in range(10)]
    path = write(tmp_path / "neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                 "\n".join(rows) + "\n")
    with pytest.raises(TraceError) as exc:
        import_azure(path)
    assert str(exc.value) == ("neg.csv: row 7 (line 9), column ContextTokens: -5 is not a "
                              "positive token count")


def test_azure_unparsable_cell_names_row_line_and_column(tmp_path):
    text = AZURE_CSV.replace("879,31", "879,lots")
    with pytest.raises(TraceError, match=r"^bad.csv: row 2 \(line 4\), column GeneratedTokens: "
                                         r"'lots' is not a valid int64$"):
        import_azure(write(tmp_path / "bad.csv", text))
    text = AZURE_CSV.replace("2023-11-16 18:15:50.9951690", "yesterday")
    with pytest.raises(TraceError, match=r"row 1 \(line 3\), column TIMESTAMP: 'yesterday'"):
        import_azure(write(tmp_path / "ts.csv", text))


def test_azure_empty_cell_and_missing_column(tmp_path):
    with pytest.raises(TraceError, match=r"^e.csv: row 1 \(line 3\), column ContextTokens: "
                                         r"empty value$"):
        import_azure(write(tmp_path / "e.csv", AZURE_CSV.replace(",396,", ",,")))
    with pytest.raises(TraceError, match=r"^m.csv: line 1: missing column\(s\) GeneratedTokens"):
        import_azure(write(tmp_path / "m.csv", "TIMESTAMP,ContextTokens\n2023-11-16 "
                                               "18:15:46.0,3\n"))
    with pytest.raises(TraceError, match=r"no such file"):
        import_azure(tmp_path / "absent.csv")


@needs_shared
@pytest.mark.parametrize("name,rows,mean_in,mean_out", [
    ("conv", 19366, 1154.7, 211.1), ("code", 8819, 2047.8, 27.9)])
def test_azure_real_files_match_dataset_card(name, rows, mean_in, mean_out):
    t = import_azure(AZURE / f"AzureLLMInferenceTrace_{name}.csv")
    assert len(t) == rows
    assert round(float(t.prompt_tokens.mean()), 1) == mean_in
    assert round(float(t.output_tokens.mean()), 1) == mean_out
    assert t.arrival_time_s[0] == 0.0


@needs_shared
def test_vidur_splitwise_equals_azure_conversion():
    """SOURCE.md: splitwise_conv.csv is the Azure conv trace in relative seconds."""
    a = import_azure(AZURE / "AzureLLMInferenceTrace_conv.csv")
    v = import_vidur(VIDUR / "splitwise_conv.csv")
    assert np.array_equal(a.prompt_tokens, v.prompt_tokens)
    assert np.array_equal(a.output_tokens, v.output_tokens)
    assert np.max(np.abs(a.arrival_time_s - v.arrival_time_s)) < 1e-6


VIDUR_TIMED = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,2\n0.5,20,4\n0.25,30,6\n"
VIDUR_LENGTHS = ("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n" +
                 "".join(f"{10 + i},{5 + i},{15 + 2 * i},1.0\n" for i in range(50)))


def test_vidur_timed_file(tmp_path):
    t = import_vidur(write(tmp_path / "v.csv", VIDUR_TIMED))
    assert t.arrival_time_s.tolist() == [0.0, 0.25, 0.5]
    assert t.prompt_tokens.tolist() == [10, 30, 20]
    assert t.request_id.tolist() == ["vidur-000000", "vidur-000002", "vidur-000001"]
    with pytest.raises(TraceError, match=r"has an arrived_at column; drop the arrival process"):
        import_vidur(tmp_path / "v.csv", arrival="poisson", rate=1.0)


def test_vidur_length_only_needs_arrival_process(tmp_path):
    path = write(tmp_path / "l.csv", VIDUR_LENGTHS)
    with pytest.raises(TraceError, match=r"has no arrived_at column; choose an arrival process"):
        import_vidur(path)
    batch = import_vidur(path, arrival="batch", num_requests=20)
    assert len(batch) == 20 and not batch.arrival_time_s.any()
    assert batch.prompt_tokens.tolist() == list(range(10, 30))


def test_vidur_length_only_poisson_is_seeded(tmp_path):
    path = write(tmp_path / "l.csv", VIDUR_LENGTHS)
    a = import_vidur(path, arrival="poisson", rate=2.0, seed=3)
    b = import_vidur(path, arrival="poisson", rate=2.0, seed=3)
    c = import_vidur(path, arrival="poisson", rate=2.0, seed=4)
    assert np.array_equal(a.arrival_time_s, b.arrival_time_s)
    assert not np.array_equal(a.arrival_time_s, c.arrival_time_s)
    assert a.arrival_time_s[0] == 0.0 and np.all(np.diff(a.arrival_time_s) > 0)
    assert a.prompt_tokens.tolist() == list(range(10, 60))  # file order is kept


def test_vidur_zero_decode_names_row(tmp_path):
    text = VIDUR_TIMED.replace("0.5,20,4", "0.5,20,0")
    with pytest.raises(TraceError, match=r"^z.csv: row 1 \(line 3\), column num_decode_tokens: "
                                         r"0 is not a positive token count$"):
        import_vidur(write(tmp_path / "z.csv", text))


@needs_shared
def test_vidur_real_length_only_file():
    t = import_vidur(VIDUR / "bwb_stats_llama2_tokenizer_filtered_v2.csv", arrival="gamma",
                     rate=4.0, cv=2.0, seed=0)
    assert len(t) == 33768
    assert round(float(t.prompt_tokens.mean()), 1) == 1067.2
    assert round(float(t.output_tokens.mean()), 1) == 1612.8


def mooncake_lines() -> list[dict]:
    return [{"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3]},
            {"timestamp": 4000, "input_length": 300, "output_length": 9, "hash_ids": [1]},
            {"timestamp": 2500, "input_length": 513, "output_length": 1, "hash_ids": [1, 7]}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mooncake_fixture(tmp_path):
    t = import_mooncake(write_jsonl(tmp_path / "m.jsonl", mooncake_lines()))
    assert t.arrival_time_s.tolist() == [0.0, 1.5, 3.0]  # ms -> s after the earliest
    assert t.prompt_tokens.tolist() == [1100, 513, 300]
    assert [h.tolist() for h in t.prefix_block_hashes] == [[1, 2, 3], [1, 7], [1]]
    assert t.prefix_block_size_tokens == 512
    assert t.to_arrow().schema.metadata[b"emulator.prefix_block_size_tokens"] == b"512"


def test_mooncake_without_hashes(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "hash_ids"} for r in mooncake_lines()]
    t = import_mooncake(write_jsonl(tmp_path / "m.jsonl", rows))
    assert t.prefix_block_hashes is None and t.prefix_block_size_tokens is None


def test_mooncake_errors(tmp_path):
    rows = mooncake_lines()
    rows[1]["output_length"] = 0
    with pytest.raises(TraceError, match=r"^m.jsonl: row 1 \(line 2\), column output_length: 0"):
        import_mooncake(write_jsonl(tmp_path / "m.jsonl", rows))
    rows = [{k: v for k, v in r.items() if k != "input_length"} for r in mooncake_lines()]
    with pytest.raises(TraceError, match=r"^n.jsonl: missing field\(s\) input_length"):
        import_mooncake(write_jsonl(tmp_path / "n.jsonl", rows))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1,\n')
    with pytest.raises(TraceError, match=r"^bad.jsonl: .*invalid JSON"):
        import_mooncake(path)
    rows = mooncake_lines()
    rows[2]["input_length"] = 2.5
    with pytest.raises(TraceError, match=r"row 2 \(line 3\), field input_length: 2.5 is not a "
                                         r"token count"):
        import_mooncake(write_jsonl(tmp_path / "f.jsonl", rows))
