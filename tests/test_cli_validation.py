"""The CLI answers bad values, missing extras and a busy port with one line that names the problem."""

import socket
import sys

import pytest

from cecollm import cli


@pytest.mark.parametrize("argv, option", [
    (["generate", "x", "--threshold", "nan"], "--threshold"),
    (["generate", "x", "--threads", "0"], "--threads"),
    (["info", "--threads", "-3"], "--threads"),
    (["generate", "x", "--exits", "a,b"], "--exits"),
    (["experiment", "--rtt", "0.02,inf"], "--rtt"),
    (["sweep", "--thresholds", "0.8,x"], "--thresholds"),
])  # fmt: skip
def test_bad_values_name_their_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and option in err[-1]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["experiment", "--help"])
    assert "(default: 0.8,0.9,1.0)" in capsys.readouterr().out


@pytest.mark.model
def test_missing_optional_dependency_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    monkeypatch.delitem(sys.modules, "cecollm.train", raising=False)
    assert cli.main(["train-exits", "--out", "x.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == "cecollm: error: this needs torch: pip install 'cecollm[train]'"


@pytest.mark.model
def test_port_in_use_is_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
