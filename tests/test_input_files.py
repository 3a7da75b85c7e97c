"""Files moegraph reads and writes, at the file system's edges: outputs staged under unique names (nothing
planted beside a target is written through or removed), inputs read only from regular files (a FIFO would
block the reader, a device never ends), deep nesting and over-long names as clear errors, and the API's
arguments checked by type. Found by an audit; each case failed (traceback, hang, memory blow-up or a
user's file replaced) before the fix it tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import moegraph
from moegraph.cli import main
from moegraph.errors import InputError, PlanFileError, SpecError, TraceError
from moegraph.planner import Plan

LONG = "x" * 300  # a path component longer than NAME_MAX (255)
NESTED = "[" * 100_000 + "]" * 100_000  # valid JSON beyond Python's recursion limit


def cli(*argv) -> tuple[int, str]:
    """``moegraph ARGV`` in-process, with an alarm: a reader that blocks (on a FIFO) fails the test, not the run."""
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(20)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
    text = " ".join(err.getvalue().split())
    assert "Traceback" not in text, text
    return code, text


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    spec = moegraph.load_spec("deepseek-v2-lite-tiny")
    plan = moegraph.planner.plan(spec, nodes=1, gpus_per_node=2)
    plan.save(root / "plan.json")
    for name in ("fifo.json", "fifo.yaml", "fifo.npz", "fifo.pt"):
        os.mkfifo(root / name)
    np.savez(root / "trace_meta_nested.npz", meta=np.array(NESTED), topk=np.zeros((1, 1, 6), np.int32))
    return root


def test_outputs_are_staged_under_new_unique_names(files, tmp_path):
    # The old fixed staging name, held by a user's file and by a link to another file: both survive the write.
    out, out2 = tmp_path / "out.json", tmp_path / "out2.json"
    (tmp_path / "out.json.tmp.json").write_text("precious user data")
    victim = tmp_path / "victim.txt"
    victim.write_text("not a plan")
    (tmp_path / "out2.json.tmp.json").symlink_to(victim)
    assert cli("export", files / "plan.json", "-o", out)[0] == 0
    assert cli("export", files / "plan.json", "-o", out2)[0] == 0
    assert (tmp_path / "out.json.tmp.json").read_text() == "precious user data"
    assert victim.read_text() == "not a plan" and json.loads(out.read_text())
    # the usual permissions (not mkstemp's 0600), and no temporary left beside the outputs
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp.json", "out2.json",
                                                          "out2.json.tmp.json", "victim.txt"]


def test_a_target_name_near_the_file_systems_limit_is_still_written(files, tmp_path):
    # the staging name carries the target name's head only (the whole name made a valid 240-character target fail)
    out = tmp_path / ("p" * 240 + ".json")
    assert cli("export", files / "plan.json", "-o", out)[0] == 0 and json.loads(out.read_text())


@pytest.mark.slow
def test_traces_may_be_any_iterable_of_names():
    spec = moegraph.load_spec("deepseek-v2-lite-tiny")
    for traces in ({"esft-deepseek-v2-lite/intent"}, (t for t in ["esft-deepseek-v2-lite/intent"])):
        got = moegraph.planner.plan(spec, traces, rounds=0)
        assert got.policy["trace_inputs"] == ["esft-deepseek-v2-lite/intent"]


@pytest.mark.parametrize("argv, names", [
    (["validate", "{d}/fifo.yaml"], "is not a regular file"),
    (["export", "{d}/fifo.json", "-o", "{d}/never.json"], "is not a regular file"),
    (["trace", "stats", "{d}/fifo.npz"], "is not a regular file"),
    (["trace", "import", "--format", "sglang", "{d}/fifo.pt", "-o", "{d}/never.npz"], "is not a regular file"),
    (["run", "deepseek-v2-lite-tiny", "--plan", "{d}/fifo.json"], "is not a regular file"),
    (["plan", "deepseek-v2-lite-tiny", "--from", "{d}/fifo.json", "--trace", "esft-deepseek-v2-lite/intent"], "is not a regular file"),
    (["plan", "deepseek-v2-lite-tiny", "--from", "{d}/plan.json", "--trace", "{d}/fifo.npz"], "is not a regular file"),
    (["validate", "/dev/zero"], "device such as /dev/zero"),
    (["export", "/dev/zero", "-o", "{d}/never.json"], "device such as /dev/zero"),
    (["trace", "stats", "{d}/trace_meta_nested.npz"], "nested too deeply"),
    (["validate", f"{LONG}.yaml"], "File name too long"),
    (["trace", "stats", f"{LONG}.npz"], "File name too long"),
    (["export", "{d}/plan.json", "-o", f"{{d}}/{LONG}.json"], "File name too long"),
    (["plan", "deepseek-v2-lite-tiny", "-o", f"{{d}}/{LONG}.json"], "File name too long"),
])
def test_unreadable_inputs_and_unwritable_outputs_are_clear_errors(files, argv, names):
    code, err = cli(*[a.format(d=files) for a in argv])
    assert code == 2 and names in err, err
    assert not (files / "never.json").exists()


def test_nested_or_non_regular_files_in_the_other_readers(files, tmp_path):
    from moegraph.hf.config import load_hf_config

    (tmp_path / "config.json").write_text(NESTED)
    with pytest.raises(InputError, match="nested too deeply"):
        load_hf_config(tmp_path / "config.json")
    with pytest.raises(InputError, match="is not a regular file"):
        load_hf_config(files / "fifo.json")
    with pytest.raises(SpecError, match="File name too long"):
        moegraph.load_spec(LONG)
    # A tuned-strategy table that cannot be read is rebuilt with a warning, as a corrupt one is.
    from moegraph import tuning

    tuner = tuning.Tuner(tmp_path / "cache")
    tuner.path.parent.mkdir(parents=True, exist_ok=True)
    tuner.path.write_text(NESTED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner._load()
    assert tuner.table == {} and any("unreadable" in str(w.message) for w in caught)


def test_plan_and_trace_files_edited_by_hand_are_refused(files, tmp_path):
    text = (files / "plan.json").read_text()
    (tmp_path / "twice.json").write_text(text.replace("{", '{"format": "moegraph-plan", ', 1))
    with pytest.raises(PlanFileError, match="'format' appears twice"):
        Plan.load(tmp_path / "twice.json")
    data = json.loads(text)
    data["version"] = True
    (tmp_path / "true.json").write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match="version True is not supported"):
        Plan.load(tmp_path / "true.json")
    # trace meta: notes and sources are lists of strings (a string of notes was five one-letter notes)
    ts = moegraph.traces.load_traces("esft-deepseek-v2-lite/intent").split_sources()[0]
    ts.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in (("notes", "hello"), ("sources", [{"a": 1}])):
        meta = json.loads(str(arrays["meta"]))
        meta[key] = value
        np.savez(tmp_path / "edited.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
        with pytest.raises(TraceError, match=f"meta.{key} is not a list"):
            moegraph.traces.load_traces(tmp_path / "edited.npz")


def test_api_arguments_of_the_wrong_type_are_named():
    spec = moegraph.load_spec("deepseek-v3-tiny")
    with pytest.raises(PlanFileError, match="takes the plan file's path"):
        Plan.load(None)
    with pytest.raises(InputError, match="plan is a placement Plan or a plan file's path, got int"):
        moegraph.compile(spec, plan=5)
    with pytest.raises(InputError, match="out_dir is the folder"):
        moegraph.compile(spec, out_dir=5)
    with pytest.raises(InputError, match="unknown expert_strategy"):
        moegraph.compile(spec, expert_strategy=["a"])
    with pytest.raises(TraceError, match="traces must be a trace file"):
        moegraph.planner.plan(spec, 5)
    for kw in ({"slots": "x"}, {"nodes": 0}, {"gpus_per_node": 2.5}):
        with pytest.raises(moegraph.errors.PlanInfeasible, match="must be a whole number >= 1"):
            moegraph.planner.plan(spec, **kw)
    for kw in ({"seed": 10**400}, {"seed": True}, {"max_imbalance": float("nan")}, {"rounds": 2.0},
               {"max_imbalance": 10**400}):
        # seed=10**400 raised OverflowError (math.isfinite of an integer past a float's range); huge values are
        # echoed by their digit count
        with pytest.raises(moegraph.errors.PlanInfeasible, match=f"{next(iter(kw))}=.*: expected") as info:
            moegraph.planner.plan(spec, **kw)
        assert len(str(info.value)) < 120
    with pytest.raises(InputError, match="timeout <about 401 digits> must be a finite number"):
        moegraph.compile(spec, timeout=10**400)


def test_argument_predicates_take_numpy_numbers_and_refuse_bools_nan_and_text():
    from moegraph.errors import is_integer, is_number

    assert is_integer(3) and is_integer(np.int64(3), 1, 3) and is_integer(10**400, 0)
    assert not any(is_integer(v) for v in (True, np.bool_(True), 3.0, "3", None, np.float64(3)))
    assert not is_integer(0, 1) and not is_integer(4, 1, 3)
    assert is_number(2.5) and is_number(np.float32(2.5), 2, 3) and is_number(10**300)
    assert not any(is_number(v) for v in (True, float("nan"), float("inf"), -float("inf"), "1.5", None, 10**400))
    assert not is_number(0.99, 1.0) and is_number(1.0, 1.0)


def test_load_traces_takes_a_preset_name_for_its_spec_and_refuses_a_bytes_path():
    law = moegraph.traces.load_traces("esft-deepseek-v2-lite/law", spec="deepseek-v2-lite")  # was an AttributeError
    assert law.num_layers == 26
    with pytest.raises(TraceError, match="esft-deepseek-v2-lite/law: expert id 63 .* exceeds the spec.s 16 experts"):
        moegraph.traces.load_traces("esft-deepseek-v2-lite/law", spec="deepseek-v3-tiny")
    with pytest.raises(TraceError, match=r"got bytes b'esft-deepseek-v2-lite/law' \(a path as bytes: decode it to a "
                                         r"str\)"):  # was "got int 101": its first byte
        moegraph.traces.load_traces(b"esft-deepseek-v2-lite/law")


def test_plan_load_takes_a_spec_file_or_preset_name_for_its_spec(files, tmp_path):
    planned = Plan.load(files / "plan.json").spec
    (tmp_path / "spec.json").write_text(json.dumps(planned.to_dict()))
    assert Plan.load(files / "plan.json", spec=tmp_path / "spec.json").num_gpus == 2
    with pytest.raises(PlanFileError, match="topology.gpus_per_node: 8 in the given spec, 2 in the plan"):
        Plan.load(files / "plan.json", spec="deepseek-v2-lite-tiny")  # the preset is on 8 GPUs


def test_tune_bounds_its_token_counts_and_budget():
    for argv in (["-t", "-1"], ["-t", "99999999999"], ["--budget", "nan"], ["--budget", "-5"]):
        code, err = cli("tune", "deepseek-v3-tiny", *argv)
        assert code == 2 and "Invalid value" in err, (argv, err)


def test_memory_checks_see_the_address_space_limit():
    # `ulimit -v`: the memory a process may still take is below what the system has free.
    code = ("import resource; from moegraph.limits import available_memory; free = available_memory(); "
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY)); "
            "print(free, available_memory())")
    free, limited = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert limited < 2 << 30 <= free


def test_run_refuses_more_tokens_than_memory_holds(files):
    code, err = cli("run", "deepseek-v2-lite-tiny", "--plan", files / "plan.json", "--tokens", "16777216")
    assert code == 2 and "run fewer --tokens" in err, err


MIXTRAL_CONFIG = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_local_experts": 8,
                  "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "vocab_size": 100}


@pytest.mark.parametrize("field, value, says", [
    ("num_hidden_layers", 10**9, "num_hidden_layers is 1000000000; a moegraph spec holds decoder layers as a whole "
                                 "number from 1 to 10000 (ModelSpec.num_layers): fix num_hidden_layers in the config"),
    ("num_local_experts", 10**12, f"num_local_experts is 1000000000000; a moegraph spec holds routed experts as a whole "
                                  f"number from 1 to {moegraph.spec.MAX_EXPERTS} (ExpertsSpec.num_experts)"),
    ("num_experts_per_tok", 100, "num_experts_per_tok is 100, more than the 8 experts (num_local_experts) a token can "
                                 "choose from: give num_experts_per_tok at most 8 in the config"),
    ("hidden_size", 2**30, "hidden_size is 1073741824; a moegraph spec holds the hidden size as a whole number from "
                           "1 to 1048576 (MoELayerSpec.hidden_size)"),
])
def test_import_hf_checks_the_configs_sizes_against_the_specs_bounds_first(tmp_path, field, value, says):
    # a billion layers hung building the model, a trillion experts allocated terabytes, too many experts per token
    # failed deep in the probe naming no field
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**MIXTRAL_CONFIG, field: value}))
    code, err = cli("import-hf", config)
    assert code == 2 and f"error: {config}: {says}" in err, err


@pytest.mark.parametrize("target, says", [
    ("{t}", "is a folder; give the spec file to write"),
    ("{t}/missing/x.yaml", "does not exist; create it or choose another path"),
    ("{d}/fifo.yaml", "is not a regular file"),
    ("{t}/config.json", "is also an input of this command"),
    ("{t}/spec.txt", "cannot write a spec with extension '.txt'"),
])
def test_import_hf_output_is_checked_first_and_written_whole(files, tmp_path, target, says):
    # a folder, a missing folder and a FIFO were tracebacks or a hang; -o the config itself overwrote it
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MIXTRAL_CONFIG))
    code, err = cli("import-hf", tmp_path, "--no-probe", "-o", target.format(t=tmp_path, d=files))
    assert code == 2 and says in err, err
    assert json.loads(config.read_text()) == MIXTRAL_CONFIG and sorted(os.listdir(tmp_path)) == ["config.json"]


def test_import_hf_writes_its_spec_atomically_in_the_outputs_format(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MIXTRAL_CONFIG))
    for out in (tmp_path / "spec.toml", tmp_path / "spec.json"):
        assert cli("import-hf", config, "--no-probe", "-o", out)[0] == 0
        assert moegraph.load_spec(out).moe.experts.num_experts == 8
    assert sorted(os.listdir(tmp_path)) == ["config.json", "spec.json", "spec.toml"]


def test_control_characters_of_user_text_are_printed_as_escapes(run_cli, tmp_path):
    # a spec's description retitled and cleared the terminal; error lines, trace names and HF model types too
    import yaml

    from moegraph.cli.output import visible

    assert visible("a\tb\nc\x1b[2J\x07\x9b\x7f") == "a\tb\nc\\x1b[2J\\x07\\x9b\\x7f"
    data = moegraph.load_spec("mixtral-tiny").to_dict()
    data.update(description="\x1b]0;PWNED\x07\x1b[2J desc", source="\x1b[31mred")
    (tmp_path / "esc.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "key.yaml").write_text(yaml.safe_dump({**data, "\x1b[31mX": 1}))
    ts = moegraph.traces.load_traces("esft-deepseek-v2-lite/intent").split_sources()[0]
    ts.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["name"] = "\x1b[31mRED"
    np.savez(tmp_path / "named.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
    (tmp_path / "config.json").write_text(json.dumps({**MIXTRAL_CONFIG, "model_type": "my\x1b[31mmoe",
                                                      "num_local_experts": None}))
    # (rich itself drops BEL, BS, VT, FF and CR from text)
    for argv, shown in ((["show", tmp_path / "esc.yaml"], "\\x1b]0;PWNED\\x1b[2J desc"),
                        (["validate", tmp_path / "key.yaml"], "unknown key '\\x1b[31mX'"),
                        (["trace", "stats", tmp_path / "named.npz"], "\\x1b[31mRED"),
                        (["import-hf", tmp_path / "config.json"], "my\\x1b[31mmoe")):
        r = run_cli(*argv)
        assert "\x1b" not in r.out + r.err and "\x07" not in r.out + r.err, (argv, r.out + r.err)
        assert shown in r.out + r.err, (argv, r.out + r.err)


def test_a_table_cell_with_control_characters_keeps_the_table_aligned():
    # escaped after rich's layout, '\x1b[2J' widened its cell by four characters past the border
    from rich.table import Table

    from moegraph.cli.output import console

    table = Table(title="t\x1b]0;X\x07")
    table.add_column("name")
    table.add_column("v")
    table.add_row("a\x1b[2Jb", "1")
    table.add_row("plain", "2")
    with console.capture() as cap:
        console.print(table)
    lines = [line for line in cap.get().splitlines() if line.strip()]
    assert "\x1b" not in cap.get() and "a\\x1b[2Jb" in cap.get() and "t\\x1b]0;X\\x07" in lines[0]
    assert len({len(line) for line in lines[1:]}) == 1, lines


def test_the_cli_prints_a_warning_as_one_line(run_cli, tmp_path):
    # Python's own format showed the source file and line of the warning call
    data = moegraph.load_spec("mixtral-tiny").to_dict()
    data["placement"]["objective"] = {"communication": 3}
    (tmp_path / "objective.json").write_text(json.dumps(data))
    r = run_cli("validate", tmp_path / "objective.json")
    assert r.code == 0 and "ok" in r.out
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: placement.objective.communication = 3 is ignored"), r.err


def test_an_empty_or_folder_sglang_dump_and_a_folder_without_config_json_say_what_they_are(tmp_path):
    """An empty .pt said "truncated or corrupt: " with no reason and no fix; a folder was "corrupt"; a model
    folder without config.json was "no such file"."""
    pytest.importorskip("torch")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "dumps"
    folder.mkdir()
    code, err = cli("trace", "import", "--format", "sglang", empty, "-o", tmp_path / "t.npz")
    assert code == 2 and f"{empty}: not a readable SGLang dump (truncated or corrupt: the file is empty); dump it " \
                          "again with SGLang's expert distribution recorder" in err, err
    code, err = cli("trace", "import", "--format", "sglang", folder, "-o", tmp_path / "t.npz")
    assert code == 2 and f"{folder}: is a folder; give the SGLang dump files" in err and "corrupt" not in err, err
    code, err = cli("import-hf", folder, "--no-probe")
    assert code == 2 and f"{folder}: the folder holds no config.json; pass the model folder that holds it" in err, err
    assert not (tmp_path / "t.npz").exists()
