"""CLI: ``moegraph plan`` (table, what-ifs, --evaluate, --plot) and ``moegraph trace import|stats``."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from moegraph import load_spec
from moegraph.errors import PlanFileError
from moegraph.planner import Plan, plan
from moegraph.traces import TraceSet, load_traces


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-MoE-layer DeepSeek-V2-Lite-routing spec file and one 3-layer trace file per ESFT task."""
    d = tmp_path_factory.mktemp("cli")
    spec = load_spec("deepseek-v2-lite-tiny").to_dict()
    spec["model"]["num_layers"] = 4
    spec["placement"]["traces"] = []
    spec_path = d / "small.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    traces = {}
    for task in ("intent", "law"):
        t = load_traces(f"esft-deepseek-v2-lite/{task}")
        traces[task] = TraceSet.from_topk(list(t.topk[:3]), t.sample_ids, num_experts=64, source=task).save(d / f"{task}.npz")
    return d, spec_path, traces


def test_plan_prints_the_table_and_writes_a_loadable_plan(run_cli, small):
    d, spec, traces = small
    out = d / "plan.json"
    r = run_cli("plan", spec, "--trace", traces["law"], "-o", out)
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "remote GPU copies" in text and "load-only" in text and "contiguous" in text
    flat = "".join(r.out.split())  # rich wraps long words at hyphens and slashes
    assert "coactivation-swap-search" in flat and f"wrote{out}" in flat
    p = Plan.load(out, spec=load_spec(spec))
    assert p.num_layers == 3 and p.num_slots == 72
    assert p.metrics["plan"]["mean"]["remote_gpu"] < p.metrics["load_only"]["mean"]["remote_gpu"]


