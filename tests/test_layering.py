"""The package layers of `engine_builder`, checked on the real import graph (grimp, function-level imports
included):

    cli, stages      the one place both stages meet (`run` = build, then serve)
    build  |  serve  the two stages: neither imports the other (build.calibration quantizes for the build)
    engine           the torch engine: serving runs it, calibration runs its models
    common           the engine-directory format, options, seam types, the TensorRT-LLM spec and adapter

A lower layer imports nothing from a higher one; the serve side needs nothing from the build side because an engine
directory carries everything serving reads, and the build side writes that format without serving code.
"""

import grimp
import pytest

PACKAGE = "engine_builder"
TOP = ("engine_builder.cli", "engine_builder.stages")
BUILD = ("engine_builder.build",)
SERVE = ("engine_builder.serve",)
ENGINE = "engine_builder.engine"
COMMON = "engine_builder.common"

FORBIDDEN = (
    [(serve, build) for serve in SERVE for build in BUILD]
    + [(build, serve) for build in BUILD for serve in SERVE]
    # calibration is a step the build runs, not a caller of it (its errors come from build.errors)
    + [("engine_builder.build.calibration", "engine_builder.build.build_stage")]
    + [(ENGINE, other) for other in (*TOP, *BUILD, *SERVE)]
    + [(COMMON, other) for other in (*TOP, *BUILD, *SERVE, ENGINE)]
    + [(module, top) for module in (*BUILD, *SERVE) for top in TOP]
)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE)


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_no_import_across_the_layers(graph: grimp.ImportGraph, importer: str, imported: str) -> None:
    chains = graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
    assert not chains, f"{importer} reaches {imported} through: {sorted(chains)}"


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("engine_builder.stages", "engine_builder.serve"),
        ("engine_builder.stages", "engine_builder.build"),
        ("engine_builder.build.calibration", ENGINE),
        ("engine_builder.build.build_stage", "engine_builder.build.calibration"),
        ("engine_builder.serve", ENGINE),
        ("engine_builder.build", COMMON),
        ("engine_builder.serve", COMMON),
    ],
)
def test_the_graph_sees_the_allowed_imports(graph: grimp.ImportGraph, importer: str, imported: str) -> None:
    """The checks above can fail: the imports the layers are allowed are in the same graph."""
    assert graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)


def test_every_subpackage_has_a_layer(graph: grimp.ImportGraph) -> None:
    layered = {*TOP, *BUILD, *SERVE, ENGINE, COMMON}
    children = {module for module in graph.find_children(PACKAGE)}
    assert children == layered, f"not in a layer: {sorted(children - layered)}"
