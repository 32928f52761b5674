"""The client key's home (recipes.client_key): under OSIMG_HOME, copied once from the old cache place."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import recipes
from orchestrator.host import ssh
from orchestrator.settings import Settings


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("OSIMG_CACHE", str(tmp_path / "cache"))
    return Settings.from_env(home=str(tmp_path / "home"))


def test_client_key_lives_under_osimg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(tmp_path, monkeypatch)
    key = recipes.client_key(s)
    assert key == tmp_path / "home" / "keys" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "cache" / "keys").exists()


def test_a_key_left_in_the_cache_is_copied_to_home_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(tmp_path, monkeypatch)
    pub = ssh.ensure_client_key(s.legacy_client_key)  # where an older osimg made it
    key = recipes.client_key(s)
    assert key.read_bytes() == s.legacy_client_key.read_bytes()
    assert key.with_suffix(".pub").read_text().strip() == pub
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    # from now on the home's key is the one: a new cache key does not replace it
    s.legacy_client_key.unlink()
    ssh.ensure_client_key(s.legacy_client_key)
    assert recipes.client_key(s).read_bytes() != s.legacy_client_key.read_bytes()
    assert key.with_suffix(".pub").read_text().strip() == pub
