"""Session limits fail closed (lovd/limits.py): what a host can enforce, read from a
stand-in cgroup tree; the podman argv carries only the limits that hold (and always the
nproc rlimit); a start where one would not hold is a 503 that names it, unless
limits.enforce is false; doctor says how each limit is enforced.

The real host (cgroup v1/hybrid here) and real Podman: tests/integration/test_limits.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lovd import config, limits
from lovd.doctor import limits_check, render
from lovd.errors import LovdError
from lovd.podman import ContainerSpec, run_argv
from tests.unit.conftest import open_api

UID = 4242
ALL = frozenset(limits.CONTROLLERS)


def cgroup_tree(root: Path, *, unified: bool, delegated: str | None) -> Path:
    root.mkdir()
    if unified:
        (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    if delegated is not None:
        f = limits.user_controllers_file(UID, root)
        f.parent.mkdir(parents=True)
        f.write_text(delegated + "\n")
    return root


@pytest.mark.parametrize(
    ("unified", "delegated", "expect"),
    [
        (False, None, frozenset()),  # cgroup v1 / hybrid (this kind of host)
        (False, "memory pids cpu", frozenset()),  # a v2 mount beside v1 does not count
        (True, None, frozenset()),  # v2, but no user manager for lovd
        (True, "", frozenset()),  # v2, nothing delegated
        (True, "memory pids", frozenset({"memory", "pids"})),  # systemd's default Delegate=
        (True, "cpuset cpu io memory pids", ALL),
    ],
)
def test_detect_reads_the_user_managers_controllers(
    tmp_path: Path, unified: bool, delegated: str | None, expect: frozenset[str]
) -> None:
    root = cgroup_tree(tmp_path / "cg", unified=unified, delegated=delegated)
    e = limits.detect("auto", uid=UID, root=root)
    assert e.cgroup == expect
    assert e.unified == unified


def test_pids_is_held_by_the_rlimit_only_where_each_container_has_its_own_uids() -> None:
    none = frozenset[str]()
    assert limits.Enforcement(none, "auto").missing == ["memory", "cpu"]
    # keep-id or host: the container's uid is the lovd user's, whose process count is
    # every session's and lovd's own.
    assert limits.Enforcement(none, "keep-id").missing == ["memory", "cpu", "pids"]
    assert limits.Enforcement(frozenset({"pids"}), "keep-id").missing == ["memory", "cpu"]
    assert limits.Enforcement(ALL, "host").missing == []


def spec(cgroup: frozenset[str]) -> ContainerSpec:
    return ContainerSpec(
        session_id="0123456789abcdef",
        instance_id="i",
        image="img",
        host_port=30000,
        container_port=4096,
        workspace=Path("/w"),
        memory_max="3G",
        cpus=1.5,
        tasks_max=77,
        cgroup_limits=cgroup,
    )


def test_argv_names_only_the_limits_that_hold_and_always_the_nproc_rlimit() -> None:
    argv = run_argv("podman", spec(frozenset()))
    assert "--ulimit" in argv and argv[argv.index("--ulimit") + 1] == "nproc=77:77"
    for flag in ("--memory", "--cpus", "--pids-limit"):
        assert flag not in argv  # podman would drop them silently: inspect would show 0
    argv = run_argv("podman", spec(ALL))
    assert argv[argv.index("--memory") + 1] == "3G"
    assert argv[argv.index("--cpus") + 1] == "1.5"
    assert argv[argv.index("--pids-limit") + 1] == "77"
    assert argv[argv.index("--ulimit") + 1] == "nproc=77:77"
    only_mem = run_argv("podman", spec(frozenset({"memory"})))
    assert "--memory" in only_mem and "--cpus" not in only_mem


def test_check_refuses_with_the_missing_controller_and_the_fix() -> None:
    cfg = config.from_mapping({})
    assert cfg.limits_enforce is True  # fail closed by default
    e = limits.Enforcement(frozenset({"pids"}), "auto", unified=True, source=Path("/x/c"))
    with pytest.raises(LovdError) as err:
        limits.check(cfg, e)
    assert err.value.status == 503
    msg = err.value.message
    assert "memory (limits.memory)" in msg and "cpu (limits.cpus)" in msg
    assert "pids" not in msg.split("would not apply")[0]
    assert "Delegate=cpu cpuset io memory pids" in msg and "limits.enforce: false" in msg
    assert err.value.extra == {"missing_limits": ["memory", "cpu"]}
    limits.check(config.from_mapping({"limits": {"enforce": False}}), e)  # opted out
    limits.check(cfg, limits.Enforcement(ALL, "auto"))  # all enforced


async def test_a_start_is_refused_with_503_where_limits_cannot_hold(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports) as a:
        a.runner.cgroup_limits = frozenset()
        r = await a.client.post("/api/sessions")
        assert r.status == 503
        assert r.content_type == "application/problem+json"
        body = await r.json()
        assert "memory (limits.memory)" in body["detail"], body
        assert "limits.enforce: false" in body["detail"], body
        assert a.runner.starts == []  # no container was started
        assert a.store.all() == []  # and no row: nothing changed
        a.runner.cgroup_limits = frozenset(limits.CONTROLLERS)
        r = await a.client.post("/api/sessions")
        assert r.status == 201, await r.text()
        assert a.runner.starts[-1].cgroup_limits == ALL


async def test_limits_enforce_false_starts_without_them(
    tmp_path: Path, free_ports: list[int]
) -> None:
    async with open_api(tmp_path, free_ports, limits={"enforce": False}) as a:
        a.runner.cgroup_limits = frozenset()
        r = await a.client.post("/api/sessions")
        assert r.status == 201, await r.text()
        assert a.runner.starts[-1].cgroup_limits == frozenset()


def test_doctor_says_how_each_limit_is_enforced() -> None:
    cfg = config.from_mapping({"limits": {"memory": "2G", "cpus": 0.5, "tasks": 64}})
    v1 = limits.Enforcement(frozenset(), "auto", unified=False)
    c = limits_check(cfg, {"cgroupVersion": "v1", "cgroupManager": "cgroupfs"}, v1)
    assert c.status == "fail"
    assert "memory 2G: NOT enforced" in c.detail
    assert "cpu 0.5: NOT enforced" in c.detail
    assert "tasks 64: enforced by rlimit (nproc) only" in c.detail
    assert "Sessions are refused (503" in c.detail and "cgroup v1/hybrid" in c.detail
    assert "podman: cgroup v1, cgroupfs manager" in c.detail
    assert "Delegate=cpu cpuset io memory pids" in c.fix
    text = render([c])
    assert "[FAIL] limits" in text and "fix: boot with systemd.unified_cgroup_hierarchy=1" in text

    off = config.from_mapping({"limits": {"enforce": False}})
    c = limits_check(off, {}, v1)
    assert c.status == "warn"
    assert "limits.enforce: false: sessions start without memory, cpu limits" in c.detail
    assert "limits.enforce" not in c.fix  # the fix is the host, not the opt-out

    c = limits_check(cfg, {}, limits.Enforcement(ALL, "auto"))
    assert c.status == "ok"
    assert c.detail == (
        "memory 2G: enforced by cgroup; cpu 0.5: enforced by cgroup; "
        "tasks 64: enforced by cgroup and by rlimit (nproc)"
    )
    shared = limits_check(cfg, {}, limits.Enforcement(frozenset({"memory", "cpu"}), "keep-id"))
    assert shared.status == "fail" and "tasks 64: NOT enforced" in shared.detail


def test_podman_cgroup_manager_follows_containers_conf(tmp_path: Path) -> None:
    home = tmp_path / "home"
    user = home / ".config" / "containers"
    user.mkdir(parents=True)
    env = {"HOME": str(home)}
    (user / "containers.conf").write_text('[engine]\ncgroup_manager = "cgroupfs"\n')
    assert limits.podman_cgroup_manager(env=env) == "cgroupfs"
    (user / "containers.conf.d").mkdir()
    (user / "containers.conf.d" / "z.conf").write_text('[engine]\ncgroup_manager = "systemd"\n')
    assert limits.podman_cgroup_manager(env=env) == "systemd"  # drop-ins come later
    only = tmp_path / "only.conf"
    only.write_text('[engine]\ncgroup_manager = "cgroupfs"\n')
    assert limits.podman_cgroup_manager(env={**env, "CONTAINERS_CONF": str(only)}) == "cgroupfs"


def test_the_direct_runner_gets_cgroup_limits_only_through_systemds_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = cgroup_tree(tmp_path / "cg", unified=True, delegated="cpu memory pids")
    delegated = limits.detect("auto", uid=UID, root=root)
    monkeypatch.setattr(limits, "detect", lambda userns: delegated)
    assert limits.for_runner("systemd", "auto").cgroup == ALL  # the unit's own limits
    assert limits.for_runner("podman", "auto", cgroup_manager="systemd").cgroup == ALL
    e = limits.for_runner("podman", "auto", cgroup_manager="cgroupfs")
    assert e.cgroup == frozenset() and e.missing == ["memory", "cpu"]
    assert "cgroup_manager is 'cgroupfs'" in e.why()
