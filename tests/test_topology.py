"""Topology: the networkx graph of devices and links, and the dense per-GPU view the planner uses."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from moegraph import load_spec
from moegraph.errors import PlanInfeasible
from moegraph.spec import ExplicitTopology, UniformTopology
from moegraph.topology import build_topology, cluster_of


def test_uniform_shorthand_expands_to_every_pair():
    topo = UniformTopology(nodes=2, gpus_per_node=4, intra_node_bandwidth_gbps=400, inter_node_bandwidth_gbps=50,
                           intra_node_latency_us=2, inter_node_latency_us=8, gpu_memory_gib=80)
    g = build_topology(topo)
    assert g.number_of_nodes() == 8 and g.number_of_edges() == 8 * 7 // 2
    assert g.nodes["gpu5"] == {"index": 5, "node": "node1", "node_index": 1, "local_index": 1, "memory": 80}
    assert g.edges["gpu0", "gpu3"] == {"bandwidth": 400, "latency": 2}
    assert g.edges["gpu0", "gpu4"] == {"bandwidth": 50, "latency": 8}


def test_spec_topology_and_graph_give_the_same_cluster():
    spec = load_spec("deepseek-v3")
    a, b = cluster_of(spec), cluster_of(build_topology(spec))
    assert a.num_gpus == 32 and a.num_nodes == 4 and a.gpus_per_node == 8
    np.testing.assert_array_equal(a.node_of_gpu, b.node_of_gpu)
    np.testing.assert_array_equal(a.bandwidth, b.bandwidth)
    np.testing.assert_array_equal(a.latency, b.latency)
    assert a.bandwidth[0, 1] == 160 and a.bandwidth[0, 8] == 40 and np.isinf(a.bandwidth[3, 3])


def test_explicit_topology_routes_over_the_lowest_latency_path():
    topo = ExplicitTopology(
        devices=[{"name": "a0", "node": "A"}, {"name": "a1", "node": "A"}, {"name": "b0", "node": "B", "memory_gib": 40}],
        links=[{"a": "a0", "b": "a1", "bandwidth_gbps": 300, "latency_us": 1},
               {"a": "a1", "b": "b0", "bandwidth_gbps": 25, "latency_us": 5}],
    )
    g = build_topology(topo)
    assert isinstance(g, nx.Graph) and set(g.nodes) == {"a0", "a1", "b0"}
    assert g.nodes["b0"]["memory"] == 40 and g.nodes["b0"]["node_index"] == 1 and g.nodes["a1"]["local_index"] == 1
    cl = cluster_of(topo)
    # a0 -> b0 goes through a1: latencies add up, the slowest link sets the bandwidth.
    assert cl.latency[0, 2] == 6 and cl.bandwidth[0, 2] == 25
    assert cl.gpus_per_node is None  # hosts of different sizes
    np.testing.assert_array_equal(cl.memory_gib, [80, 80, 40])


def test_disconnected_devices_are_infeasible_with_a_fix():
    topo = ExplicitTopology(devices=[{"name": "x", "node": "A"}, {"name": "y", "node": "B"}])
    with pytest.raises(PlanInfeasible, match="'x' cannot reach 'y'.*add a link"):
        cluster_of(topo)


def test_landing_gpu_is_rail_aligned():
    cl = cluster_of(UniformTopology(nodes=3, gpus_per_node=4))
    src = np.array([1, 6, 11])
    np.testing.assert_array_equal(cl.landing_gpu(src, np.array([2, 0, 1])), [9, 2, 7])
