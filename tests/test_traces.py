"""Traces: the native format, the ESFT and SGLang importers (real files and broken ones), stats."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from moegraph import load_spec
from moegraph.errors import TraceError
from moegraph.traces import (
    TraceSet,
    bundled_traces,
    coactivation,
    load_traces,
    read_esft,
    read_native,
    read_sglang,
    synthetic_traces,
    trace_stats,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces" / "esft-deepseek-v2-lite"
BUNDLED = Path(__file__).resolve().parents[1] / "moegraph" / "data" / "traces" / "esft-deepseek-v2-lite"


def _write_esft(folder: Path, ts: TraceSet, layers: int = 3) -> Path:
    """Write ``ts`` (first ``layers`` layers) in the ESFT text format, with made-up gate scores."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(layers):
        lines = []
        for s in np.unique(ts.sample_ids):
            ids = ts.topk[layer][ts.sample_ids == s].ravel()
            scores = np.full(len(ids), 0.1)
            lines.append("\t".join(map(str, ids)) + "\t\t" + "\t".join(f"{x:.4f}" for x in scores))
        (folder / f"expert_weights_{layer + 1}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def law() -> TraceSet:
    return load_traces("esft-deepseek-v2-lite/law")


# ------------------------------------------------------------------------------------------------ bundled


def test_bundled_set_has_both_tasks_with_source_and_licence():
    assert bundled_traces() == {"esft-deepseek-v2-lite": ["intent", "law"]}
    readme = (BUNDLED / "README.md").read_text()
    assert "deepseek-ai/ESFT" in readme and "MIT" in readme
    assert "MIT License" in (BUNDLED / "LICENSE").read_text()
    ts = load_traces("esft-deepseek-v2-lite")
    assert ts.sources == ("intent", "law")
    assert (ts.num_layers, ts.num_experts, ts.top_k) == (26, 64, 6)
    assert ts.topk.dtype == np.uint8
    assert ts.num_tokens == 8222 + 8327 and ts.num_samples == 127 + 33
    assert ts.layer_ids == tuple(range(1, 27))
    # Counts are the routed choices: every token chose 6 distinct experts in every layer.
    assert (ts.counts.sum(axis=1) == ts.num_tokens * 6).all()
    assert all(len(np.unique(row)) == 6 for row in ts.topk[5, :500])
    parts = ts.split_sources()
    assert [p.num_tokens for p in parts] == [8222, 8327]
    assert not set(np.unique(parts[0].sample_ids)) & set(np.unique(parts[1].sample_ids))


def test_bundled_name_typo_suggests_the_right_one():
    with pytest.raises(TraceError, match="did you mean esft-deepseek-v2-lite"):
        load_traces("esft-deepseek-v2-lit")
    with pytest.raises(TraceError, match="no task 'lawz'"):
        load_traces("esft-deepseek-v2-lite/lawz")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces not present")
def test_esft_importer_on_the_real_files_matches_the_bundled_copy():
    ts = read_esft(SHARED / "law", top_k=None)  # top_k inferred from the files
    ref = read_native(BUNDLED / "law.npz")
    assert ts.top_k == 6 and ts.num_experts == 64
    np.testing.assert_array_equal(ts.topk, ref.topk)
    np.testing.assert_array_equal(ts.sample_ids, ref.sample_ids)
    assert ts.layer_ids == ref.layer_ids == tuple(range(1, 27))


# ------------------------------------------------------------------------------------------------ native


def test_native_round_trip_keeps_everything(tmp_path):
    rng = np.random.default_rng(0)
    layers = [np.stack([rng.choice(300, 4, replace=False) for _ in range(50)]) for _ in range(3)]
    ts = TraceSet.from_topk(layers, np.repeat(np.arange(10), 5), num_experts=300, src_rank=np.arange(50) % 4,
                            num_ranks=4, layer_ids=[1, 3, 5], source="rec")
    assert ts.topk.dtype == np.uint16  # 300 experts do not fit uint8
    back = read_native(ts.save(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.topk, ts.topk)
    np.testing.assert_array_equal(back.sample_ids, ts.sample_ids)
    np.testing.assert_array_equal(back.src_rank, ts.src_rank)
    assert (back.num_ranks, back.layer_ids, back.sources, back.num_experts) == (4, (1, 3, 5), ("rec",), 300)
    assert not list(tmp_path.glob("*.tmp*")), "the temporary file must be gone"


def test_a_failed_trace_write_names_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno
    import os

    ts = TraceSet.from_topk([np.array([[0, 1], [2, 3]])], num_experts=4)

    def full_disk(path, **arrays):  # part of the file lands, then the disk is full
        Path(path).write_bytes(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(TraceError, match=f"{tmp_path / 't.npz'}: could not write the trace \\(No space left"):
        ts.save(tmp_path / "t.npz")
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    os.mkfifo(tmp_path / "pipe.npz")  # a rename would replace the pipe with a regular file
    with pytest.raises(TraceError, match="pipe.npz: exists and is not a regular file"):
        ts.save(tmp_path / "pipe.npz")
    assert (tmp_path / "pipe.npz").is_fifo()


def test_load_only_round_trip_and_note(tmp_path):
    counts = np.arange(12).reshape(3, 4)
    ts = TraceSet.from_counts(counts, source="dump")
    assert ts.load_only and "communication is not optimised" in ts.notes[0]
    back = load_traces(ts.save(tmp_path / "c.npz"))
    assert back.load_only
    np.testing.assert_array_equal(back.counts, counts)


def test_fractional_counts_are_refused_not_rounded():
    # shares of the tokens (each below 0.5) were rounded to 0: a plan of no load, without a word
    shares = np.full((2, 8), 1 / 8)
    with pytest.raises(TraceError, match=r"dump: count 0.125 at \[0, 0\] is not a whole number of tokens .*np.rint"):
        TraceSet.from_counts(shares, source="dump")
    np.testing.assert_array_equal(TraceSet.from_counts(shares * 64, source="dump").counts, np.full((2, 8), 8))


def test_counts_beyond_int64_are_refused_not_wrapped(tmp_path):
    # a uint64 count of 2^64-1 passed `c < 0` and became -1 in int64; a float >= 2^63 became INT64_MIN
    for counts in (np.array([[2**64 - 1] + [1] * 7], np.uint64), np.array([[2.0**63] + [1.0] * 7])):
        with pytest.raises(TraceError, match=r"dump: count \S+ at \[0, 0\] is not a number of tokens .*2\^40"):
            TraceSet.from_counts(counts, source="dump")
    path = TraceSet.from_counts(np.ones((2, 8), np.int64)).save(tmp_path / "c.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["counts_by_source"] = arrays["counts_by_source"].astype(np.uint64)
    arrays["counts_by_source"][0, 1, 3] = 2**64 - 1
    np.savez(path, **arrays)
    with pytest.raises(TraceError) as exc:
        read_native(path)
    assert (f"{path}: counts_by_source: count 18446744073709551615 at [0, 1, 3] is not a number of tokens"
            in str(exc.value) and "re-import the trace" in str(exc.value))


def test_sglang_counts_that_overflow_when_summed_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "d.pt"
    torch.save({"logical_count": torch.full((4, 1, 8), 2**62, dtype=torch.int64)}, path)  # summed: wraps to 0
    with pytest.raises(TraceError, match=rf"^{path}: logical_count: count 4611686018427387904 at \[0, 0, 0\]"):
        read_sglang(path)
    torch.save({"logical_count": torch.full((4, 1, 8), 2**39, dtype=torch.int64)}, path)  # each fits, the sum not
    with pytest.raises(TraceError, match=rf"^{path}: logical_count summed over its steps: count 2199023255552.0 .*"
                                         "the dump is corrupt"):
        read_sglang(path)


def test_sglang_unsigned_ids_beyond_int64_are_refused_not_read_as_padding(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "d.pt"
    ids = torch.tensor(np.array([[[0, 1], [2, 2**64 - 1]]], dtype=np.uint64))  # the second token's id wrapped to -1
    torch.save({"records": [{"topk_ids_of_layer": ids, "rank": 0}]}, path)
    with pytest.raises(TraceError, match=rf"^{path}: records\[0\].topk_ids_of_layer holds 18446744073709551615, "
                                         "beyond any expert id or count; the dump is corrupt$"):
        read_sglang(path)


def test_from_topk_accepts_torch_and_checks_shapes():
    torch = pytest.importorskip("torch")
    ids = torch.tensor([[0, 1], [2, 3]])
    ts = TraceSet.from_topk([ids, ids.flip(1)], num_experts=4)
    assert ts.num_tokens == 2 and ts.top_k == 2 and list(ts.sample_ids) == [0, 1]
    with pytest.raises(TraceError, match="same shape"):
        TraceSet.from_topk([ids, ids[:1]])
    with pytest.raises(TraceError, match="negative expert id"):
        TraceSet.from_topk([ids - 1])


def test_ragged_lists_are_named_not_a_numpy_error():
    with pytest.raises(TraceError, match=r"^rec: layer 1 is not an array \(lists of different lengths\?\); give a "
                                         r"\[tokens, top_k\] array of numbers$"):
        TraceSet.from_topk([[[0, 1], [2, 3]], [[0, 1], [2]]], source="rec")
    with pytest.raises(TraceError, match=r"^rec: sample_ids is not an array .*give a \[tokens\] array"):
        TraceSet.from_topk([[[0, 1], [2, 3]]], [[0], [1, 2]], source="rec")
    with pytest.raises(TraceError, match=r"^dump: counts is not an array .*give a \[layers, experts\] array"):
        TraceSet.from_counts([[1, 2], [3]], source="dump")


@pytest.mark.parametrize("ranks, phrase", [
    (np.full(100, np.nan, np.float32), "src_rank holds float32 values, not rank numbers (integers)"),  # plan: traceback
    (np.full(100, 1.7), "src_rank holds float64 values"),  # was truncated to rank 1
    (np.full(100, -2, np.int16), "src_rank holds rank -2, outside 0..1048575"),
    (np.full(100, 4, np.int16), "src_rank holds rank 4, not below meta.num_ranks (4)"),
])
def test_native_source_ranks_are_whole_ranks_below_num_ranks(tmp_path, law, ranks, phrase):
    path = tmp_path / "t.npz"
    TraceSet.from_topk(list(law.topk[:2, :100]), law.sample_ids[:100], num_experts=64, src_rank=np.arange(100) % 4,
                       num_ranks=4).save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(path, **{**arrays, "src_rank": ranks})
    with pytest.raises(TraceError) as exc:
        read_native(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {phrase}") and msg.endswith("; the file is corrupt, re-import the trace"), msg


def test_from_topk_refuses_ranks_and_sample_ids_that_are_not_integers_in_range():
    ids = [np.array([[0, 1], [2, 3]])]
    fix = "give each token's rank as an integer in 0..num_ranks-1"
    for kwargs, phrase in (
        ({"src_rank": np.array([-3, 0])}, "src_rank holds rank -3, outside 0..1048575"),
        ({"src_rank": np.array([np.nan, 0])}, "src_rank holds float64 values"),
        ({"src_rank": np.array([0, 2]), "num_ranks": 2}, "src_rank holds rank 2, not below num_ranks (2)"),
        ({"src_rank": np.array([0, 1]), "num_ranks": 0}, "num_ranks is 0, expected an integer in 1..1048576"),
        ({"src_rank": np.array([0, 10**15])}, "src_rank holds rank 1000000000000000, outside 0..1048575"),
    ):
        with pytest.raises(TraceError) as exc:
            TraceSet.from_topk(ids, num_experts=4, source="rec", **kwargs)
        msg = str(exc.value)
        assert msg.startswith(f"rec: {phrase}") and msg.endswith(f"; {fix}"), (kwargs, msg)
    for sample_ids in (np.array([np.nan, 0.0]), np.array([0.7, 1.0])):
        with pytest.raises(TraceError, match="rec: sample_ids holds float64 values; give each token's sequence as an "
                                             "integer"):
            TraceSet.from_topk(ids, sample_ids, num_experts=4, source="rec")


def test_constructors_refuse_layers_the_native_reader_would_refuse():
    ids = [np.array([[0, 1], [2, 3]])] * 2
    for layer_ids, phrase in (([1, 10**6 + 1], "layer_ids: 1000001 is not a decoder layer index in 0..1000000"),
                              ([1, -1], "layer_ids: -1 is not a decoder layer index in 0..1000000"),
                              ([1.5, 2], "layer_ids: 1.5 is not a decoder layer index in 0..1000000"),
                              ([1], "layer_ids has 1 entries for 2 layers")):
        with pytest.raises(TraceError, match=rf"^rec: {re.escape(phrase)}; pass one \[tokens, top_k\] array per MoE"):
            TraceSet.from_topk(ids, num_experts=4, layer_ids=layer_ids, source="rec")
    with pytest.raises(TraceError, match=r"^dump: 0 MoE layers, outside 1..10000; pass one row of counts per MoE"):
        TraceSet.from_counts(np.zeros((0, 8)), source="dump")
    with pytest.raises(TraceError, match=r"^dump: layer_ids: 2000000 is not a decoder layer index in 0..1000000"):
        TraceSet.from_counts(np.ones((1, 8)), source="dump", layer_ids=[2_000_000])
    assert TraceSet.from_topk(ids, num_experts=4, layer_ids=np.array([3, 5])).layer_ids == (3, 5)  # numpy ints: saved


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_trace", "bad_ids"])
def test_corrupt_native_file_is_reported_with_its_path(tmp_path, law, damage):
    path = tmp_path / "t.npz"
    TraceSet.from_topk(list(law.topk[:2, :100]), law.sample_ids[:100], num_experts=64).save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "not_a_trace":
        np.savez(path, x=np.zeros(3))
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["topk"] = arrays["topk"].astype(np.int64) + 64  # ids beyond num_experts
        np.savez_compressed(path, **arrays)
    with pytest.raises(TraceError) as exc:
        load_traces(path)
    assert str(path) in str(exc.value)


def test_a_window_of_no_tokens_written_by_save_loads_and_is_refused_as_empty(tmp_path, law):
    small = TraceSet.from_topk(list(law.topk[:2, :100]), law.sample_ids[:100], num_experts=64, source="law")
    path = small.select_tokens(np.zeros(100, bool)).save(tmp_path / "empty.npz")
    back = read_native(path)  # what the writer wrote reads back: no tokens, no sources
    assert (back.num_tokens, back.sources, back.num_layers) == (0, (), 2)
    with pytest.raises(TraceError, match="holds no routed tokens"):
        load_traces(path)


@pytest.mark.parametrize("damage,match", [
    ("float", r"topk has shape \(2, 100, 6\) \(float32\)"),
    ("2d", r"topk has shape \(100, 6\)"),
    ("negative", "expert ids outside 0..63"),
    ("no_sources", "meta.sources is empty but the file holds tokens"),
    ("meta_top_k", "topk lists 6 experts per token but meta.top_k says 4"),
    ("top_k_0", r"no expert per token \(top_k 0\)"),
    ("format", r"not a moegraph trace file \(meta.format is 'yyyy.*\.\.\.\)"),  # a long value echoed short
])
def test_a_bad_native_field_gives_one_message_not_a_nested_one(tmp_path, law, damage, match):
    path = tmp_path / "t.npz"
    TraceSet.from_topk(list(law.topk[:2, :100]), law.sample_ids[:100], num_experts=64).save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if damage == "float":
        arrays["topk"] = arrays["topk"].astype(np.float32)
    elif damage == "2d":
        arrays["topk"] = arrays["topk"][0]
    elif damage == "negative":
        arrays["topk"] = arrays["topk"].astype(np.int32) - 1
    elif damage == "meta_top_k":
        arrays["meta"] = np.array(str(arrays["meta"]).replace('"top_k": 6', '"top_k": 4'))
    elif damage == "top_k_0":
        arrays["topk"] = arrays["topk"][:, :, :0]
        arrays["meta"] = np.array(str(arrays["meta"]).replace('"top_k": 6', '"top_k": 0'))
    elif damage == "format":
        long_format = '"format": "' + "y" * 100_000 + '"'
        arrays["meta"] = np.array(str(arrays["meta"]).replace('"format": "moegraph-trace"', long_format))
    else:
        arrays["meta"] = np.array(str(arrays["meta"]).replace('"sources": ["trace"]', '"sources": []'))
    np.savez(path, **arrays)
    with pytest.raises(TraceError, match=match) as exc:
        read_native(path)
    assert str(exc.value).count(str(path)) == 1 and "a field has the wrong type" not in str(exc.value)
    assert len(str(exc.value)) < 300 + len(str(path))


# ------------------------------------------------------------------------------------------------ ESFT


def test_esft_folder_of_tasks_round_trips(tmp_path, law):
    small = law.select_samples(range(4))  # law's first 4 samples
    root = tmp_path / "scores"
    _write_esft(root / "law", small)
    _write_esft(root / "other", small)
    ts = load_traces(root)  # a folder of task folders: one source each
    assert ts.sources == ("law", "other") and ts.num_layers == 3 and ts.top_k == 6
    np.testing.assert_array_equal(ts.split_sources()[0].topk, small.topk[:3])


@pytest.mark.parametrize("damage,match", [
    ("cut_line", r"expert_weights_2\.txt: line 4 has \d+ expert ids but \d+ scores"),
    ("drop_line", r"expert_weights_2\.txt: 3 samples but expert_weights_1\.txt has 4"),
    ("no_scores", r"expert_weights_2\.txt: line 1 is not"),
    ("word", r"expert_weights_2\.txt: line 2 holds a field that is not a number"),
    ("gap", r"missing expert_weights_2\.txt"),
    ("bad_id", r"expert_weights_2\.txt: line 1 has expert id 99"),
])
def test_broken_esft_files_are_reported_with_file_and_line(tmp_path, law, damage, match):
    folder = _write_esft(tmp_path / "law", law.select_samples(range(4)))
    f = folder / "expert_weights_2.txt"
    lines = f.read_text().splitlines()
    if damage == "cut_line":
        f.write_text("\n".join(lines[:3] + [lines[3][: len(lines[3]) // 2 + 5]]))
    elif damage == "drop_line":
        f.write_text("\n".join(lines[:3]) + "\n")
    elif damage == "no_scores":
        f.write_text("\n".join([lines[0].split("\t\t")[0]] + lines[1:]) + "\n")
    elif damage == "word":
        f.write_text("\n".join([lines[0], "abc" + lines[1][lines[1].index("\t"):]] + lines[2:]) + "\n")
    elif damage == "gap":
        f.unlink()
    else:
        f.write_text("\n".join(["99" + lines[0][lines[0].index("\t"):]] + lines[1:]) + "\n")
    with pytest.raises(TraceError, match=match):
        read_esft(folder, top_k=6, num_experts=64)


# ------------------------------------------------------------------------------------------------ SGLang


def test_sglang_stat_dump_is_a_load_only_trace(tmp_path):
    torch = pytest.importorskip("torch")
    spec = load_spec("deepseek-v2-lite")
    counts = torch.randint(0, 50, (2, 27, 64))  # [buffer steps, all decoder layers, experts]
    counts[:, 0] = 0  # the dense first layer routes nothing
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path)
    ts = read_sglang(path, spec=spec)
    assert ts.load_only and ts.num_layers == 26 and ts.layer_ids == tuple(range(1, 27))
    np.testing.assert_array_equal(ts.counts, counts.sum(0)[1:].numpy())
    ts.check_spec(spec)


def test_sglang_per_token_dump_is_a_token_trace(tmp_path):
    torch = pytest.importorskip("torch")
    ids = torch.full((3, 5, 8), -1)  # 3 layers (first dense), 5 tokens, recorder K=8 but model K=2
    ids[1:, :, :2] = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1]])
    path = tmp_path / "d.pt"
    torch.save({"records": [{"topk_ids_of_layer": ids, "extend_seq_lens": [2, 3], "rank": 1}],
                "last_physical_to_logical_map": torch.arange(4)}, path)
    ts = read_sglang(path)
    assert (ts.num_layers, ts.top_k, ts.num_tokens) == (2, 2, 5)
    assert ts.layer_ids == (1, 2)
    assert list(ts.sample_ids) == [0, 0, 1, 1, 1] and list(ts.src_rank) == [1] * 5


def test_corrupt_sglang_dump_is_reported_with_its_path(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "d.pt"
    torch.save({"logical_count": torch.ones(2, 4, dtype=torch.int64)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TraceError, match=str(path)):
        read_sglang(path)
    torch.save({"something": 1}, path)
    with pytest.raises(TraceError, match="neither 'logical_count'"):
        read_sglang(path)


# ------------------------------------------------------------------------------------------------ checks


def test_traces_that_do_not_fit_the_spec_say_what_to_change(law):
    spec = load_spec("deepseek-v2-lite")
    with pytest.raises(TraceError, match="3 MoE layers in the trace but the spec has 26"):
        TraceSet.from_topk(list(law.topk[:3]), num_experts=64).check_spec(spec)
    big = TraceSet.from_topk([law.topk[0].astype(np.int64) + 10] * 26, num_experts=74)
    with pytest.raises(TraceError, match="expert id 73 .* exceeds the spec's 64 experts"):
        big.check_spec(spec)
    with pytest.raises(TraceError, match="tokens choose 5 experts but the spec's moe.router.top_k is 6"):
        TraceSet.from_topk([law.topk[0, :, :5]] * 26, num_experts=64).check_spec(spec)
    # the decoder layers a trace was recorded at must be the spec's MoE layers, in order (law: 1..26)
    assert law.layer_ids == tuple(spec.model.moe_layer_indices)
    law.check_spec(spec)
    for ids in (list(range(26, 0, -1)), list(range(100, 126))):
        moved = TraceSet.from_topk(list(law.topk), num_experts=64, layer_ids=ids)
        with pytest.raises(TraceError, match=rf"layer_ids \[{ids[0]}, .* are not the spec's MoE layers \[1, 2,"):
            moved.check_spec(spec)


# ------------------------------------------------------------------------------------------------ stats


def test_coactivation_on_a_hand_made_case():
    w = coactivation(np.array([[0, 1, 2], [0, 1, 3]]), 4)
    want = np.zeros((4, 4))
    for a, b, n in ((0, 1, 2), (0, 2, 1), (1, 2, 1), (0, 3, 1), (1, 3, 1)):
        want[a, b] = want[b, a] = n
    np.testing.assert_array_equal(w, want)


def test_stats_of_the_real_traces(law):
    st = trace_stats(law)
    assert st.loads.shape == (26, 64)
    assert (st.skew > 1.5).all(), "real routing is skewed"
    # Co-activation is far from uniform: the top 10% of pairs hold much more than 10%.
    assert (st.pair_concentration > 0.3).all()
    assert st.affinity is not None and ((0 < st.affinity) & (st.affinity < 1)).all()
    a, b, n, lift = st.top_pairs[0][0]
    assert n == coactivation(law.topk[0], 64)[a, b] and lift > 1


def test_synthetic_traces_are_deterministic_and_valid():
    a = synthetic_traces(2, 32, 4, 256, tokens_per_sample=32, seed=3)
    b = synthetic_traces(2, 32, 4, 256, tokens_per_sample=32, seed=3)
    np.testing.assert_array_equal(a.topk, b.topk)
    assert all(len(np.unique(r)) == 4 for r in a.topk[0])
    assert a.num_samples == 8


def test_esft_folder_copied_whole_from_shared_loads(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("../shared/traces not present")
    dst = tmp_path / "intent"
    shutil.copytree(SHARED / "intent", dst)
    (dst / "expert_weights_26.txt").write_text("")  # an emptied file is refused, not half-used
    with pytest.raises(TraceError, match="expert_weights_26.txt: empty file"):
        load_traces(dst)
