"""README.md's benchmark tables are what ``python -m ptfast.bench.readme_tables`` makes from benchmarks/results/."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from ptfast.bench import fmt_time, readme_tables

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
FIX = "run: python -m ptfast.bench.readme_tables"


def readme_text():
    return README.read_text(encoding="utf-8")


def test_readme_tables_match_the_committed_result_files():
    assert readme_tables.stale(readme_text(), str(RESULTS)) == [], FIX


def test_every_committed_result_file_has_a_table_in_the_readme():
    in_readme = {name for name, _, _ in readme_tables.sections(readme_text())}
    assert set(readme_tables.result_files(str(RESULTS))) == in_readme


@pytest.mark.parametrize("name", readme_tables.result_files(str(RESULTS)))
def test_each_table_names_its_source_machine_and_command(name):
    text = readme_tables.render(name, str(RESULTS))
    assert f"benchmarks/results/{name}." in text.split("\n")[0]
    assert text.count("Machine: ") >= 1 and text.count("Machine: ") == text.count("Command: `")
    assert "torch " in text


def test_cache_hit_ratios_come_from_the_file():
    data = json.loads((RESULTS / "cpu-intel-r-xeon-r-processor-2c-cache_hit.pytest.json").read_text())
    stats = {b["params"]["provider"]: b["stats"] for b in data["benchmarks"]}
    text = readme_tables.render("cpu-intel-r-xeon-r-processor-2c-cache_hit.pytest", str(RESULTS))
    cached_row = next(line for line in text.split("\n") if "cached" in line and line.startswith("|"))
    assert fmt_time(stats["ptfast-cached"]["min"]) in cached_row
    assert f"{stats['ptfast-cached']['min'] / stats['floor']['min']:.2f}x" in cached_row


def test_ncu_table_sums_each_direction_of_a_case():
    with open(RESULTS / "cuda-nvidia-h200-ncu.csv", newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if line.startswith('"'))]
    durations = {}
    for r in rows:
        if r["Metric Name"] == "gpu__time_duration.sum":
            durations[int(r["ID"])] = float(r["Metric Value"].replace(",", "")) / 1e3  # ns -> us
    seed_forward = durations[0] + durations[1]  # the CSV starts with the seed shape's fp32 forward: two launches
    text = readme_tables.render("cuda-nvidia-h200-ncu", str(RESULTS))
    seed_fp32 = next(line for line in text.split("\n") if line.startswith("| 20x1024x128 | fp32"))
    assert f"| {seed_forward:.1f} / " in seed_fp32


def test_pytest_command_follows_the_suites_in_the_file():
    one = [{"fullname": "benchmarks/test_bench_prepend.py::test_prepend_native"}]
    two = one + [{"fullname": "benchmarks/test_bench_encoder.py::test_encoder[x]"}]
    assert readme_tables.pytest_command(one) == "pytest benchmarks/test_bench_prepend.py --benchmark-only"
    assert readme_tables.pytest_command(two) == "pytest benchmarks/ --benchmark-only"


@pytest.fixture
def checkout(tmp_path):
    """A copy of README.md and benchmarks/results to change."""
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(RESULTS, tmp_path / "benchmarks" / "results")
    return tmp_path


def test_check_fails_on_a_changed_result_and_a_rewrite_fixes_it(checkout, capsys):
    readme, results = checkout / "README.md", checkout / "benchmarks" / "results"
    path = results / "cpu-intel-r-xeon-r-processor-2c.json"
    data = json.loads(path.read_text())
    peft_row = next(r for r in data["results"] if r["provider"] == "peft")
    peft_row["median_s"] = 0.123456
    path.write_text(json.dumps(data))
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
    assert "cpu-intel-r-xeon-r-processor-2c" in capsys.readouterr().err
    before = readme.read_text()
    assert readme_tables.main(["--readme", str(readme)]) == 0
    after = readme.read_text()
    assert "123.46 ms" in after and "123.46 ms" not in before
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 0
    assert readme_tables.stale(before, str(results)) == [
        "cpu-intel-r-xeon-r-processor-2c"
    ]  # only the changed file's table


def test_rewrite_keeps_the_text_around_the_markers():
    text = (
        "# Title\nprose before\n<!-- tables:vllm-amd-epyc-2c start -->\nold table\n"
        "<!-- tables:vllm-amd-epyc-2c end -->\nprose after\n"
    )
    new = readme_tables.rewrite(text, str(RESULTS))
    assert new.startswith("# Title\nprose before\n<!-- tables:vllm-amd-epyc-2c start -->\n")
    assert new.endswith("<!-- tables:vllm-amd-epyc-2c end -->\nprose after\n")
    assert "old table" not in new and "tokens/s" in new
    assert readme_tables.stale(new, str(RESULTS)) == []
    assert readme_tables.stale(text, str(RESULTS)) == ["vllm-amd-epyc-2c"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- tables:a start -->\n", "tables:a has no end marker"),
        ("<!-- tables:a end -->\n", "tables:a ends but was never started"),
        ("<!-- tables:a start -->\n<!-- tables:b start -->\n", "tables:b starts inside tables:a"),
        ("<!-- tables:a start -->\n<!-- tables:b end -->\n", "tables:b ends but tables:a is open"),
        (
            "<!-- tables:a start -->\n<!-- tables:a end -->\n<!-- tables:a start -->\n<!-- tables:a end -->\n",
            "tables:a appears twice",
        ),
    ],
)
def test_bad_markers_are_named(text, message):
    with pytest.raises(readme_tables.ReadmeTablesError, match=message):
        readme_tables.sections(text)


def test_a_marker_without_a_result_file_is_an_error(checkout, capsys):
    readme = checkout / "README.md"
    readme.write_text("<!-- tables:no-such-run start -->\n<!-- tables:no-such-run end -->\n")
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 2
    assert "no no-such-run.json or no-such-run.csv" in capsys.readouterr().err


def test_an_unknown_benchmark_suite_is_an_error(checkout):
    results = checkout / "benchmarks" / "results"
    path = results / "cpu-intel-r-xeon-r-processor-2c-prepend.pytest.json"
    data = json.loads(path.read_text())
    data["benchmarks"][0]["fullname"] = "benchmarks/test_bench_mystery.py::test_it"
    path.write_text(json.dumps(data))
    with pytest.raises(readme_tables.ReadmeTablesError, match=r"no table for the suite\(s\) \['mystery'\]"):
        readme_tables.render("cpu-intel-r-xeon-r-processor-2c-prepend.pytest", str(results))


def test_a_file_of_another_kind_is_an_error(checkout):
    results = checkout / "benchmarks" / "results"
    (results / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(readme_tables.ReadmeTablesError, match="not a result file this knows"):
        readme_tables.render("other", str(results))


def test_the_prefix_suite_has_a_row_per_step_head_and_batch(checkout):
    """The prefix-tuning suite's table: one row per (step, head, batch) with PEFT's and ptfast's medians and their
    ratio; a case without both providers is an error that names it."""
    results = checkout / "benchmarks" / "results"
    name = "cpu-intel-r-xeon-r-processor-2c-prefix.pytest"
    data = json.loads((results / f"{name}.json").read_text())
    table = readme_tables.render(name, str(results))
    rows = [line for line in table.splitlines() if line.startswith("| forward")]
    assert len(rows) == len(data["benchmarks"]) // 2 == 8
    one = next(
        b
        for b in data["benchmarks"]
        if b["group"].startswith("prefix-forward-backward")
        and b["params"] == {"projection": True, "batch": 8, "provider": "peft"}
    )
    fast = next(b for b in data["benchmarks"] if b["group"] == one["group"] and b["params"]["provider"] == "ptfast")
    expected = f"{one['stats']['median'] / fast['stats']['median']:.2f}x"
    assert any(r.startswith("| forward + backward | projection (MLP) | 8 |") and expected in r for r in rows)
    assert "20 virtual tokens, token_dim 256, 4 layers, hidden 256, fp32" in table
    for b in data["benchmarks"]:  # the shape comes from the file
        b["group"] = b["group"].replace("-T20-", "-T21-")
    (results / f"{name}.json").write_text(json.dumps(data))
    assert "21 virtual tokens" in readme_tables.render(name, str(results))
    data["benchmarks"].remove(fast)
    (results / f"{name}.json").write_text(json.dumps(data))
    with pytest.raises(readme_tables.ReadmeTablesError, match=r"forward \+ backward, projection \(MLP\), B=8"):
        readme_tables.render(name, str(results))
