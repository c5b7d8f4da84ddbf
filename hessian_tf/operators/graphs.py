"""Reading traced graphs."""

from __future__ import annotations


def graph_nodes(graph_def) -> list:
    """(prefix, node) for every node of a GraphDef and of every function in its library
    (loop bodies, branches, called functions); prefix: '' or the function's name + '/'."""
    nodes = [("", node) for node in graph_def.node]
    for function in graph_def.library.function:
        nodes += [(function.signature.name + "/", node) for node in function.node_def]
    return nodes
