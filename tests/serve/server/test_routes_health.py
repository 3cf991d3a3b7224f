"""Liveness and readiness answers through the engine's life: loading, ready, draining, and an engine that stopped."""

from fastapi.testclient import TestClient

from engine_builder.serve.server.app import create_app
from engine_builder.serve.server.state import ServerSettings, ServerState
from tests.serve.server.harness import StubEngine


class _StoppedEngine(StubEngine):
    """An engine whose loop has stopped (a crash, a lost tensor-parallel rank): it answers, but runs nothing."""

    def is_healthy(self) -> bool:
        return False

    def failure(self) -> str | None:
        return "TensorParallelError: engine-tp-rank1 exited with code -9\nTraceback (most recent call last): ..."


def _probe(engine: StubEngine, ready: bool, draining: bool = False) -> tuple[dict, dict]:
    state = ServerState(settings=ServerSettings("m"), engine=engine, renderer=None)
    state.ready, state.draining = ready, draining
    client = TestClient(create_app(state))
    health, readiness = client.get("/health"), client.get("/ready")
    return {"status_code": health.status_code, **health.json()}, {"status_code": readiness.status_code, **readiness.json()}


def test_a_stopped_engine_is_not_ready_for_good_not_loading() -> None:
    health, readiness = _probe(_StoppedEngine(), ready=True)
    assert health["status_code"] == 503 and "engine loop stopped" in health["error"]
    assert readiness["status_code"] == 503
    assert "engine loop stopped" in readiness["reason"] and "restart" in readiness["reason"]
    # the engine's own first line of why, so an operator reading the probe need not find the log
    assert "engine-tp-rank1 exited with code -9" in readiness["reason"] and "Traceback" not in readiness["reason"]
    assert health["error"] == readiness["reason"]


def test_a_long_cause_is_cut_short() -> None:
    class Verbose(_StoppedEngine):
        def failure(self) -> str | None:
            return "RuntimeError: " + "x" * 5000

    reason = _probe(Verbose(), ready=True)[1]["reason"]
    assert len(reason) < 400 and "..." in reason


def test_readiness_reasons_while_loading_ready_and_draining() -> None:
    assert _probe(StubEngine(), ready=False)[1] == {"status_code": 503, "status": "not ready", "reason": "loading"}
    assert _probe(StubEngine(), ready=True)[1] == {"status_code": 200, "status": "ready"}
    assert _probe(StubEngine(), ready=True, draining=True)[1]["reason"] == "draining"
    assert _probe(_StoppedEngine(), ready=True, draining=True)[1]["reason"] == "draining"


