"""tunnel.daemon.nft without a kernel: the order of what KillSwitch and Masquerade change, the
state record, and the errors. A fake libnftables stands in for the real one (which
tests/integration/test_nft_rules.py drives in namespaces)."""

import logging
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tunnel.daemon import nft as nftmod
from tunnel.daemon.nft import MASQUERADE_STATE_KEY, KillSwitch, Masquerade, Nftables
from tunnel.daemon.statefile import StateFile
from tunnel.errors import ConfigError, SystemSetupError

POOL = [IPv4Network("10.94.0.0/24")]


class FakeContext:
    """What ``nftables.Nftables()`` offers, over a set of (family, table) names."""

    def __init__(self) -> None:
        self.tables: set[tuple[str, str]] = set()
        self.json = False
        self.fail_with: str | None = None
        self.applied: list[dict] = []

    def set_json_output(self, value: bool) -> bool:
        old, self.json = self.json, value
        return old

    def set_handle_output(self, value: bool) -> bool:
        return False

    def json_cmd(self, document):
        self.applied.append(document)
        if self.fail_with is not None:
            return 1, "", f"internal:0:0-0: Error: {self.fail_with}\n\n"
        tables = set(self.tables)
        for command in document["nftables"]:
            ((verb, what),) = command.items()
            if "table" not in what:
                continue
            key = (what["table"]["family"], what["table"]["name"])
            if verb == "add":
                tables.add(key)
            elif verb in ("delete", "list") and key not in tables:
                return 1, "", "internal:0:0-0: Error: No such file or directory\n\n"
            elif verb == "delete":
                tables.discard(key)
        self.tables = tables
        return 0, "", ""

    def cmd(self, text):
        assert text == "list ruleset" and not self.json
        return 0, "".join(f"table {f} {n} {{\n}}\n" for f, n in sorted(self.tables)), ""


@pytest.fixture
def fake(monkeypatch):
    context = FakeContext()
    module = type(sys)("nftables")
    module.Nftables = lambda: context
    monkeypatch.setitem(sys.modules, "nftables", module)
    return context


@pytest.fixture
def sysctl(tmp_path):
    root = tmp_path / "sys"
    (root / "net/ipv4").mkdir(parents=True)
    (root / "net/ipv4/ip_forward").write_text("0\n")
    return root


def _forward(root: Path) -> str:
    return (root / "net/ipv4/ip_forward").read_text().strip()


def test_a_missing_binding_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nftables", None)
    with pytest.raises(SystemSetupError, match=r"^nftables: .*pip-nftables"):
        Nftables()


def test_a_missing_library_is_one_clear_line(monkeypatch):
    def no_library():
        raise OSError("libnftables.so.1: cannot open shared object file")

    module = type(sys)("nftables")
    module.Nftables = no_library
    monkeypatch.setitem(sys.modules, "nftables", module)
    with pytest.raises(SystemSetupError, match=r"^nftables: cannot load libnftables\.so\.1"):
        Nftables()


def test_errors_are_the_first_line_without_the_location(fake):
    nft = Nftables()
    fake.fail_with = "Could not process rule: Operation not permitted"
    with pytest.raises(SystemSetupError) as caught:
        nft.apply({"nftables": []})
    assert str(caught.value) == "nftables: Error: Could not process rule: Operation not permitted"
    with pytest.raises(SystemSetupError):
        nft.delete_table("inet", "t")
    with pytest.raises(SystemSetupError):
        nft.has_table("inet", "t")


def test_delete_and_has_table_say_whether_it_was_there(fake):
    nft = Nftables()
    assert not nft.has_table("inet", "t")
    assert not nft.delete_table("inet", "t")
    fake.tables.add(("inet", "t"))
    assert nft.has_table("inet", "t")
    assert nft.ruleset_text() == "table inet t {\n}\n"
    assert fake.json  # back to JSON after the text listing
    assert nft.delete_table("inet", "t")
    assert not nft.has_table("inet", "t")


def test_kill_switch_engage_release_cleanup(fake, caplog):
    caplog.set_level(logging.INFO, logger="tunnel.nft")
    nft = Nftables()
    switch = KillSwitch(nft, tun_name="ks0", fwmark=0x5157)
    switch.engage()
    assert fake.tables == {("inet", "tunnel_killswitch_ks0")}
    assert "kill switch on" in caplog.text and "0x5157" in caplog.text
    switch.engage()  # a takeover is the same transaction
    assert fake.tables == {("inet", "tunnel_killswitch_ks0")}
    switch.release()
    assert fake.tables == set()
    assert "kill switch off" in caplog.text
    switch.release()  # twice is fine
    switch.engage()
    assert KillSwitch.cleanup(nft, "ks0")
    assert not KillSwitch.cleanup(nft, "ks0")


