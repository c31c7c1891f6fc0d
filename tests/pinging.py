"""
Pings on a channel in the background while a test streams something else over it: the round
trips are kept (printed, for a person to read, never asserted as times) and the first error
is kept for the test to fail on. The real-guest tests of streams and of files use it.
"""

import threading


def percentile(values, fraction):
    """The value below which ``fraction`` of ``values`` lie (the largest for 1.0)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Pinger(object):
    """
    Pings on ``channel``, one after the other, until stopped (a ``with`` block); keeps every
    round trip and the first error. ``timeout`` is each ping's (None: the channel's own).
    """

    def __init__(self, channel, timeout=None):
        self.channel = channel
        self.timeout = timeout
        self.times = []
        self.error = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True

    def _run(self):
        try:
            while not self.stop.is_set():
                self.times.append(self.channel.ping(timeout=self.timeout))
                self.stop.wait(0.02)
        except Exception as exc:  # kept: the test fails on it
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(30)

    def report(self, what):
        milliseconds = [t * 1000 for t in self.times]
        print('%s: %d pings, median %.2f ms, p99 %.2f ms, max %.2f ms' % (
            what, len(milliseconds), percentile(milliseconds, 0.5), percentile(milliseconds, 0.99),
            max(milliseconds)))
