"""app/deploy/ssh.py: the pure parts (known_hosts entries)."""

from __future__ import annotations

import asyncssh

from app.deploy.ssh import known_hosts_entry


def test_known_hosts_entry_is_hashed_and_matches() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    line = known_hosts_entry("127.0.0.1", 2222, key, b"s" * 20)
    assert line.startswith("|1|")
    assert "127.0.0.1" not in line
    known = asyncssh.import_known_hosts(line)
    assert known.match("127.0.0.1", "127.0.0.1", 2222)[0] == [key]
    assert known.match("127.0.0.1", "127.0.0.1", 22)[0] == []
