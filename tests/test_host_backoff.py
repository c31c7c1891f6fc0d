"""negotiator_host.backoff: retry delays and times per key, on a clock the test moves."""

from negotiator_host.backoff import MAX_BACKOFF, Backoff


class Clock(object):
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_delays_double_from_the_first_up_to_the_maximum():
    backoff = Backoff(clock=Clock())
    assert [backoff.failed('web-1', 0.5) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert MAX_BACKOFF == 30


def test_each_key_backs_off_on_its_own():
    backoff = Backoff(maximum=10, clock=Clock())
    assert [backoff.failed('a', 1.0) for _ in range(3)] == [1, 2, 4]
    assert backoff.failed('b', 1.0) == 1
    assert backoff.failed('a', 1.0) == 8
    assert backoff.failed('a', 1.0) == 10


def test_reset_starts_again_from_the_first_delay_given_then():
    backoff = Backoff(clock=Clock())
    backoff.failed('web-1', 1.0)
    backoff.failed('web-1', 1.0)
    backoff.reset('web-1')
    assert backoff.failed('web-1', 0.5) == 0.5
    backoff.reset('never-failed')  # nothing to forget: no error


def test_remaining_and_retry_at_follow_the_clock():
    clock = Clock()
    backoff = Backoff(clock=clock)
    assert backoff.remaining('web-1') == 0 and backoff.retry_at('web-1') == 0
    backoff.failed('web-1', 2.0)
    assert backoff.retry_at('web-1') == 1002.0
    clock.now = 1001.5
    assert backoff.remaining('web-1') == 0.5
    clock.now = 1003.0
    assert backoff.remaining('web-1') == 0
    assert backoff.failed('web-1', 2.0) == 4.0 and backoff.retry_at('web-1') == 1007.0


def test_forget_all_but_drops_the_keys_that_are_gone():
    backoff = Backoff(clock=Clock())
    for name in ('kept', 'gone'):
        backoff.failed(name, 1.0)
        backoff.failed(name, 1.0)
    backoff.forget_all_but(['kept', 'never-seen'])
    assert backoff.remaining('gone') == 0
    assert backoff.failed('gone', 1.0) == 1.0  # from the first delay again
    assert backoff.remaining('kept') == 2.0 and backoff.failed('kept', 1.0) == 4.0
