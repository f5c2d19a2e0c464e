"""Quorum arithmetic, kept apart from the protocol so it can be checked against a naive model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def majority(voters: Iterable[str]) -> int:
    return len(set(voters)) // 2 + 1


def committed_index(voters: Iterable[str], match: Mapping[str, int]) -> int:
    """The highest index that a majority of `voters` have stored (0 for no voters)."""
    voter_set = set(voters)
    if not voter_set:
        return 0
    indices = sorted((match.get(voter, 0) for voter in voter_set), reverse=True)
    return indices[majority(voter_set) - 1]


def vote_won(voters: Iterable[str], granted: Iterable[str]) -> bool:
    voter_set = set(voters)
    return len(voter_set & set(granted)) >= majority(voter_set)


def vote_lost(voters: Iterable[str], rejected: Iterable[str]) -> bool:
    voter_set = set(voters)
    return len(voter_set & set(rejected)) > len(voter_set) - majority(voter_set)
