"""The package's import graph has no cycle: no module imports, directly or through others, a module that imports it."""

import itertools

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Each cycle once, as the shortest chain from a module back to itself."""
    cycles, seen = [], set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None and frozenset(back) not in seen:
                seen.add(frozenset(back))
                cycles.append([importer, *back])
    return cycles


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """``a (line 3) -> b (line 12) -> a``: each hop with the lines of the importer that make it."""
    hops = [cycle[0]]
    for importer, imported in itertools.pairwise(cycle):
        lines = sorted(d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported))
        hops[-1] += f" (line {', '.join(map(str, lines))})"
        hops.append(imported)
    return " -> ".join(hops)


def test_no_import_cycle():
    # Imports inside functions and under `if TYPE_CHECKING:` count: a deferred cycle is still a cycle.
    graph = grimp.build_graph("xlstm_hf", exclude_type_checking_imports=False, cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in xlstm_hf:\n" + "\n".join(describe(graph, cycle) for cycle in cycles)
