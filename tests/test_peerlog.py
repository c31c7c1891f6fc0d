"""Peer-controlled values are cut short in logs, and complaints about a peer are rate-limited."""

import logging

from negotiator_common.peerlog import Complaints, Cut, cut


def test_cut_keeps_a_short_repr_and_notes_the_full_length():
    assert cut(7) == '7' and cut('id-1') == "'id-1'" and cut(None) == 'None'
    huge = 'x' * (4 * 1024 * 1024)
    text = cut(huge)
    assert len(text) < 200 and text.endswith('... (4194304 characters)')
    assert cut(b'\xff' * 1000).endswith('(1000 bytes)')
    # Newlines are escaped: a peer's value can never begin a log line of its own.
    assert '\n' not in cut('a\nWARNING forged line\n' * 100)
    for value in ([list(range(1000))] * 1000, {'k' * 500: ['v' * 5000] * 50}, 10 ** 4000, [[[[[['deep']]]]]]):
        assert len(cut(value)) < 200
    assert str(Cut(huge)) == text


class FakeClock(object):
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_complaints_are_limited_per_kind_and_the_rest_counted(caplog):
    clock = FakeClock()
    complaints = Complaints(logging.getLogger('test.peerlog'), 'guest-a', per_interval=3, interval=10, clock=clock)
    with caplog.at_level(logging.DEBUG, logger='test.peerlog'):
        for number in range(1000):
            complaints.complain('warning', 'bad lines', "Bad line %d", number)
            complaints.complain('debug', 'unknown ids', "Unknown id %d", number)
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            'Bad line 0', 'Bad line 1', 'Bad line 2']
        clock.now += 10
        complaints.complain('warning', 'bad lines', "Bad line %d", 1000)
        complaints.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-3:] == ['997 more complaints (bad lines) about guest-a suppressed in 10 seconds',
                             'Bad line 1000',
                             '997 more complaints (unknown ids) about guest-a suppressed in 10 seconds']
    assert len(messages) == 9
    assert [r.levelno for r in caplog.records if 'unknown ids' in r.getMessage()] == [logging.DEBUG]