def test_a_spec_files_traces_are_read_beside_it(run_cli, small, tmp_path, monkeypatch):
    """placement.traces relative to the spec file, not to the working directory (which held another window)."""
    d, spec, traces = small
    sub = tmp_path / "sub"
    sub.mkdir()
    data = yaml.safe_load(spec.read_text())
    data["placement"]["traces"] = ["window.npz", "other.npz"]  # beside the spec; only in the working directory
    (sub / "spec.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(traces["law"], sub / "window.npz")
    shutil.copy(traces["intent"], tmp_path / "window.npz")  # what the working directory would have given
    shutil.copy(traces["intent"], tmp_path / "other.npz")
    monkeypatch.chdir(tmp_path)
    r = run_cli("plan", "sub/spec.yaml", "-o", "p.json")
    assert r.code == 0, r.err
    used = Plan.load(tmp_path / "p.json").policy["trace_inputs"]
    assert used == [str((sub / "window.npz").resolve()), str((tmp_path / "other.npz").resolve())]


def test_a_plan_records_its_traces_so_evaluate_finds_them_from_another_folder(run_cli, small, tmp_path, monkeypatch):
    """`--trace window.npz` was recorded as written: `--evaluate` from another folder planned its baselines from
    whatever window.npz sat there (or silently from the scored traffic). Paths on disk are recorded absolute,
    bundled names as names."""
    d, spec, traces = small
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    shutil.copy(traces["law"], here / "window.npz")
    shutil.copy(traces["intent"], there / "window.npz")  # another window under the same name
    monkeypatch.chdir(here)
    assert run_cli("plan", spec, "--trace", "window.npz", "-o", "p.json").code == 0
    assert Plan.load("p.json").policy["trace_inputs"] == [str(here.resolve() / "window.npz")]
    monkeypatch.chdir(there)
    r = run_cli("plan", "--evaluate", here / "p.json", "--trace", traces["intent"])
    assert r.code == 0, r.err
    flat = "".join(r.out.split())  # rich wraps long paths
    assert f"baselinesplannedfromtheplan'sowntraces['{here.resolve() / 'window.npz'}']" in flat, r.out
    p = plan(load_spec("deepseek-v2-lite-tiny"), "esft-deepseek-v2-lite/intent", rounds=0)
    assert p.policy["trace_inputs"] == ["esft-deepseek-v2-lite/intent"]
    # The recorded traces gone: the baselines come from the scored traffic, and stderr says so.
    (here / "window.npz").unlink()
    r = run_cli("plan", "--evaluate", here / "p.json", "--trace", traces["intent"])
    said = " ".join(r.err.split())
    assert r.code == 0 and "warning: the traces the plan was made from cannot be loaded" in said, r.err
    assert "planned from the scored traffic instead" in said


def test_a_missing_placement_trace_names_the_spec_file_the_field_and_where_it_looked(run_cli, small, tmp_path,
                                                                                     monkeypatch):
    d, spec, traces = small
    data = yaml.safe_load(spec.read_text())
    data["placement"]["traces"] = ["window.npz"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(d)
    r = run_cli("plan", tmp_path / "spec.yaml")
    err = " ".join(r.err.split())
    assert r.code == 2 and f"{tmp_path / 'spec.yaml'}: placement.traces: 'window.npz' was not found" in err, r.err
    assert f"beside the spec file in {tmp_path.resolve()}, in the working directory {d}" in err
    assert "esft-deepseek-v2-lite" in err and "give the traffic with --trace" in err


def test_what_if_flags_change_the_cluster(run_cli, small):
    d, spec, traces = small
    out = d / "whatif.json"
    r = run_cli("plan", spec, "-t", traces["law"], "-t", traces["intent"], "--nodes", "2", "--gpus-per-node", "4",
                "--slots", "80", "-o", out)
    assert r.code == 0, r.err
    data = json.loads(out.read_text())
    assert (data["num_gpus"], data["gpus_per_node"], data["slots_per_gpu"]) == (8, 4, 10)
    assert data["node_of_gpu"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data["policy"]["sources"] == ["law", "intent"]
    assert "remote node copies" in " ".join(r.out.split())


def test_evaluate_scores_a_plan_on_other_traffic(run_cli, small):
    d, spec, traces = small
    out = d / "law-plan.json"
    assert run_cli("plan", spec, "--trace", traces["law"], "-o", out).code == 0
    r = run_cli("plan", "--evaluate", out, "--trace", traces["intent"])
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "evaluation" in text and "baselines planned from the plan's own traces" in text


def test_plot_writes_a_figure(run_cli, small):
    pytest.importorskip("matplotlib")
    d, spec, traces = small
    png = d / "plan.png"
    r = run_cli("plan", spec, "--trace", traces["law"], "--plot", png, "--layer", "1")
    assert r.code == 0, r.err
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,match", [
    (["--slots", "60"], "fewer than the 64 experts"),
    (["--slots", "70"], "multiple of 8"),
    (["--nodes", "5"], "multiple of 40"),
])
def test_infeasible_what_ifs_exit_2_with_the_fix(run_cli, small, args, match):
    _, spec, traces = small
    r = run_cli("plan", spec, "--trace", traces["law"], *args)
    assert r.code == 2
    assert match in " ".join(r.err.split())


def test_bad_trace_and_bad_plan_files_exit_2_naming_the_file(run_cli, small, tmp_path):
    _, spec, traces = small
    broken = tmp_path / "broken.npz"
    broken.write_bytes(traces["law"].read_bytes()[:500])
    r = run_cli("plan", spec, "--trace", broken)
    assert r.code == 2 and str(broken) in "".join(r.err.split())
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text('{"format": "moegraph-plan", "version": 1, ')
    r = run_cli("plan", "--evaluate", bad_plan, "--trace", traces["law"])
    assert r.code == 2 and "truncated or corrupt plan file" in " ".join(r.err.split())
    r = run_cli("plan", spec, "--trace", "esft-deepseek-v2-lite")  # 26 layers for a 3-layer spec
    assert r.code == 2 and "26 MoE layers in the trace but the spec has 3" in " ".join(r.err.split())


def test_a_hand_edited_plan_file_is_refused_with_the_fix(run_cli, small, tmp_path):
    """'holds expert ids outside 0..63' and 'logical_to_physical_map disagrees ...' said what, not what to do."""
    d, spec, traces = small
    good = json.loads(plan(load_spec(spec), traces["law"], rounds=0).save(tmp_path / "p.json").read_text())
    edited = json.loads(json.dumps(good))
    edited["physical_to_logical_map"][0][0] = 99
    edited2 = json.loads(json.dumps(good))
    edited2["logical_to_physical_map"][0][0] = [71]
    for data, what in ((edited, "physical_to_logical_map holds expert ids outside 0..63"),
                       (edited2, "logical_to_physical_map disagrees with physical_to_logical_map")):
        (tmp_path / "p.json").write_text(json.dumps(data))
        r = run_cli("plan", "--evaluate", tmp_path / "p.json", "--trace", traces["law"])
        err = " ".join(r.err.split())
        assert r.code == 2 and what in err and "re-create it with `moegraph plan`" in err, r.err


def test_trace_import_esft_and_sglang(run_cli, tmp_path):
    torch = pytest.importorskip("torch")
    law = load_traces("esft-deepseek-v2-lite/law").select_samples(range(3))
    folder = tmp_path / "law"
    folder.mkdir()
    for layer in range(2):
        rows = []
        for s in range(3):
            ids = law.topk[layer][law.sample_ids == s].ravel()
            rows.append("\t".join(map(str, ids)) + "\t\t" + "\t".join(["0.1"] * len(ids)))
        (folder / f"expert_weights_{layer + 1}.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "law.npz"
    r = run_cli("trace", "import", "--format", "esft", folder, "-o", out)
    assert r.code == 0, r.err
    ts = load_traces(out)
    assert ts.num_layers == 2 and ts.top_k == 6 and ts.num_samples == 3
    np.testing.assert_array_equal(ts.topk, law.topk[:2])

    dump = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.arange(27 * 64).reshape(1, 27, 64)}, dump)
    out2 = tmp_path / "counts.npz"
    r = run_cli("trace", "import", "--format", "sglang", dump, "-o", out2, "--spec", "deepseek-v2-lite")
    assert r.code == 0, r.err
    assert "load-only" in " ".join(r.out.split()) and load_traces(out2).load_only
    r = run_cli("trace", "import", "--format", "csv", dump, "-o", out2)
    assert r.code == 2 and "use esft or sglang" in " ".join(r.err.split())


