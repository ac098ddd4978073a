"""The HTTP API in-process: real app, real SQLite, real readiness probes; fake runner."""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from lovd.errors import LovdError
from lovd.web.app import load_openapi
from tests.unit.conftest import Api
from tests.waiting import until

PROBLEM = "application/problem+json"
BAD_IDS = ["..%2fx", "%2e%2e%2f", "a" * 300, "abc%0d%0adef", "abc%00def", "ABCDEF0123456789"]


def schema_validator(ref: str) -> jsonschema.Draft202012Validator:
    doc = load_openapi()
    registry = Registry().with_resource(
        "urn:openapi",
        Resource.from_contents(
            doc,
            default_specification=jsonschema.Draft202012Validator.META_SCHEMA
            and __import__("referencing.jsonschema").jsonschema.DRAFT202012,
        ),
    )
    return jsonschema.Draft202012Validator({"$ref": f"urn:openapi{ref}"}, registry=registry)


def check_schema(ref: str, body: Any) -> None:
    schema_validator(ref).validate(body)


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    body: dict[str, Any] = await resp.json(content_type=PROBLEM)
    check_schema("#/components/schemas/Problem", body)
    assert body["status"] == status and body["detail"]
    return body


async def test_create_get_list_delete(api: Api) -> None:
    r = await api.client.post("/api/sessions")
    assert r.status == 201
    s = await r.json()
    check_schema("#/components/schemas/NewSession", s)
    secret = api.runner.secrets[s["id"]].decode()
    assert f"LOVD_SESSION_ID={s['id']}\n" in secret and "OPENCODE_SERVER_PASSWORD=" in secret
    assert s["token"] not in secret
    assert s["status"] == "running" and len(s["token"]) >= 43
    assert s["url"].startswith(f"https://chat.example/c/{s['id']}?token=")
    assert r.headers["Location"] == f"/api/sessions/{s['id']}"

    r = await api.client.get(f"/api/sessions/{s['id']}")
    got = await r.json()
    check_schema("#/components/schemas/Session", got)
    assert "token" not in got and "token_hash" not in json.dumps(got)

    r = await api.client.get("/api/sessions")
    listed = await r.json()
    assert [x["id"] for x in listed["sessions"]] == [s["id"]]

    r = await api.client.get(f"/api/sessions/{s['id']}?history=1")
    kinds = [e["kind"] for e in (await r.json())["events"]]
    assert "created" in kinds and "status:running" in kinds

    r = await api.client.delete(f"/api/sessions/{s['id']}")
    assert r.status == 204
    assert api.runner.servers == {} and api.runner.secrets == {}
    await problem(await api.client.get(f"/api/sessions/{s['id']}"), 404)
    await problem(await api.client.delete(f"/api/sessions/{s['id']}"), 404)


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_ids_are_refused_and_create_nothing(api: Api, bad: str) -> None:
    for method in ("GET", "DELETE"):
        r = await api.client.request(method, f"/api/sessions/{bad}")
        assert r.status in (400, 404)
        await problem(r, r.status)
    r = await api.client.get(f"/c/{bad}?token=x")
    assert r.status in (400, 404)
    assert api.store.all() == [] and api.runner.starts == []