def test_a_served_name_with_a_slash_is_found() -> None:
    """Probe Y: `HuggingFaceTB/SmolLM2-135M-Instruct` was listed by /v1/models but its lookup was a bare 404."""
    state = ServerState(settings=ServerSettings("HuggingFaceTB/SmolLM2-135M-Instruct"), engine=StubEngine(), renderer=None)
    state.ready = True
    client = TestClient(create_app(state))
    found = client.get("/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct")
    assert found.status_code == 200 and found.json()["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    missing = client.get("/v1/models/HuggingFaceTB/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def _ready_client() -> TestClient:
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    state.ready = True
    return TestClient(create_app(state))


def test_every_get_route_answers_head_without_a_body() -> None:
    """Probe T: HEAD on /v1/models and /version was a 405 (FastAPI's GET routes do not answer HEAD; Starlette's do)."""
    client = _ready_client()
    for path in ("/health", "/ready", "/metrics", "/version", "/v1/models", "/v1/models/m"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path
    assert "head" not in client.get("/openapi.json").json()["paths"]["/v1/models"]


def test_a_405_allows_every_method_the_path_answers() -> None:
    """Probe T: the Allow of a path served by several routes named only the first route's methods (`HEAD` on /health)."""
    client = _ready_client()
    cases = {("POST", "/health"): "GET, HEAD", ("DELETE", "/ping"): "GET, HEAD, POST",
             ("PUT", "/v1/responses/r1"): "DELETE, GET, HEAD", ("GET", "/v1/chat/completions"): "POST"}
    for (method, path), allowed in cases.items():
        response = client.request(method, path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, path)
        assert response.json()["error"]["code"]


def test_while_draining_every_answer_closes_its_connection() -> None:
    """Probe AB: the 503 `draining` answers kept the connection alive, so the openai SDK sent all its retries down
    the same socket to the stopping replica; closed, a pooled client reconnects through the load balancer."""
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    state.ready = True
    client = TestClient(create_app(state))
    assert "connection" not in client.get("/health").headers
    state.draining = True
    for response in (client.get("/ready"), client.get("/health"), client.get("/v1/models"), client.get("/nope")):
        assert response.headers["connection"] == "close", response.request.url
    assert client.get("/ready").status_code == 503


def test_after_a_drain_that_ran_out_the_engine_is_stopped_without_a_second_wait() -> None:
    """Probe AR: an answer stuck on a client that stopped reading kept its stream open after uvicorn cancelled the
    handler; the engine's shutdown then waited the whole drain timeout again (a 10 s drain took 32 s to exit)."""
    waited: list[float] = []

    class Recording(StubEngine):
        async def shutdown(self, timeout_s: float) -> None:
            waited.append(timeout_s)

    for expired in (False, True):
        state = ServerState(settings=ServerSettings("m", drain_timeout_s=10), engine=Recording(), renderer=None)
        with TestClient(create_app(state)):
            state.drain_expired = expired
    assert waited == [10, 0.0]


def test_the_drains_own_log_lines_name_no_request() -> None:
    """Probe AR: a SIGTERM landing while a request was served logged `draining ... [request bulk-2]`."""
    import signal

    import uvicorn

    from engine_builder.common.request_context import CURRENT_REQUEST_ID
    from engine_builder.serve.server.main import DrainingServer

    seen: list[str | None] = []
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    state.ready = True
    server = DrainingServer(uvicorn.Config(create_app(state)), state)
    server.started = True
    token = CURRENT_REQUEST_ID.set("bulk-2")  # the request whose coroutine the signal interrupted
    try:
        original = DrainingServer._handle_exit

        def recording(self: DrainingServer, sig: int, frame: object) -> None:
            seen.append(CURRENT_REQUEST_ID.get())
            original(self, sig, frame)

        DrainingServer._handle_exit = recording  # type: ignore[method-assign]
        server.handle_exit(signal.SIGTERM, None)
    finally:
        DrainingServer._handle_exit = original  # type: ignore[method-assign]
        CURRENT_REQUEST_ID.reset(token)
    assert seen == [None] and state.draining


def test_a_404_from_a_base_url_without_v1_says_so() -> None:
    """An OpenAI client with base_url `http://host:port` (no /v1), or one holding the route, got a bare "Not
    Found" (probe BF #5)."""
    from starlette.testclient import TestClient

    from engine_builder.serve.server.app import create_app
    from engine_builder.serve.server.state import ServerSettings, ServerState
    from tests.serve.server.harness import StubEngine

    with TestClient(create_app(ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None))) as client:
        missing = client.post("/chat/completions", json={})
        assert missing.status_code == 404
        assert "end the client's base_url with /v1" in missing.json()["error"]["message"]
        doubled = client.post("/v1/chat/completions/chat/completions", json={})
        assert "did you mean /v1/chat/completions?" in doubled.json()["error"]["message"]
        other = client.get("/nothing/here")
        assert other.status_code == 404 and other.json()["error"]["message"] == "Not Found"


def test_the_model_list_agrees_with_readiness() -> None:
    """Probe CC #5: /v1/models listed the model while the engine was dead and while the server drained, where /ready
    and /v1/models/{name} answered 503: a router probing the list kept sending traffic to that replica."""

    def answers(engine: StubEngine, draining: bool = False, ready: bool = True) -> dict[str, int]:
        state = ServerState(settings=ServerSettings("m"), engine=engine, renderer=None)
        state.ready, state.draining = ready, draining
        client = TestClient(create_app(state))
        return {path: client.get(path).status_code for path in ("/ready", "/v1/models", "/v1/models/m")}

    assert answers(StubEngine()) == {"/ready": 200, "/v1/models": 200, "/v1/models/m": 200}
    for case in (answers(_StoppedEngine()), answers(StubEngine(), draining=True), answers(StubEngine(), ready=False)):
        assert case == {"/ready": 503, "/v1/models": 503, "/v1/models/m": 503}
    state = ServerState(settings=ServerSettings("m"), engine=_StoppedEngine(), renderer=None)
    state.ready = True
    error = TestClient(create_app(state)).get("/v1/models").json()["error"]
    assert error["code"] == "not_ready" and "engine-tp-rank1 exited with code -9" in error["message"]
    assert state.metrics.render().decode().count("request_errors_total{") == 0  # a probe's answer, not a failure


def test_a_user_models_is_healthy_is_asked_by_the_model_list_too() -> None:
    state = ServerState(settings=ServerSettings("m"), engine=StubEngine(), renderer=None)
    state.ready = True

    async def unhealthy() -> bool:
        return False

    state.user_health = unhealthy
    client = TestClient(create_app(state))
    assert client.get("/v1/models").status_code == 503 and client.get("/ready").status_code == 503
