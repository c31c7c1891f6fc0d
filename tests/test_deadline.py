"""The one deadline type of every bounded wait, on a clock that the test moves by hand."""

import pytest

from negotiator_common import deadline as deadline_module
from negotiator_common.deadline import NO_DEADLINE, Deadline


class FakeTime(object):
    """Stands for the :mod:`time` module inside ``negotiator_common.deadline``: time moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(deadline_module, 'time', fake)
    return fake


def test_a_deadline_counts_down_from_its_timeout_and_stops_at_zero(clock):
    deadline = Deadline(5.0)
    assert deadline.timeout == 5.0 and deadline.at == 1005.0
    assert deadline.remaining() == 5.0 and not deadline.expired
    clock.now += 4.5
    assert deadline.remaining() == 0.5 and not deadline.expired
    clock.now += 0.5
    assert deadline.remaining() == 0.0 and deadline.expired
    clock.now += 60
    assert deadline.remaining() == 0.0 and deadline.expired  # never negative: it is given to waits


def test_no_timeout_means_no_limit(clock):
    for deadline in (Deadline(None), NO_DEADLINE):
        clock.now += 10 ** 9
        assert deadline.at is None and deadline.remaining() is None
        assert not deadline.expired and not deadline.expires_within(10 ** 9)


def test_a_zero_or_negative_timeout_has_passed_already(clock):
    assert Deadline(0).expired and Deadline(0).remaining() == 0.0
    assert Deadline(-1).expired and Deadline(-1).remaining() == 0.0


def test_expires_within_tells_whether_a_retry_would_miss_it(clock):
    deadline = Deadline(1.0)
    assert not deadline.expires_within(0.5)
    assert not deadline.expires_within(1.0)  # a retry that ends exactly at the deadline still counts
    assert deadline.expires_within(1.5)
    clock.now += 0.8
    assert deadline.expires_within(0.5)


def test_capped_takes_whichever_comes_first(clock):
    overall = Deadline(10.0)
    step = overall.capped(2.0)
    assert step.at == 1002.0 and overall.at == 1010.0  # the overall deadline is unchanged
    clock.now += 9.0
    assert overall.capped(2.0) is overall  # one second left: the step ends with the whole
    assert Deadline(None).capped(3.0).remaining() == 3.0


def test_repr_says_what_is_left(clock):
    assert repr(Deadline(None)) == 'Deadline(no limit)'
    assert repr(Deadline(2.5)) == 'Deadline(2.500 seconds left)'