def test_trace_stats_summarises_loads_pairs_and_affinity(run_cli, small):
    traces = small[2]
    r = run_cli("trace", "stats", traces["law"], traces["intent"])
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "3 MoE layers, 64 experts" in text and "sources ['law', 'intent']" in text
    assert "cross-layer affinity" in text and "top 10% of expert pairs" in text


# ------------------------------------------------------------------------------------------------ -o


def test_plan_output_that_cannot_be_a_plan_file_is_refused_before_planning(run_cli, small, tmp_path):
    d, spec, traces = small
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    cases = [(fifo, "is not a regular file"), (tmp_path / "missing" / "p.json", "does not exist"),
             (not_a_folder / "p.json", "is not a folder"), (traces["law"], "is also an input of this command")]
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", "is not a regular file"))
    if os.path.isdir("/proc/self"):
        cases.append(("/proc/p.json", "cannot write in folder /proc"))
    law = traces["law"].read_bytes()
    for out, match in cases:
        r = run_cli("plan", spec, "--trace", traces["law"], "-o", out)
        assert r.code == 2 and match in " ".join(r.err.split()), (out, r.err)
        assert "Traceback" not in r.err and "planning layers" not in r.err, out  # refused before any work
    assert fifo.is_fifo() and traces["law"].read_bytes() == law
    assert not os.path.exists("/dev/null") or not os.path.isfile("/dev/null")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json", "file.txt"]  # no probe, no temp file left


def test_plan_and_plot_on_one_path_are_refused_before_planning(run_cli, small, tmp_path, monkeypatch):
    """`-o same.png --plot same.png` wrote the plan, then the picture over it (the check compared existing
    files only); the same file by another name (`./same.png`, a link) too."""
    d, spec, traces = small
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.png").symlink_to(tmp_path / "same.png")
    for plot in ("same.png", "./same.png", tmp_path / "same.png", "link.png"):
        r = run_cli("plan", spec, "--trace", traces["law"], "-o", "same.png", "--plot", plot)
        err = " ".join(r.err.split())
        assert r.code == 2 and "is also where the plan goes (same.png)" in err and "different paths" in err, r.err
        assert "planning layers" not in r.err and not (tmp_path / "same.png").exists()


