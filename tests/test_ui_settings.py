"""ui/settings.py: flags, environment variables and the default cache mode (shared only when local)."""

from __future__ import annotations

import pytest

from ui.settings import AppSettings, default_cache_mode, parse_settings


@pytest.mark.parametrize(
    "host, on_space, mode",
    [
        ("127.0.0.1", False, "shared"),
        ("localhost", False, "shared"),
        ("::1", False, "shared"),
        ("0.0.0.0", False, "per-session"),
        ("192.168.1.5", False, "per-session"),
        ("myhost.example", False, "per-session"),
        ("127.0.0.1", True, "per-session"),  # a Space is public whatever it binds
    ],
)
def test_default_cache_mode_is_shared_only_when_local(host, on_space, mode):
    """Prefix caching is a timing side channel: anything reachable by strangers isolates sessions."""
    assert default_cache_mode(host, on_space) == mode


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        ([], {}, dict(host="127.0.0.1", port=7860, cache_mode="shared", model=None, cache_budget_mb=None, weights=None)),
        (["--weights", "int8"], {}, dict(weights="int8")),  # None above: the engine's own KVCI_WEIGHTS, else auto
        ([], {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "9000"}, dict(host="0.0.0.0", port=9000, cache_mode="per-session")),
        ([], {"SPACE_ID": "me/demo", "GRADIO_SERVER_NAME": "0.0.0.0"}, dict(cache_mode="per-session", on_space=True)),
        (["--host", "0.0.0.0", "--cache-mode", "shared", "--allow-shared-public"], {}, dict(cache_mode="shared", allow_shared_public=True)),
        (["--public"], {}, dict(cache_mode="per-session", public=True, is_local=False, prompt_token_limit=1024)),
        ([], {}, dict(is_local=True, prompt_token_limit=None, trust_proxy=False, session_cache_share=0.25)),
        (["--max-prompt-tokens", "64", "--session-cache-share", "0.5"], {"SPACE_ID": "me/demo"}, dict(prompt_token_limit=64, session_cache_share=0.5, trust_proxy=True)),
        (["--cache-mode", "per-session"], {}, dict(cache_mode="per-session", host="127.0.0.1")),
        (["--port", "7000", "--model", "some/model", "--cache-budget-mb", "64"], {"GRADIO_SERVER_PORT": "9000"}, dict(port=7000, model="some/model", cache_budget_mb=64.0)),
    ],
)
def test_parse_settings_from_flags_and_environment(argv, environ, expected):
    """Flags win over GRADIO_SERVER_NAME/PORT; SPACE_ID marks a public Space."""
    settings = parse_settings(argv, environ)
    assert {key: getattr(settings, key) for key in expected} == expected


def test_bad_settings_are_refused():
    """A wrong mode or port is the caller's error, said plainly."""
    with pytest.raises(ValueError, match="cache_mode"):
        AppSettings(cache_mode="everyone")
    with pytest.raises(SystemExit):
        parse_settings(["--cache-mode", "everyone"], {})
    with pytest.raises(SystemExit):
        parse_settings(["--weights", "int3"], {})
    for flag in ("--upload-budget-mb", "--upload-kept-min"):
        for value in ("0", "-5"):
            with pytest.raises(SystemExit):
                parse_settings([flag, value], {})
    assert (parse_settings(["--upload-budget-mb", "64", "--upload-kept-min", "2.5"], {}).upload_budget_mb, parse_settings([], {}).upload_kept_min) == (64, 15)


@pytest.mark.parametrize("argv, environ", [(["--host", "0.0.0.0", "--cache-mode", "shared"], {}), (["--cache-mode", "shared"], {"SPACE_ID": "me/demo"}), (["--cache-mode", "shared", "--public"], {})])
def test_shared_cache_on_a_public_server_needs_the_explicit_flag(argv, environ, capsys):
    """A shared cache where strangers connect is a prefix oracle: refuse to start without --allow-shared-public, saying why."""
    with pytest.raises(SystemExit):
        parse_settings(argv, environ)
    assert "--allow-shared-public" in capsys.readouterr().err
    assert parse_settings([*argv, "--allow-shared-public"], environ).cache_mode == "shared"
