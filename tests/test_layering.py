"""The serve side (`runtime`) imports nothing from the build side (`engine_builder`, `calibration`): an engine
directory carries everything serving needs. Checked on the real import graph (grimp), function-level imports
included."""

import grimp
import pytest

SERVE = "runtime"
BUILD = ("engine_builder", "calibration")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(SERVE, *BUILD)


@pytest.mark.parametrize("build_package", BUILD)
def test_serving_imports_nothing_from_the_build_side(graph: grimp.ImportGraph, build_package: str) -> None:
    chains = graph.find_shortest_chains(importer=SERVE, imported=build_package, as_packages=True)
    assert not chains, f"{SERVE} reaches {build_package} through: {sorted(chains)}"


def test_the_graph_sees_the_build_side_using_serving_code(graph: grimp.ImportGraph) -> None:
    """The check above can fail: the build side's own imports of `runtime` are in the same graph."""
    assert graph.find_shortest_chains(importer="engine_builder", imported=SERVE, as_packages=True)
