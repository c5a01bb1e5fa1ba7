"""tunnel.daemon.client.dns: pushed DNS applied while connected, the host restored exactly.

The file backend runs on a temporary path (regular file, symlink, absent, a real bind mount);
systemd-resolved is a stand-in (tests/support/fake_resolved.py) on a private dbus-daemon;
resolvconf is a script on PATH that records how it was called. Crashes are simulated by
dropping the configurator without restore and recovering with a fresh StateFile object.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.dbus import PrivateBus, private_system_bus
from tunnel.core.resolvconf import HEADER
from tunnel.daemon.client import dns as dns_module
from tunnel.daemon.client.dns import DnsConfigurator, DnsSettings, recover
from tunnel.daemon.statefile import StateFile
from tunnel.errors import SystemSetupError

WAIT_S = 10
ORIGINAL = b"# from DHCP\nnameserver 192.168.1.1\nsearch lan\noptions edns0 trust-ad\n"
CORP = DnsSettings(
    servers=(ip_address("10.8.0.1"), ip_address("fd00::53")), search=("corp.example", "example.com")
)
OTHER = DnsSettings(servers=(ip_address("10.9.0.1"),), search=(), route_all=False)

needs_dbus = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None and not os.environ.get("CI"),
    reason="needs dbus-daemon (Debian: apt install dbus-daemon); under CI this fails instead",
)


@pytest.fixture
def state(tmp_path: Path) -> StateFile:
    return StateFile(tmp_path / "state" / "client.json")


@pytest.fixture
def resolv(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc" / "resolv.conf"


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    with private_system_bus() as private:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private.address)
        yield private


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds nothing, so no resolvconf is found."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    return directory


@pytest.fixture
def no_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")


FAKE_RESOLVCONF = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).resolve().parent
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}) + "\\n")
fail = here / "fail"
if fail.exists():
    print("resolvconf: something is wrong", file=sys.stderr)
    sys.exit(int(fail.read_text()))
"""


class FakeResolvconf:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        script = directory / "resolvconf"
        script.write_text(FAKE_RESOLVCONF.format(python=sys.executable))
        script.chmod(0o755)

    def calls(self) -> list[dict[str, Any]]:
        log = self.directory / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]

    def fail_with(self, code: int) -> None:
        (self.directory / "fail").write_text(str(code))


@pytest.fixture
def resolvconf(empty_path: Path, no_bus: None) -> FakeResolvconf:
    return FakeResolvconf(empty_path)


def file_configurator(state: StateFile, resolv: Path) -> DnsConfigurator:
    return DnsConfigurator(state, resolv_conf=resolv, backend="file")


def apply_now(
    dns: DnsConfigurator, settings: DnsSettings, ifname: str = "tun0", ifindex: int = 5
) -> None:
    """One apply in a trio run of its own: the file tests are synchronous, like the file
    backend's work and like restore() and recover()."""

    async def run() -> None:
        with trio.fail_after(WAIT_S):
            await dns.apply(ifname, ifindex, settings)

    trio.run(run)


def links(bus: PrivateBus) -> dict[str, Any]:
    assert bus.record is not None
    result: dict[str, Any] = json.loads(bus.record.read_text())
    return result


# -- the file backend ---------------------------------------------------------------------


def test_file_apply_writes_servers_search_and_the_original_options(
    state: StateFile, resolv: Path
) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    assert resolv.read_bytes() == HEADER + (
        b"\nnameserver 10.8.0.1\nnameserver fd00::53\nsearch corp.example example.com\n"
        b"options edns0 trust-ad\n"
    )
    assert dns.backend == "file"
    record = state.get("dns")
    assert record["backend"] == "file" and record["path"] == str(resolv)
    dns.restore()
    assert resolv.read_bytes() == ORIGINAL
    assert dns.backend is None
    assert not state.path.exists()  # its last key dropped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=st.binary(max_size=3000), mode=st.sampled_from([0o644, 0o600, 0o640, 0o664]))