async def test_bad_bodies(api: Api) -> None:
    body = await problem(
        await api.client.post(
            "/api/sessions", data=b"{not json", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    assert body["code"] == "invalid-json"
    await problem(await api.client.post("/api/sessions", json=[1, 2]), 400)
    body = await problem(await api.client.post("/api/sessions", json={"image": "evil"}), 400)
    assert "image" in body["detail"]
    await problem(await api.client.post("/api/sessions", json={"wait": "maybe"}), 400)
    body = await problem(await api.client.post("/api/sessions", data=b"x" * 70000), 413)
    assert body["code"] == "body-too-large"
    assert api.store.all() == [] and api.runner.starts == []


async def test_unknown_route_and_method_are_problems(api: Api) -> None:
    await problem(await api.client.get("/api/nope"), 404)
    await problem(await api.client.put("/api/sessions"), 405)


async def test_admission_limit_429_with_retry_after(api: Api) -> None:
    for _ in range(3):
        assert (await api.client.post("/api/sessions")).status == 201
    r = await api.client.post("/api/sessions")
    body = await problem(r, 429)
    assert body["code"] == "too-many-sessions" and body["limit"] == 3
    assert int(r.headers["Retry-After"]) >= 1
    assert "try again in" in body["detail"]
    assert len(api.store.all()) == 3


async def test_image_missing_is_a_clear_503_and_session_failed(api: Api) -> None:
    api.runner.image_missing = True
    body = await problem(await api.client.post("/api/sessions"), 503)
    assert "lovd image build" in body["detail"]
    [s] = api.store.all()
    assert s.status == "failed" and "image" in s.reason


async def test_never_ready_times_out_and_cleans_up(api: Api) -> None:
    api.runner.never_ready = True
    t0 = time.monotonic()
    body = await problem(await api.client.post("/api/sessions"), 504)
    assert body["code"] == "start-timeout" and 2.5 < time.monotonic() - t0 < 6
    assert api.runner.servers == {}
    assert api.store.all()[0].status == "failed"


async def test_no_wait_returns_starting(api: Api) -> None:
    api.runner.start_delay = 0.3
    r = await api.client.post("/api/sessions", json={"wait": False})
    s = await r.json()
    assert r.status == 201 and s["status"] in ("creating", "starting")
    await until(
        lambda: api.store.get(s["id"]).status == "running",
        2.5,  # type: ignore[union-attr]
        "the session running",
    )


async def test_cleanup_removes_expired_and_stops_idle(api: Api) -> None:
    a = await (await api.client.post("/api/sessions")).json()
    b = await (await api.client.post("/api/sessions")).json()
    await api.store.update(a["id"], expires_at=time.time() - 1)
    await api.store.update(b["id"], last_activity=time.time() - 7200)
    r = await api.client.post("/api/cleanup")
    assert (await r.json()) == {
        "removed": [a["id"]],
        "deleted": [{"id": a["id"], "reason": "expired (session_ttl)"}],
    }
    assert api.store.get(a["id"]) is None
    assert api.store.get(b["id"]).status == "idle-stopped"  # type: ignore[union-attr]
    # A stopped session wakes with the same id and port.
    woken = await api.sessions.wake(b["id"])
    assert woken.status == "running" and woken.port == b["port"]


async def test_browser_entry_sets_cookie(api: Api) -> None:
    s = await (await api.client.post("/api/sessions")).json()
    assert s["url"].endswith(f"/c/{s['id']}?token={s['token']}")
    r = await api.client.get(f"/c/{s['id']}?token={s['token']}", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    # The API's token is the link's, never the cookie secret the browser got for it.
    assert s["token"] not in cookie
    await problem(await api.client.get(f"/c/{s['id']}?token=wrong", allow_redirects=False), 401)
    # Single-use: the same link again (another browser) is refused; the operator makes
    # a new one.
    api.client.session.cookie_jar.clear()
    used = await api.client.get(f"/c/{s['id']}?token={s['token']}", allow_redirects=False)
    assert (await problem(used, 410))["code"] == "link-used"
    r = await api.client.post(f"/api/sessions/{s['id']}/link")
    fresh = await r.json()
    assert r.status == 201 and fresh["id"] == s["id"] and fresh["token"] != s["token"]
    assert fresh["url"] == f"https://chat.example/c/{s['id']}?token={fresh['token']}"
    r = await api.client.get(f"/c/{s['id']}?token={fresh['token']}", allow_redirects=False)
    assert r.status == 303 and r.headers["Set-Cookie"]
    await problem(await api.client.post("/api/sessions/0123456789abcdef/link"), 404)


async def test_health_openapi_metrics(api: Api) -> None:
    r = await api.client.get("/api/health")
    check_schema("#/components/schemas/Health", await r.json())
    doc = await (await api.client.get("/api/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    paths = {
        "/api/sessions",
        "/api/sessions/{id}",
        "/api/sessions/{id}/stop",
        "/api/cleanup",
        "/api/health",
        "/api/openapi.json",
        "/metrics",
        "/c/{id}",
    }
    assert paths <= set(doc["paths"])
    await api.client.post("/api/sessions")
    text = await (await api.client.get("/metrics")).text()
    assert 'lovd_sessions{state="running"} 1.0' in text
    assert "lovd_sessions_created_total 1.0" in text
    assert "lovd_http_requests_total" in text


async def test_runner_failure_is_502_with_message(api: Api) -> None:
    api.runner.fail_start = LovdError("runner-failed", "podman run failed (exit 125): boom")
    body = await problem(await api.client.post("/api/sessions"), 502)
    assert "boom" in body["detail"]


@pytest.mark.parametrize("active", ["activating", "deactivating", "reloading", "active"])
async def test_reconcile_leaves_units_systemd_is_handling(api: Api, active: str) -> None:
    from lovd.runner import UnitState

    s = await (await api.client.post("/api/sessions")).json()
    await api.runner.stop(s["id"])  # the container died; systemd is mid-restart
    api.runner.name = "systemd"
    api.runner.units = {s["id"]: UnitState(active, "stop-post", "success", 1)}
    await api.sessions.reconcile()
    got = api.store.get(s["id"])
    assert got is not None and got.status == "running"
    api.runner.units = {s["id"]: UnitState("failed", "failed", "start-limit-hit", 4)}
    await api.sessions.reconcile()
    got = api.store.get(s["id"])
    assert got is not None and got.status == "failed" and "gave up after 3 restarts" in got.reason


async def test_nothing_a_user_may_come_back_to_is_deleted_before_delete_after(
    api: Api,
) -> None:
    """A stopped or failed session keeps its row and workspace through any number of
    cleanup passes, wakes on request, and is deleted only after delete_after."""
    kept = []
    for status, reason in (
        ("stopped", "container stopped unexpectedly"),
        ("failed", "unit failed (exit-code); gave up after 3 restarts"),
    ):
        s = await (await api.client.post("/api/sessions")).json()
        await api.sessions.stop(s["id"], status, reason)
        kept.append(s["id"])
    for _ in range(5):
        assert (await (await api.client.post("/api/cleanup")).json())["removed"] == []
    for sid in kept:
        assert api.store.get(sid) is not None
        assert (api.config.sessions_path / sid).is_dir()
    woken = await api.sessions.wake(kept[1])  # a failed one wakes like a stopped one
    assert woken.status == "running"
    await api.sessions.stop(kept[1], "failed", "again")
    day = api.config.delete_after
    for sid in kept:
        await api.store.update(sid, updated_at=time.time() - day - 1)
    body = await (await api.client.post("/api/cleanup")).json()
    assert sorted(body["removed"]) == sorted(kept)
    assert {d["reason"] for d in body["deleted"]} == {
        "stopped for longer than delete_after",
        "failed for longer than delete_after",
    }
