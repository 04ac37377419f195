"""Messages whose words agree with their numbers: "1 volume", "2 volumes", "sample_00001.json already exists"."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`number` and `noun` in the number it needs: counted(1, "volume") is "1 volume", counted(0, "volume") "0 volumes";
    `plural` for a noun that does not take an s (counted(2, "process", "processes"))."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def verb(number: int, singular: str, plural: str) -> str:
    """The verb that agrees with `number` subjects: verb(1, "exists", "exist") is "exists"."""
    return singular if number == 1 else plural