def test_kill_switch_refuses_what_it_cannot_match_as_a_config_error(fake):
    with pytest.raises(ConfigError, match="tun_name"):
        KillSwitch(Nftables(), tun_name="tun%d", fwmark=0x5157)
    with pytest.raises(ConfigError, match="fwmark"):
        KillSwitch(Nftables(), tun_name="tun0", fwmark=0)


def test_masquerade_records_before_it_changes_and_undoes_on_stop(
    fake, sysctl, tmp_path, monkeypatch
):
    state = StateFile(tmp_path / "state.json")
    nft = Nftables()
    seen = []

    def write(path, value):
        seen.append(("write", state.get(MASQUERADE_STATE_KEY), value))
        path.write_text(value)

    masq = Masquerade(nft, tun_name="tnlsrv0", pools=POOL, state=state, sysctl_dir=sysctl)
    monkeypatch.setattr(nftmod, "_write_sysctl", write)
    masq.start()
    record = {"ip_forward": "0", "table": "tunnel_masquerade_tnlsrv0"}
    assert seen == [("write", record, "1")]  # recorded first
    assert _forward(sysctl) == "1"
    assert fake.tables == {("ip", "tunnel_masquerade_tnlsrv0")}
    assert state.get(MASQUERADE_STATE_KEY) == record
    masq.stop()
    assert seen[1:] == [("write", record, "0")]  # dropped only after the undo
    assert _forward(sysctl) == "0"
    assert fake.tables == set()
    assert not state.path.exists()
    masq.stop()  # not started: nothing to do


def test_masquerade_leaves_forwarding_alone_when_it_was_on(fake, sysctl, tmp_path):
    (sysctl / "net/ipv4/ip_forward").write_text("1\n")
    state = StateFile(tmp_path / "state.json")
    masq = Masquerade(Nftables(), tun_name="t0", pools=POOL, state=state, sysctl_dir=sysctl)
    masq.start()
    assert state.get(MASQUERADE_STATE_KEY)["ip_forward"] == "1"
    masq.stop()
    assert _forward(sysctl) == "1"
    assert not state.path.exists()


def test_masquerade_start_that_fails_puts_everything_back(fake, sysctl, tmp_path):
    state = StateFile(tmp_path / "state.json")
    masq = Masquerade(Nftables(), tun_name="t0", pools=POOL, state=state, sysctl_dir=sysctl)
    fake.fail_with = "Could not process rule: No such file or directory"
    with pytest.raises(SystemSetupError, match="nftables: "):
        masq.start()
    assert _forward(sysctl) == "0"
    assert not state.path.exists()


def test_a_start_after_a_kill_keeps_the_value_from_before_the_first_start(fake, sysctl, tmp_path):
    state = StateFile(tmp_path / "state.json")
    Masquerade(Nftables(), tun_name="t0", pools=POOL, state=state, sysctl_dir=sysctl).start()
    # killed; the next server forgets to recover first
    again = Masquerade(Nftables(), tun_name="t0", pools=POOL, state=state, sysctl_dir=sysctl)
    again.start()
    assert state.get(MASQUERADE_STATE_KEY)["ip_forward"] == "0"
    again.stop()
    assert _forward(sysctl) == "0"


def test_recover_undoes_a_killed_server(fake, sysctl, tmp_path):
    state = StateFile(tmp_path / "state.json")
    nft = Nftables()
    Masquerade(nft, tun_name="old0", pools=POOL, state=state, sysctl_dir=sysctl).start()
    # killed, and restarted with another TUN name: the record names the old table
    fake.tables.add(("ip", "tunnel_masquerade_new0"))
    assert Masquerade.recover(nft, "new0", state, sysctl_dir=sysctl)
    assert fake.tables == set()
    assert _forward(sysctl) == "0"
    assert not state.path.exists()
    assert not Masquerade.recover(nft, "new0", state, sysctl_dir=sysctl)


def test_recover_drops_a_record_it_cannot_read(fake, sysctl, tmp_path, caplog):
    state = StateFile(tmp_path / "state.json")
    state.put(MASQUERADE_STATE_KEY, {"ip_forward": "; rm -rf /", "table": "x y"})
    (sysctl / "net/ipv4/ip_forward").write_text("1\n")
    assert Masquerade.recover(Nftables(), "t0", state, sysctl_dir=sysctl)
    assert _forward(sysctl) == "1"  # nothing to restore it to
    assert not state.path.exists()
    assert "not a masquerade record" in caplog.text
