"""The cluster a plan is made for, as a networkx graph of devices and links.

``build_topology(spec or spec.topology)`` returns an undirected ``networkx.Graph``:

- one graph node per device (GPU), named ``gpu<i>`` for uniform clusters or as the spec names it,
  with attributes ``index`` (rank order), ``node`` (host name), ``node_index``, ``local_index``
  (position inside its host) and ``memory`` (GiB);
- one edge per link with ``bandwidth`` (GB/s) and ``latency`` (microseconds). A uniform cluster
  (``nodes`` x ``gpus_per_node``) expands to every pair: NVLink-class links inside a host, NIC-class
  links across hosts (bandwidth per GPU, as in the spec).

``Cluster`` is the dense view the planner uses: per-GPU host index and memory, and per-pair
effective bandwidth (the bottleneck of the lowest-latency path) and latency (summed along it).
Devices that cannot reach each other make the request infeasible.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import networkx as nx
import numpy as np

from .errors import PlanInfeasible
from .spec import ExplicitTopology, MoESpec, UniformTopology

__all__ = ["build_topology", "Cluster", "cluster_of"]


def _topology_of(obj: Any) -> UniformTopology | ExplicitTopology:
    if isinstance(obj, MoESpec):
        return obj.topology
    if isinstance(obj, (UniformTopology, ExplicitTopology)):
        return obj
    raise TypeError(f"expected a MoESpec or a topology section, got {type(obj).__name__}")


def build_topology(spec_or_topology: MoESpec | UniformTopology | ExplicitTopology) -> nx.Graph:
    """The cluster as a networkx graph of devices (nodes) and links (edges); see the module docstring."""
    topo = _topology_of(spec_or_topology)
    g = nx.Graph(kind=topo.kind)
    if isinstance(topo, UniformTopology):
        n, per = topo.nodes, topo.gpus_per_node
        for i in range(n * per):
            g.add_node(f"gpu{i}", index=i, node=f"node{i // per}", node_index=i // per, local_index=i % per,
                       memory=topo.gpu_memory_gib)
        for i in range(n * per):
            for j in range(i + 1, n * per):
                same = i // per == j // per
                g.add_edge(
                    f"gpu{i}", f"gpu{j}",
                    bandwidth=topo.intra_node_bandwidth_gbps if same else topo.inter_node_bandwidth_gbps,
                    latency=topo.intra_node_latency_us if same else topo.inter_node_latency_us,
                )
        return g
    hosts: dict[str, int] = {}
    local: dict[str, int] = {}
    for i, d in enumerate(topo.devices):
        hosts.setdefault(d.node, len(hosts))
        g.add_node(d.name, index=i, node=d.node, node_index=hosts[d.node], local_index=local.get(d.node, 0),
                   memory=d.memory_gib)
        local[d.node] = local.get(d.node, 0) + 1
    for link in topo.links:
        g.add_edge(link.a, link.b, bandwidth=link.bandwidth_gbps, latency=link.latency_us)
    return g


@dataclass(frozen=True, eq=False)
class Cluster:
    """Dense per-GPU view of a topology (GPUs in rank order)."""

    names: tuple[str, ...]
    node_of_gpu: np.ndarray  # [G] host index of each GPU
    local_index: np.ndarray  # [G] position of each GPU inside its host
    memory_gib: np.ndarray  # [G]
    bandwidth: np.ndarray  # [G, G] GB/s effective between GPUs (inf on the diagonal)
    latency: np.ndarray  # [G, G] microseconds (0 on the diagonal)

    @property
    def num_gpus(self) -> int:
        return len(self.names)

    @property
    def num_nodes(self) -> int:
        return int(self.node_of_gpu.max()) + 1

    @property
    def gpus_per_node(self) -> int | None:
        """GPUs per host when every host has the same number, else None."""
        sizes = np.bincount(self.node_of_gpu)
        return int(sizes[0]) if (sizes == sizes[0]).all() else None

    def gpus_of_node(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.node_of_gpu == node)

    def landing_gpu(self, src: np.ndarray, node: np.ndarray) -> np.ndarray:
        """GPU of host ``node`` that receives inter-host copies from GPU ``src`` (same local index, rail-aligned).

        src, node: broadcastable integer arrays. Hosts with fewer GPUs wrap the local index around.
        """
        sizes = np.bincount(self.node_of_gpu)
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        order = np.argsort(self.node_of_gpu * len(self.names) + self.local_index, kind="stable")
        return order[first[node] + self.local_index[src] % sizes[node]]


def cluster_of(spec_or_topology: MoESpec | UniformTopology | ExplicitTopology | nx.Graph) -> Cluster:
    """The dense ``Cluster`` view of a spec, topology section or graph from ``build_topology``."""
    if not isinstance(spec_or_topology, nx.Graph):
        topo = _topology_of(spec_or_topology)
        if isinstance(topo, UniformTopology):  # closed form, no need to expand the graph
            n, per = topo.nodes, topo.gpus_per_node
            gpus = n * per
            node = np.arange(gpus) // per
            same = node[:, None] == node[None, :]
            bw = np.where(same, topo.intra_node_bandwidth_gbps, topo.inter_node_bandwidth_gbps).astype(float)
            lat = np.where(same, topo.intra_node_latency_us, topo.inter_node_latency_us).astype(float)
            np.fill_diagonal(bw, np.inf)
            np.fill_diagonal(lat, 0.0)
            return Cluster(tuple(f"gpu{i}" for i in range(gpus)), node, np.arange(gpus) % per,
                           np.full(gpus, topo.gpu_memory_gib, float), bw, lat)
        graph = build_topology(topo)
    else:
        graph = spec_or_topology
    names = sorted(graph.nodes, key=lambda v: graph.nodes[v]["index"])
    gpus = len(names)
    node = np.array([graph.nodes[v]["node_index"] for v in names])
    local = np.array([graph.nodes[v]["local_index"] for v in names])
    mem = np.array([graph.nodes[v]["memory"] for v in names], float)
    bw = np.full((gpus, gpus), np.inf)
    lat = np.zeros((gpus, gpus))
    # Route each pair over the path of least latency (ties: fewest hops); its bandwidth is the bottleneck link's.
    for i, src in enumerate(names):
        _, paths = nx.single_source_dijkstra(graph, src, weight=lambda a, b, d: d["latency"] + 1e-9)
        for j, dst in enumerate(names):
            if i == j:
                continue
            if dst not in paths:
                raise PlanInfeasible(
                    f"topology: device {src!r} cannot reach {dst!r} (no path of links); add a link to "
                    "topology.links so that every device is connected"
                )
            hops = paths[dst]
            lat[i, j] = sum(graph.edges[a, b]["latency"] for a, b in pairwise(hops))
            bw[i, j] = min(graph.edges[a, b]["bandwidth"] for a, b in pairwise(hops))
    return Cluster(tuple(names), node, local, mem, bw, lat)
