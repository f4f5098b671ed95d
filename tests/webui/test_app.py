"""``fourbit webui``'s options: this machine only unless told otherwise, a login that must be whole,
and a clear word where Gradio is missing."""

import sys

import pytest

from fourbit.cli import build_parser, main
from fourbit.errors import InputError
from fourbit.webui.app import launch, parse_auth


def test_it_binds_to_this_machine_by_default():
    args = build_parser().parse_args(["webui"])
    assert (args.host, args.port, args.auth, args.workdir) == ("127.0.0.1", 7860, None, "fourbit-webui")


@pytest.mark.parametrize("bad", ["ada", "ada:", ":s3cret", ""])
def test_a_login_needs_a_user_and_a_password(bad, capsys):
    with pytest.raises(InputError, match="expected USER:PASS"):
        parse_auth(bad)
    assert main(["webui", "--auth", bad]) == 2
    assert "expected USER:PASS, both non-empty" in capsys.readouterr().err
    assert parse_auth("ada:s3:cret") == ("ada", "s3:cret")  # the password may hold a colon


def test_without_gradio_the_ui_says_which_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(InputError, match=r"pip install 'fourbit\[webui\]'"):
        launch(tmp_path, block=False)
