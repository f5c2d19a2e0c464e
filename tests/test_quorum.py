"""Quorum arithmetic against a deliberately naive model (in the spirit of etcd's quorum/quick_test.go).

The model counts heads by brute force and knows nothing about sorting: if `quorum.py` ever takes a
clever shortcut that is wrong for duplicate voter names, voters missing from the match map or an
empty configuration, these properties find the input.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tomq.node.raft import quorum

NAMES = st.sampled_from(["n1", "n2", "n3", "n4", "n5", "n6", "n7"])  # few names: duplicates and overlaps
VOTERS = st.lists(NAMES, max_size=9)  # a list, so the same voter may be named twice
MATCH = st.dictionaries(NAMES, st.integers(min_value=0, max_value=40), max_size=7)
BIG_MATCH = st.dictionaries(NAMES, st.integers(min_value=0, max_value=2**63), max_size=7)

SETTINGS = settings(max_examples=300, deadline=None)


# --------------------------------------------------------------------------- the naive model


def naive_size(voters: list[str]) -> int:
    distinct: list[str] = []
    for voter in voters:
        if voter not in distinct:
            distinct.append(voter)
    return len(distinct)


def naive_majority(voters: list[str]) -> int:
    """The smallest head count that is more than half of the distinct voters."""
    n = naive_size(voters)
    k = 0
    while 2 * k <= n:
        k += 1
    return k


def naive_count(voters: list[str], holds) -> int:
    """How many distinct voters satisfy `holds`."""
    counted: list[str] = []
    for voter in voters:
        if voter not in counted and holds(voter):
            counted.append(voter)
    return len(counted)


def naive_committed_index(voters: list[str], match: dict[str, int], candidates) -> int:
    """The largest i such that a majority of the voters have stored index i (missing voters hold 0)."""
    if not voters:
        return 0
    best = 0
    for i in candidates:
        if naive_count(voters, lambda v, i=i: match.get(v, 0) >= i) >= naive_majority(voters):
            best = max(best, i)
    return best


def naive_vote_won(voters: list[str], granted: list[str]) -> bool:
    return naive_count(voters, lambda v: v in granted) >= naive_majority(voters)


def naive_vote_lost(voters: list[str], rejected: list[str]) -> bool:
    """Lost when even a yes from every voter that has not said no could not make a majority."""
    undecided_or_yes = naive_count(voters, lambda v: v not in rejected)
    return undecided_or_yes < naive_majority(voters)


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(VOTERS)
def test_majority_is_more_than_half_of_the_distinct_voters(voters):
    assert quorum.majority(voters) == naive_majority(voters)
    assert quorum.majority(iter(voters)) == naive_majority(voters)  # any iterable, consumed once


@SETTINGS
@given(VOTERS, MATCH)
def test_committed_index_matches_brute_force_over_every_index(voters, match):
    # Every integer from 0 to one past the largest match is a candidate: nothing clever about which.
    candidates = range(max(match.values(), default=0) + 2)
    assert quorum.committed_index(voters, match) == naive_committed_index(voters, match, candidates)


@SETTINGS
@given(VOTERS, BIG_MATCH)
def test_committed_index_with_huge_indices(voters, match):
    # Too large to enumerate; the answer is one of the stored indices (or 0), so those are the candidates.
    candidates = {0, *match.values()}
    assert quorum.committed_index(voters, match) == naive_committed_index(voters, match, candidates)


@SETTINGS
@given(VOTERS, MATCH)
def test_committed_index_is_held_by_a_majority_and_ignores_non_voters(voters, match):
    index = quorum.committed_index(voters, match)
    holders = {v for v in voters if match.get(v, 0) >= index}
    assert len(holders) >= naive_majority(voters) or not voters
    # Whatever non-voters report changes nothing.
    noisy = dict(match, outsider=10**6, n99=10**6)
    assert quorum.committed_index(voters, noisy) == index
    # Naming a voter twice gives it no second vote.
    assert quorum.committed_index(voters + voters, match) == index


@SETTINGS
@given(VOTERS, st.lists(NAMES, max_size=9))
def test_vote_won_matches_the_head_count(voters, granted):
    assert quorum.vote_won(voters, granted) == naive_vote_won(voters, granted)


@SETTINGS
@given(VOTERS, st.lists(NAMES, max_size=9))
def test_vote_lost_matches_the_head_count(voters, rejected):
    assert quorum.vote_lost(voters, rejected) == naive_vote_lost(voters, rejected)


@SETTINGS
@given(VOTERS, st.lists(st.tuples(NAMES, st.booleans()), max_size=9))
def test_an_election_is_never_both_won_and_lost(voters, answers):
    # Each voter answers once (its first answer counts), as the core's votes dict guarantees.
    votes: dict[str, bool] = {}
    for voter, yes in answers:
        votes.setdefault(voter, yes)
    granted = [v for v, yes in votes.items() if yes]
    rejected = [v for v, yes in votes.items() if not yes]
    won, lost = quorum.vote_won(voters, granted), quorum.vote_lost(voters, rejected)
    assert not (won and lost)
    distinct = set(voters)
    if distinct and distinct <= votes.keys():
        assert won or lost  # once every voter has answered the outcome is known


def test_the_edges_spelled_out():
    assert quorum.majority([]) == 1
    assert quorum.committed_index([], {"n1": 5}) == 0
    assert quorum.vote_won([], ["n1"]) is False
    assert quorum.vote_lost([], []) is True  # nobody can ever grant: an empty configuration cannot elect
    assert quorum.committed_index(["n1", "n2", "n3"], {"n1": 7}) == 0  # two voters never reported
    assert quorum.committed_index(["n1", "n2", "n3"], {"n1": 7, "n2": 5}) == 5
    assert quorum.committed_index(["n1", "n1", "n2"], {"n1": 7}) == 0  # n1 counts once: 1 of 2
    assert quorum.vote_won(["n1", "n2", "n3", "n4"], ["n1", "n2"]) is False  # half is not a majority
    assert quorum.vote_lost(["n1", "n2", "n3", "n4"], ["n1", "n2"]) is True
    assert quorum.vote_won(["n1"], ["n1", "n1"]) is True
