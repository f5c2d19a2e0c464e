"""On-demand mode: which node stands for election first after a pause (node/ledger_service.py)."""

from hypothesis import given
from hypothesis import strategies as st

from tomq.node.ledger_service import stand_turn

names = st.lists(st.text(alphabet="abcdefghn0123456789", min_size=1, max_size=6), min_size=1, max_size=9,
                 unique=True)


@given(voters=names, term=st.integers(0, 2**40))
def test_every_term_orders_all_voters_and_exactly_one_stands_at_once(voters, term):
    turns = sorted(stand_turn(voters, name, term) for name in voters)
    assert turns == list(range(len(voters)))  # one at once, then one more every STAND_TICKS * k ticks


@given(voters=names, term=st.integers(0, 2**40))
def test_the_first_to_stand_moves_on_with_the_term_and_ignores_the_voters_order(voters, term):
    first = [name for name in voters if stand_turn(voters, name, term) == 0]
    following = [name for name in voters if stand_turn(list(reversed(voters)), name, term + 1) == 0]
    assert len(first) == len(following) == 1
    if len(voters) > 1:
        assert first != following  # each election another node goes first: leadership rotates


def test_a_node_that_is_not_a_voter_stands_last():
    assert stand_turn(["n1", "n2", "n3"], "n9", 4) == 3
    assert [stand_turn(["n1", "n2", "n3"], n, 4) for n in ("n1", "n2", "n3")] == [2, 0, 1]
