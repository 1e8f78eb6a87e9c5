from __future__ import annotations

import pytest

from app.config import Settings, SettingsError, load_settings


def test_backend_urls_from_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKEND_URLS", " http://a:8000/ , http://b:8000")
    monkeypatch.setenv("SERVED_MODEL", "llama")
    s = load_settings()
    assert s.backend_urls == ["http://a:8000", "http://b:8000"]
    assert s.served_model == "llama"
    assert s.port == 8080


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("BACKEND_URLS", "a:8000", "BACKEND_URLS"),
        ("PORT", "eighty", "PORT"),
        ("POOL_IDLE_TIMEOUT_S", "6", "POOL_IDLE_TIMEOUT_S"),
        ("REDIS_URL", "http://x", "REDIS_URL"),
        ("ROUTING_POLICY", "random", "ROUTING_POLICY"),
    ],
)
def test_bad_setting_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(f"invalid setting {named}:")
    assert "\n" not in str(info.value)


def test_missing_backends_is_explained() -> None:
    with pytest.raises(SettingsError, match="BACKEND_URLS is not set"):
        Settings(backend_urls=[]).require_backends()
    # A fleet that starts empty and is filled live is fine.
    Settings(backend_urls=[], admin_api_key="k").require_backends()
    Settings(backend_urls=[], backends_file="/etc/kvroute/backends").require_backends()


def test_admin_key_is_hidden_from_the_public_view() -> None:
    view = Settings(admin_api_key="adm-secret").public_view()
    assert view["admin_api_key"] == "set"
    assert "adm-secret" not in repr(Settings(admin_api_key="adm-secret"))


def test_public_view_hides_secrets() -> None:
    s = Settings(
        backend_urls=["http://u:pw@a:1"],
        backend_api_key="sk-secret",
        redis_url="redis://:pw@r:6379/0",
    )
    text = repr(s.public_view())
    assert "sk-secret" not in text
    assert "pw" not in text


def test_env_example_and_readme_document_every_setting() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = (root / ".env.example").read_text()
    readme = (root / "README.md").read_text()
    listed = {
        line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    for name in Settings.model_fields:
        assert name.upper() in listed, f"{name.upper()} missing from .env.example"
        assert f"`{name.upper()}`" in readme, f"{name.upper()} missing from the README's settings"
    # Every documented setting is real.
    assert listed <= {n.upper() for n in Settings.model_fields}


def test_env_example_is_a_valid_configuration(tmp_path: object) -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / ".env.example"
    s = Settings(_env_file=str(example))  # type: ignore[call-arg]
    assert s.backend_urls == ["http://127.0.0.1:8000"]
    assert s.port == 8080
