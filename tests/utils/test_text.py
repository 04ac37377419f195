"""mriflow.utils.text: a message's nouns and verbs agree with its numbers."""

from __future__ import annotations

from mriflow.utils.text import counted, verb


def test_one_is_singular_and_every_other_number_plural():
    assert counted(1, "volume") == "1 volume"
    assert [counted(n, "volume") for n in (0, 2, 12)] == ["0 volumes", "2 volumes", "12 volumes"]
    assert counted(1, "process", "processes") == "1 process" and counted(4, "process", "processes") == "4 processes"
    assert verb(1, "exists", "exist") == "exists" and verb(3, "exists", "exist") == "exist"