def test_file_restore_gives_back_the_exact_bytes_and_mode(original: bytes, mode: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tnl-dns-") as directory:
        resolv = Path(directory) / "resolv.conf"
        resolv.write_bytes(original)
        resolv.chmod(mode)
        inode = resolv.stat().st_ino
        dns = file_configurator(StateFile(Path(directory) / "state.json"), resolv)
        apply_now(dns, CORP)
        assert resolv.read_bytes().startswith(HEADER)
        assert stat.S_IMODE(resolv.stat().st_mode) == mode
        dns.restore()
        assert resolv.read_bytes() == original
        assert stat.S_IMODE(resolv.stat().st_mode) == mode
        assert resolv.stat().st_ino == inode  # rewritten in place, never replaced


def test_file_symlink_is_put_back_as_the_symlink(state: StateFile, resolv: Path) -> None:
    stub = resolv.parent / "stub-resolv.conf"
    stub.write_bytes(b"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n")
    resolv.symlink_to("stub-resolv.conf")
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    assert not resolv.is_symlink()
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o644
    assert resolv.read_bytes().endswith(
        b"search corp.example example.com\noptions edns0 trust-ad\n"
    )
    assert stub.read_bytes().startswith(b"nameserver 127.0.0.53\n")  # the target untouched
    assert state.get("dns")["symlink"] == "stub-resolv.conf"
    dns.restore()
    assert resolv.is_symlink()
    assert os.readlink(resolv) == "stub-resolv.conf"  # the link text itself, still relative
    assert sorted(p.name for p in resolv.parent.iterdir()) == ["resolv.conf", "stub-resolv.conf"]


def test_file_dangling_symlink(state: StateFile, resolv: Path) -> None:
    resolv.symlink_to("../run/resolvconf/resolv.conf")
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    assert resolv.read_bytes().startswith(HEADER)
    dns.restore()
    assert os.readlink(resolv) == "../run/resolvconf/resolv.conf"


def test_file_absent_is_created_and_removed(state: StateFile, resolv: Path) -> None:
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    assert b"nameserver 10.8.0.1\n" in resolv.read_bytes()
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o644
    assert state.get("dns") == {
        "backend": "file",
        "path": str(resolv),
        "absent": True,
        "written": state.get("dns")["written"],
    }
    dns.restore()
    assert not resolv.exists()
    assert list(resolv.parent.iterdir()) == []


def test_file_apply_again_with_other_settings_then_restore(state: StateFile, resolv: Path) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    apply_now(dns, CORP)  # the same: nothing to do
    apply_now(dns, OTHER)
    assert resolv.read_bytes() == HEADER + b"\nnameserver 10.9.0.1\noptions edns0 trust-ad\n"
    dns.restore()
    assert resolv.read_bytes() == ORIGINAL


def test_file_recover_after_a_crash(state: StateFile, resolv: Path) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    del dns  # killed: no restore
    assert resolv.read_bytes() != ORIGINAL
    fresh = StateFile(state.path)
    assert recover(fresh, resolv_conf=resolv) is True
    assert resolv.read_bytes() == ORIGINAL
    assert fresh.get("dns") is None
    assert recover(fresh, resolv_conf=resolv) is False


def test_file_symlink_recover_after_a_crash(state: StateFile, resolv: Path) -> None:
    resolv.symlink_to("/run/systemd/resolve/stub-resolv.conf")
    apply_now(file_configurator(state, resolv), OTHER)
    assert recover(StateFile(state.path), resolv_conf=resolv) is True
    assert os.readlink(resolv) == "/run/systemd/resolve/stub-resolv.conf"


def test_file_a_new_client_undoes_the_leftover_before_applying(
    state: StateFile, resolv: Path
) -> None:
    resolv.write_bytes(ORIGINAL)
    apply_now(file_configurator(state, resolv), CORP)  # then killed
    dns = file_configurator(StateFile(state.path), resolv)
    apply_now(dns, OTHER)  # without anyone calling recover() first
    dns.restore()
    assert resolv.read_bytes() == ORIGINAL  # not the killed client's file


def test_file_someone_elses_change_is_left_alone(
    state: StateFile, resolv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    theirs = b"# NetworkManager\nnameserver 192.168.7.1\n"
    resolv.write_bytes(theirs)
    with caplog.at_level(logging.WARNING, logger="tunnel.client"):
        dns.restore()
    assert resolv.read_bytes() == theirs
    assert "changed by someone else" in caplog.text
    assert state.get("dns") is None


def test_file_someone_elses_change_becomes_the_original_on_reapply(
    state: StateFile, resolv: Path
) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    theirs = b"nameserver 192.168.7.1\noptions rotate\n"
    apply_now(dns, CORP)
    resolv.write_bytes(theirs)
    apply_now(dns, OTHER)
    assert resolv.read_bytes().endswith(b"nameserver 10.9.0.1\noptions rotate\n")
    dns.restore()
    assert resolv.read_bytes() == theirs


def test_restore_without_apply_and_twice(state: StateFile, resolv: Path) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = DnsConfigurator(state, resolv_conf=resolv)
    dns.restore()
    apply_now(file_configurator(state, resolv), CORP)
    other = file_configurator(state, resolv)
    other.restore()
    other.restore()
    assert resolv.read_bytes() == ORIGINAL
    assert not state.path.exists()


def test_invalid_pushed_settings_change_nothing(state: StateFile, resolv: Path) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    evil = DnsSettings(servers=(ip_address("10.0.0.1"),), search=("ok.example", "x\nnameserver 6"))
    with pytest.raises(SystemSetupError, match="not a domain name"):
        apply_now(dns, evil)
    with pytest.raises(SystemSetupError, match="interface name"):
        apply_now(dns, CORP, "-rf")
    with pytest.raises(SystemSetupError, match="interface index"):
        apply_now(dns, CORP, "tun0", 1 << 31)
    assert resolv.read_bytes() == ORIGINAL
    assert state.get("dns") is None


def test_no_servers_undoes_what_was_applied(state: StateFile, resolv: Path) -> None:
    resolv.write_bytes(ORIGINAL)
    dns = file_configurator(state, resolv)
    apply_now(dns, CORP)
    apply_now(dns, DnsSettings(servers=()))
    assert resolv.read_bytes() == ORIGINAL
    assert dns.backend is None


def test_unknown_backend_is_refused(state: StateFile) -> None:
    with pytest.raises(ValueError, match="unknown DNS backend"):
        DnsConfigurator(state, backend="nsswitch")


_BIND_MOUNT_SCRIPT = """
import json, os, subprocess, sys, trio
from ipaddress import ip_address
from pathlib import Path
from tunnel.daemon.client.dns import DnsConfigurator, DnsSettings
from tunnel.daemon.statefile import StateFile
here = Path(sys.argv[1])
target, source = here / "resolv.conf", here / "netns-resolv.conf"
subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
dns = DnsConfigurator(StateFile(here / "state.json"), resolv_conf=target, backend="file")
trio.run(dns.apply, "tun0", 5, DnsSettings(servers=(ip_address("10.8.0.1"),)))
during = target.read_bytes()
dns.restore()
print(json.dumps({"during": during.decode(), "after": target.read_bytes().decode()}))
"""


def test_file_bind_mounted_resolv_conf(tmp_path: Path) -> None:
    """`ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf, and a rename
    over a mount point fails (EBUSY): in a private mount namespace, a real bind mount."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        reason = "a bind mount needs root and unshare(1)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    (tmp_path / "resolv.conf").write_bytes(b"nameserver 192.0.2.1\n")
    (tmp_path / "netns-resolv.conf").write_bytes(ORIGINAL)
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", _BIND_MOUNT_SCRIPT,
         str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["during"].startswith(HEADER.decode()) and "nameserver 10.8.0.1\n" in seen["during"]
    assert seen["after"] == ORIGINAL.decode()
    assert (tmp_path / "netns-resolv.conf").read_bytes() == ORIGINAL  # written through the mount
    assert (tmp_path / "resolv.conf").read_bytes() == b"nameserver 192.0.2.1\n"


# -- systemd-resolved over D-Bus ----------------------------------------------------------


@needs_dbus
async def test_resolved_apply_and_restore(bus: PrivateBus, state: StateFile) -> None:
    dns = DnsConfigurator(state, backend="resolved")
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
    assert links(bus) == {
        "7": {
            "dns": ["10.8.0.1", "fd00::53"],
            "domains": [["corp.example", False], ["example.com", False], ["~.", True]],
            "default_route": True,
        }
    }
    assert state.get("dns") == {"backend": "resolved", "ifindex": 7, "ifname": "tun0"}
    assert dns.backend == "resolved"
    dns.restore()
    assert links(bus) == {}
    assert state.get("dns") is None


@needs_dbus
async def test_resolved_split_dns_and_reapply(bus: PrivateBus, state: StateFile) -> None:
    dns = DnsConfigurator(state, backend="resolved")
    split = DnsSettings(servers=(ip_address("10.8.0.1"),), search=("corp",), route_all=False)
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
        await dns.apply("tun0", 7, split)
    assert links(bus) == {
        "7": {"dns": ["10.8.0.1"], "domains": [["corp", False]], "default_route": False}
    }
    with trio.fail_after(WAIT_S):
        await dns.apply("tun1", 8, split)  # another link: the first one reverted
    assert list(links(bus)) == ["8"]
    dns.restore()
    assert links(bus) == {}


@needs_dbus
async def test_resolved_refusal_is_one_line_and_changes_nothing(
    bus: PrivateBus, state: StateFile
) -> None:
    dns = DnsConfigurator(state, backend="resolved")
    with trio.fail_after(WAIT_S), pytest.raises(SystemSetupError) as caught:
        await dns.apply("tun0", 0, CORP)  # resolved: "Invalid interface index"
    assert str(caught.value) == (
        "systemd-resolved refused SetLinkDNS for tun0: Invalid interface index"
    )
    assert links(bus) == {}
    assert state.get("dns") is None
    assert dns.backend is None


@needs_dbus
async def test_resolved_cancelled_halfway_leaves_nothing(bus: PrivateBus, state: StateFile) -> None:
    dns = DnsConfigurator(state, backend="resolved")
    with trio.CancelScope() as scope:
        scope.cancel()
        await dns.apply("tun0", 7, CORP)  # cancelled at its first checkpoint, after the record
    assert state.get("dns") is None  # the rollback reverted the link and dropped the record
    assert links(bus) == {}
    assert dns.backend is None


@needs_dbus
async def test_resolved_that_never_answers_is_a_bounded_error(
    state: StateFile, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dns_module, "DBUS_TIMEOUT_S", 0.3)
    with private_system_bus(silent=True) as private:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private.address)
        dns = DnsConfigurator(state, backend="resolved")
        with trio.fail_after(WAIT_S), pytest.raises(SystemSetupError) as caught:
            await dns.apply("tun0", 7, CORP)
        assert str(caught.value) == (
            "systemd-resolved: not reachable over D-Bus: no answer in 0.3 s"
        )
        # the rollback's RevertLink got no answer either, and gave up in time
        assert "cannot revert systemd-resolved's settings for tun0" in caplog.text
        assert state.get("dns") is None


@needs_dbus
async def test_resolved_restore_with_the_bus_gone_logs_and_forgets(
    bus: PrivateBus,
    state: StateFile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = DnsConfigurator(state, backend="resolved")
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/gone")
    with caplog.at_level(logging.WARNING, logger="tunnel.client"):
        dns.restore()  # must not raise
    assert "cannot revert systemd-resolved's settings for tun0" in caplog.text
    assert state.get("dns") is None  # resolved forgets the link with the TUN device


@needs_dbus
async def test_resolved_recover_reverts_a_link_that_still_exists(
    bus: PrivateBus, state: StateFile
) -> None:
    lo = socket.if_nametoindex("lo")
    with trio.fail_after(WAIT_S):
        await DnsConfigurator(state, backend="resolved").apply("lo", lo, CORP)  # then killed
    assert str(lo) in links(bus)
    fresh = StateFile(state.path)
    assert recover(fresh) is True
    assert links(bus) == {}
    assert fresh.get("dns") is None


@needs_dbus
async def test_resolved_recover_leaves_a_gone_link_alone(bus: PrivateBus, state: StateFile) -> None:
    with trio.fail_after(WAIT_S):
        await DnsConfigurator(state, backend="resolved").apply("tnl-gone0", 999_999, OTHER)
    assert recover(StateFile(state.path)) is True
    assert "999999" in links(bus)  # nothing sent: the link is gone, resolved forgot it
    assert state.get("dns") is None


# -- which backend ------------------------------------------------------------------------


@needs_dbus
async def test_detects_resolved_when_it_owns_its_name(
    bus: PrivateBus, state: StateFile, resolv: Path
) -> None:
    dns = DnsConfigurator(state, resolv_conf=resolv)
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
    assert dns.backend == "resolved"
    dns.restore()


@needs_dbus
def test_detects_the_file_on_a_bus_without_resolved_and_no_resolvconf(
    state: StateFile, resolv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolv.write_bytes(ORIGINAL)
    with private_system_bus(resolved=False) as private:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", private.address)
        monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
        dns = DnsConfigurator(state, resolv_conf=resolv)
        apply_now(dns, CORP)
    assert dns.backend == "file"
    assert resolv.read_bytes().startswith(HEADER)
    dns.restore()
    assert resolv.read_bytes() == ORIGINAL


async def test_detects_resolvconf_without_a_bus(
    resolvconf: FakeResolvconf, state: StateFile, resolv: Path
) -> None:
    dns = DnsConfigurator(state, resolv_conf=resolv)
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
    assert dns.backend == "resolvconf"
    dns.restore()


def test_detects_the_file_without_a_bus_or_resolvconf(
    no_bus: None, empty_path: Path, state: StateFile, resolv: Path
) -> None:
    dns = DnsConfigurator(state, resolv_conf=resolv)
    apply_now(dns, CORP)
    assert dns.backend == "file"
    dns.restore()
    assert not resolv.exists()


# -- resolvconf ---------------------------------------------------------------------------


async def test_resolvconf_apply_and_restore(resolvconf: FakeResolvconf, state: StateFile) -> None:
    dns = DnsConfigurator(state, backend="resolvconf")
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
        await dns.apply("tun0", 7, CORP)  # the same again: not run again
    assert resolvconf.calls() == [
        {
            "argv": ["-a", "tun0", "-m", "0", "-x"],
            "stdin": HEADER.decode()
            + "\nnameserver 10.8.0.1\nnameserver fd00::53\nsearch corp.example example.com\n",
        }
    ]
    assert state.get("dns") == {"backend": "resolvconf", "ifname": "tun0"}
    dns.restore()
    assert resolvconf.argvs()[1:] == [["-d", "tun0", "-f"]]
    assert state.get("dns") is None


async def test_resolvconf_another_link_replaces_the_first(
    resolvconf: FakeResolvconf, state: StateFile
) -> None:
    dns = DnsConfigurator(state, backend="resolvconf")
    with trio.fail_after(WAIT_S):
        await dns.apply("tun0", 7, CORP)
        await dns.apply("tun0", 7, OTHER)
        await dns.apply("tun1", 8, OTHER)
    assert resolvconf.argvs() == [
        ["-a", "tun0", "-m", "0", "-x"],
        ["-a", "tun0", "-m", "0"],  # OTHER is split DNS: not exclusive
        ["-d", "tun0", "-f"],
        ["-a", "tun1", "-m", "0"],
    ]
    assert resolvconf.calls()[1]["stdin"].endswith("\nnameserver 10.9.0.1\n")
    dns.restore()
    assert resolvconf.argvs()[-1] == ["-d", "tun1", "-f"]


async def test_resolvconf_failure_is_one_line_and_rolled_back(
    resolvconf: FakeResolvconf, state: StateFile
) -> None:
    resolvconf.fail_with(3)
    dns = DnsConfigurator(state, backend="resolvconf")
    with trio.fail_after(WAIT_S), pytest.raises(SystemSetupError) as caught:
        await dns.apply("tun0", 7, CORP)
    assert str(caught.value) == "resolvconf -a tun0 failed (exit 3): resolvconf: something is wrong"
    # the rollback tried -d too; it failed as well, so the record stays for recover()
    assert resolvconf.argvs() == [["-a", "tun0", "-m", "0", "-x"], ["-d", "tun0", "-f"]]
    assert state.get("dns") == {"backend": "resolvconf", "ifname": "tun0"}
    with pytest.raises(SystemSetupError, match=r"resolvconf -d tun0 failed \(exit 3\)"):
        recover(StateFile(state.path))
    (resolvconf.directory / "fail").unlink()
    assert recover(StateFile(state.path)) is True
    assert state.get("dns") is None


async def test_resolvconf_recover_after_a_crash(
    resolvconf: FakeResolvconf, state: StateFile, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(WAIT_S):
        await DnsConfigurator(state, backend="resolvconf").apply("tun0", 7, CORP)  # killed
    with caplog.at_level(logging.WARNING, logger="tunnel.client"):
        assert recover(StateFile(state.path)) is True
    assert resolvconf.argvs()[-1] == ["-d", "tun0", "-f"]
    assert "removed the resolvconf entry of tun0" in caplog.text
    assert state.get("dns") is None