def test_layer_out_of_range_or_without_plot_is_refused_before_anything_is_written(run_cli, small, tmp_path):
    """--layer 999 was refused by the plot, after the plan file was written."""
    d, spec, traces = small
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    r = run_cli("plan", spec, "--trace", traces["law"], "-o", out, "--plot", png, "--layer", "3")
    assert r.code == 2 and "--layer 3 is outside the MoE layers of" in r.err and "(0..2)" in r.err, r.err
    assert "planning layers" not in r.err and list(tmp_path.iterdir()) == []
    r = run_cli("plan", spec, "--trace", traces["law"], "-o", out, "--layer", "1")
    assert r.code == 2 and "--layer picks the MoE layer --plot draws" in " ".join(r.err.split())
    current = plan(load_spec(spec), traces["law"]).save(tmp_path / "current.json")
    r = run_cli("plan", "--evaluate", current, "--trace", traces["intent"], "--plot", png, "--layer", "7")
    assert r.code == 2 and "--layer 7 is outside the MoE layers of the plan" in " ".join(r.err.split())
    assert not png.exists()


def test_evaluate_refuses_the_options_it_cannot_use(run_cli, small, tmp_path):
    """--evaluate took -o, --slots, --nodes, --seed, ... and ignored them."""
    d, spec, traces = small
    current = plan(load_spec(spec), traces["law"]).save(tmp_path / "current.json")
    r = run_cli("plan", "--evaluate", current, "--trace", traces["intent"], "-o", tmp_path / "ev.json", "--slots", "99",
                "--nodes", "7", "--gpus-per-node", "2", "--seed", "3", "--rounds", "4", "--no-robust",
                "--max-imbalance", "2")
    err = " ".join(r.err.split())
    assert r.code == 2 and ("drop -o/--output, --nodes, --gpus-per-node, --slots, --seed, --max-imbalance, --rounds, "
                            "--robust/--no-robust") in err, r.err
    assert not (tmp_path / "ev.json").exists()
    for flag, value in (("--seed", "0"), ("--robust", None), ("-o", tmp_path / "ev.json")):
        r = run_cli("plan", "--evaluate", current, "--trace", traces["intent"], flag, *([value] if value else []))
        assert r.code == 2 and f"drop {flag}" in " ".join(r.err.split()), (flag, r.err)


