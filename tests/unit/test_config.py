"""Daemon configuration: flags, the documented TOML files, and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktxn.agent.main import build_parser as agent_parser
from blocktxn.agent.main import config_from_args as agent_config
from blocktxn.coordinator.main import build_parser as coordinator_parser
from blocktxn.coordinator.main import config_from_args as coordinator_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def documented(name: str, tmp: Path) -> str:
    """deploy/NAME with its TLS files pointing at stand-ins that exist."""
    tls = tmp / "tls"
    tls.mkdir(exist_ok=True)
    for f in ("coord1.crt", "coord1.key", "host1.crt", "host1.key", "host2.crt", "host2.key",
              "ca.crt"):
        (tls / f).write_text("x")
    copy = tmp / name
    copy.write_text((DEPLOY / name).read_text().replace("/etc/blocktxn/tls", str(tls)))
    return str(copy)


def test_documented_agent_file_parses_and_flags_override_it(tmp_path: Path) -> None:
    args = agent_parser().parse_args(["--config", documented("agent.toml", tmp_path),
                                      "--listen", "127.0.0.1:9"])
    cfg = agent_config(args)
    assert cfg.agent_id == "host1" and cfg.listen == "127.0.0.1:9"
    assert cfg.repo == Path("/var/lib/blocktxn/repo")
    assert [v.name for v in cfg.vms] == ["web", "db"] and cfg.vms[0].ga == "/run/qemu/web.qga"
    assert cfg.restore_dirs == (Path("/var/lib/blocktxn/restores"),)
    assert cfg.metrics_listen == "127.0.0.1:9101"


def test_a_file_sets_options_that_have_a_default_and_flags_still_win(tmp_path: Path) -> None:
    """Options with a default (not None) were never taken from the file: the file's
    value was silently ignored."""
    f = tmp_path / "a.toml"
    f.write_text('id = "a"\nlisten = "127.0.0.1:1"\nrepo = "/r"\nstaged-alone-after = 3600\n'
                 'in-doubt-after = 60\nqmp-timeout = 20\nmax-chain = 7\n')
    cfg = agent_config(agent_parser().parse_args(["--config", str(f)]))
    assert (cfg.staged_alone_after, cfg.in_doubt_after, cfg.qmp_timeout, cfg.max_chain) \
        == (3600, 60, 20, 7)
    cfg = agent_config(agent_parser().parse_args(["--config", str(f), "--max-chain", "9"]))
    assert cfg.max_chain == 9


def test_documented_coordinator_file_parses(tmp_path: Path) -> None:
    cfg = coordinator_config(coordinator_parser().parse_args(
        ["--config", documented("coordinator.toml", tmp_path)]))
    assert cfg.listen == "0.0.0.0:7400" and cfg.tls.enabled
    assert cfg.name == "coord1" and cfg.etcd and cfg.etcd.count(",") == 2
    assert cfg.retention["web"].keep_weekly == 4 and cfg.retention["db"].keep_within == 2 * 86400
    defaults = coordinator_config(coordinator_parser().parse_args([]))
    assert defaults.listen == "127.0.0.1:7400" and defaults.etcd is None
    assert not defaults.retention
    assert cfg.metrics_listen == "127.0.0.1:9100" and defaults.metrics_listen is None
    assert [s.name for s in cfg.schedules] == ["web-nightly", "db-hourly"]
    assert cfg.schedules[0].catch_up == 7200 and cfg.schedules[0].options.quiesce == "freeze"
    assert not defaults.schedules


@pytest.mark.parametrize("spec,word", [
    ("web=keep-last=-1", "keep-last"),
    ("web=keep-last=0", "keeps nothing"),
    ("web=keep-lost=3", "unknown retention key"),
    ("web=keep-within=forever", "keep-within"),
    ("web", "GROUP=KEY=VALUE"),
    ("we b=keep-last=1", "safe identifier"),
])
def test_bad_retention_policies_are_refused_at_load(spec: str, word: str) -> None:
    with pytest.raises(ValueError, match=word) as err:
        coordinator_config(coordinator_parser().parse_args(["--retention", spec]))
    assert "\n" not in str(err.value)


def test_vm_spec_takes_a_watchdog_monitor() -> None:
    cfg = agent_config(agent_parser().parse_args([
        "--id", "a", "--listen", "127.0.0.1:1", "--repo", "/r",
        "--vm", "web=/q.sock,ga=/g.sock,watch=/w.sock"]))
    assert (cfg.vms[0].ga, cfg.vms[0].watch) == ("/g.sock", "/w.sock")
    with pytest.raises(ValueError, match="bad option"):
        agent_config(agent_parser().parse_args([
            "--id", "a", "--listen", "127.0.0.1:1", "--repo", "/r",
            "--vm", "web=/q.sock,ga=/g,ga=/h"]))


def test_staged_alone_after_is_an_option_with_a_range() -> None:
    base = ["--id", "a", "--listen", "127.0.0.1:1", "--repo", "/r"]
    assert agent_config(agent_parser().parse_args(base)).staged_alone_after == 900
    cfg = agent_config(agent_parser().parse_args([*base, "--staged-alone-after", "3600"]))
    assert cfg.staged_alone_after == 3600
    for bad in ("299", "86401", "nan"):
        with pytest.raises(ValueError, match=r"--staged-alone-after .* 300\.\.86400 s") as err:
            agent_config(agent_parser().parse_args([*base, "--staged-alone-after", bad]))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,word", [
    ('id = "a"\nlisten = "127.0.0.1:1"\nrepo = "/r"\nbogus = 1\n', "unknown option"),
    ('id = "a b"\nlisten = "127.0.0.1:1"\nrepo = "/r"\n', "safe identifier"),
    ('listen = "127.0.0.1:1"\nrepo = "/r"\n', "--id is required"),
    ('id = "a"\nlisten = "127.0.0.1:1"\nrepo = "/r"\nvm = ["web"]\n', "NAME=QMP"),
    ("id = \n", "config file"),
])
def test_bad_agent_files_are_one_line_errors(tmp_path: Path, text: str, word: str) -> None:
    f = tmp_path / "a.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=word):
        agent_config(agent_parser().parse_args(["--config", str(f)]))


@pytest.mark.parametrize(("flags", "words"), [
    (["--etcd-cert", "CA"], "go together"),
    (["--etcd-cert", "CA", "--etcd-key", "CA"], "needs --etcd-ca"),
    (["--etcd-user", "u"], "go together"),
    (["--etcd-ca", "MISSING"], "does not exist"),
    (["--etcd-user", "u", "--etcd-password-file", "EMPTY"], "is empty"),
    (["--etcd-ca", "CA", "--no-etcd"], "for an etcd given with --etcd"),
])
def test_bad_etcd_access_is_refused_with_one_line(tmp_path: Path, flags: list[str],
                                                  words: str) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "empty").write_text("\n")
    names = {"CA": str(tmp_path / "ca.crt"), "MISSING": str(tmp_path / "nope"),
             "EMPTY": str(tmp_path / "empty")}
    argv = [names.get(f, f) for f in flags if f != "--no-etcd"]
    if "--no-etcd" not in flags:
        argv += ["--etcd", "127.0.0.1:2379"]
    with pytest.raises(ValueError, match="etcd") as err:
        coordinator_config(coordinator_parser().parse_args(argv))
    assert words in str(err.value)


@pytest.mark.parametrize(("listen", "extra", "ok"), [
    ("127.0.0.1:7400", [], True), ("[::1]:7400", [], True), ("localhost:7400", [], True),
    ("0.0.0.0:7400", [], False), ("10.0.0.5:7400", [], False),
    ("10.0.0.5:7400", ["--insecure"], True),
])
def test_plaintext_listens_on_loopback_only_unless_insecure(
    listen: str, extra: list[str], ok: bool,
) -> None:
    args = coordinator_parser().parse_args(["--listen", listen, *extra])
    agent_args = agent_parser().parse_args(["--id", "a", "--listen", listen, "--repo", "/r",
                                            *extra])
    if ok:
        coordinator_config(args)
        agent_config(agent_args)
        return
    for parse, parsed in ((coordinator_config, args), (agent_config, agent_args)):
        with pytest.raises(ValueError, match="loopback only") as err:
            parse(parsed)
        assert "--insecure" in str(err.value)


def test_documented_libvirt_agent_file_parses(tmp_path: Path) -> None:
    cfg = agent_config(agent_parser().parse_args(
        ["--config", documented("agent-libvirt.toml", tmp_path)]))
    assert [(v.name, v.libvirt_domain) for v in cfg.vms] == [("web", "web-prod"),
                                                             ("db", "db-prod")]
    assert cfg.libvirt_uri == "qemu:///system"