def test_a_failed_plot_write_names_the_file_and_leaves_nothing_behind(run_cli, small, tmp_path, monkeypatch):
    """A full disk during savefig gave a traceback and left part of a picture."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    d, spec, traces = small
    png = tmp_path / "p.png"
    png.write_bytes(b"the previous picture")

    def full_disk(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    r = run_cli("plan", spec, "--trace", traces["law"], "--plot", png)
    assert r.code == 2 and "Traceback" not in r.err
    assert f"{png}: could not write the plot (File too large); nothing was written" in " ".join(r.err.split()), r.err
    assert png.read_bytes() == b"the previous picture" and [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_plan_output_through_a_symlink_writes_its_target(run_cli, small, tmp_path):
    d, spec, traces = small
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    r = run_cli("plan", spec, "--trace", traces["law"], "-o", link)
    assert r.code == 0, r.err
    assert link.is_symlink() and Plan.load(target).num_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_failed_plan_write_names_the_file_and_leaves_nothing_behind(small, tmp_path, monkeypatch):
    p = plan(load_spec(small[1]), small[2]["law"])
    out = tmp_path / "p.json"
    out.write_text("the previous plan")

    def full_disk(self, text, *args, **kwargs):  # half the text lands, then the disk is full
        with open(self, "w") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(PlanFileError, match=f"{out}: could not write the plan \\(No space left on device\\)"):
        p.save(out)
    monkeypatch.undo()
    assert out.read_text() == "the previous plan" and sorted(x.name for x in tmp_path.iterdir()) == ["p.json"]


def test_a_closed_stdout_still_gets_the_plan_written_and_exits_quietly(small, tmp_path):
    """`moegraph plan ... -o X | head -1`: the plan is written before the report, and the closed pipe ends the
    command without a traceback."""
    pytest.importorskip("matplotlib")
    d, spec, traces = small
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first line
    try:
        r = subprocess.run([sys.executable, "-m", "moegraph", "plan", str(spec), "--trace", str(traces["law"]),
                            "-o", str(out), "--plot", str(png)], stdout=write_end, stderr=subprocess.PIPE, text=True,
                           timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
    assert Plan.load(out).num_layers == 3 and png.read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------------ --from


@pytest.fixture(scope="module")
def current(small):
    d, spec, traces = small
    return plan(load_spec(spec), traces["intent"]).save(d / "current.json")


def test_replan_cli_checks_the_plan_before_the_window_and_refuses_to_overwrite_its_inputs(run_cli, small, current,
                                                                                           tmp_path):
    d, spec, traces = small
    other = plan("deepseek-v3-tiny").save(tmp_path / "v3.json")
    r = run_cli("plan", spec, "--from", other, "--trace", traces["law"])
    err = " ".join(r.err.split())
    assert r.code == 2 and "describes another model: moe.hidden_size: 128 in the given spec, 64 in the plan's" in err
    assert "expert id" not in err  # the window fits the given spec; the plan is what is wrong
    before = current.read_bytes()
    for out in (current, traces["law"]):
        r = run_cli("plan", spec, "--from", current, "--trace", traces["law"], "-o", out)
        assert r.code == 2 and "choose another output path" in " ".join(r.err.split())
    assert current.read_bytes() == before


def test_replan_cli_takes_huge_budgets_and_notes_the_spec_fields_it_does_not_apply(run_cli, small, current, tmp_path):
    d, spec, traces = small
    out = tmp_path / "new.json"
    for flag, value in (("--max-moves", "99999999999999999999999"), ("--max-move-gib", "1e300")):
        r = run_cli("plan", spec, "--from", current, "--trace", traces["law"], flag, value, "-o", out)
        assert r.code == 0, r.err
        assert Plan.load(out).policy["migration"]["slots_moved"] > 0
    other = yaml.safe_load(spec.read_text())
    other["topology"].update(nodes=2, gpus_per_node=4)
    other["placement"]["max_imbalance"] = 1.2
    other_path = tmp_path / "two-hosts.yaml"
    other_path.write_text(yaml.safe_dump(other))
    r = run_cli("plan", other_path, "--from", current, "--trace", traces["law"], "--max-moves", "4")
    flat = " ".join(r.out.split())
    assert r.code == 0, r.err
    assert "topology.nodes (2; the plan's: 1)" in flat and "placement.max_imbalance (1.2; the plan's: 1.05)" in flat
    assert "not applied" in flat and "--max-imbalance" in flat


def test_plot_shows_dollar_signs_of_names_verbatim(run_cli, small, tmp_path):
    """A spec, trace or policy name reaches the figure's title as text, never as mathtext (one `$` failed the
    plot with mathtext's ValueError; a pair was typeset)."""
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    from moegraph.planner.plot import literal

    for name in (r"tiny $\sqrt{$", "$x^{2}$ and $", r"already \$ escaped"):
        assert Text()._preprocess_math(literal(name)) == (name, False)
    d, spec, traces = small
    data = yaml.safe_load(spec.read_text())
    data["name"] = r"tiny $\sqrt{$"
    (tmp_path / "dollar.yaml").write_text(yaml.safe_dump(data))
    t = load_traces(traces["law"])
    named = TraceSet.from_topk(list(t.topk), t.sample_ids, num_experts=64, name="$x^{$").save(tmp_path / "named.npz")
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    r = run_cli("plan", tmp_path / "dollar.yaml", "--trace", named, "-o", out, "--plot", png)
    assert r.code == 0 and png.read_bytes()[:4] == b"\x89PNG", r.err
    plan_data = json.loads(out.read_text())
    plan_data["policy"]["name"] = r"$\foo{$"
    out.write_text(json.dumps(plan_data))
    png.unlink()
    r = run_cli("plan", tmp_path / "dollar.yaml", "--evaluate", out, "--trace", traces["intent"], "--plot", png)
    assert r.code == 0 and png.read_bytes()[:4] == b"\x89PNG", r.err


def test_a_plan_from_counts_says_so_in_its_title(run_cli, small, tmp_path):
    d, spec, traces = small
    counts = TraceSet.from_counts(load_traces(traces["law"]).counts, source="law-counts").save(tmp_path / "c.npz")
    r = run_cli("plan", spec, "--trace", counts, "--nodes", "2", "--gpus-per-node", "4")
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "(expert counts only: tokens taken to start evenly on every GPU)" in text and "counts tokens" not in text
    r = run_cli("plan", spec, "--trace", traces["law"])
    assert "predicted on law (8327 tokens)" in " ".join(r.out.split())
