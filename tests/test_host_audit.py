"""
The host daemon's audit log: one bounded, printable JSON line per call whatever the caller
sent, in a 0640 file in a 0750 directory, and a failure to write it never fails the call.
"""

import json
import logging
import os
import re
import stat
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negotiator_common.errors import CommandFailed, CommandNotAllowed, ConnectionClosed
from negotiator_host.access import Caller
from negotiator_host.audit import RECORD_LIMIT, AuditLog, audit_line

CALLER = Caller(1000, 1000, 4242, 'alice', ['alice', 'ops'])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=20)
"""Whatever a caller's JSON could hold."""


class FakeClock(object):
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def read_records(path):
    with open(path, 'rb') as handle:
        data = handle.read()
    assert data.endswith(b'\n')
    return [json.loads(line.decode('ascii')) for line in data.split(b'\n')[:-1]]


def assert_one_safe_line(line: bytes) -> dict:
    """One line below the limit, only printable ASCII, every text value in it printable."""
    assert line.endswith(b'\n') and line.count(b'\n') == 1 and len(line) < RECORD_LIMIT
    assert all(0x20 <= byte < 0x7f for byte in line[:-1])
    record = json.loads(line.decode('ascii'))
    texts = [record['user'], record['guest'], record['method']]
    args = record.get('args', [])
    texts += [record.get('command', '')] + (args if isinstance(args, list) else [args])
    assert all(isinstance(text, str) and text.isprintable() for text in texts)
    return record


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == 'negotiator_host.audit' and record.levelno == logging.WARNING]


def test_an_execute_is_one_json_line_with_every_field(tmp_path):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    log.record(CALLER, 'web-1', 'execute', {'command': 'deploy-status', 'args': ['--all', 'a b'], 'input': 'secret'},
               {'exit_status': 0, 'signal': None, 'stdout': 'out'}, 0.1234567)
    log.record(CALLER, 'web-1', 'ping', {}, {'pong': True}, 0.0004)
    log.close()
    first, second = read_records(path)
    assert re.match(r'\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z', first.pop('time'))
    assert first == {'uid': 1000, 'user': 'alice', 'pid': 4242, 'guest': 'web-1', 'method': 'execute',
                     'command': 'deploy-status', 'args': ['--all', 'a b'], 'exit_status': 0, 'signal': None,
                     'seconds': 0.123}
    second.pop('time')
    assert second == {'uid': 1000, 'user': 'alice', 'pid': 4242, 'guest': 'web-1', 'method': 'ping', 'seconds': 0.0}


def test_a_refused_or_failed_call_records_its_error(tmp_path):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    log.record(CALLER, 'db-1', 'hello', {'guest': 'db-1'}, CommandNotAllowed('uid 1000 (alice) may not'), 0.001)
    log.record(CALLER, 'db-1', 'execute', {'command': 'false'},
               CommandFailed('false exited with status 1', {'exit_status': 1, 'signal': None}), 0.05)
    log.record(CALLER, 'db-1', 'execute', {'command': 'sleep', 'args': ['60']}, ConnectionClosed('agent left'), 1.5)
    log.close()
    refused, failed, lost = read_records(path)
    assert (refused['error'], refused['error_code'], refused['method']) == ('CommandNotAllowed', -32011, 'hello')
    assert 'command' not in refused
    assert (failed['error'], failed['exit_status'], failed['signal'], failed['args']) == ('CommandFailed', 1, None, [])
    assert (lost['error'], lost['error_code'], lost['seconds']) == ('ConnectionClosed', -32051, 1.5)


def test_a_newline_in_what_the_caller_sent_cannot_forge_a_record(tmp_path):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    forged = 'x"}\n{"uid": 0, "user": "root", "guest": "web-1", "method": "execute"}\n'
    log.record(CALLER, forged, 'execute', {'command': forged, 'args': [forged, '\r\x1b[2K\x7f\u2028\x85']},
               {'exit_status': 0, 'signal': None}, 0.01)
    log.close()
    with open(path, 'rb') as handle:
        line = handle.read()
    record = assert_one_safe_line(line)
    assert record['uid'] == 1000 and record['user'] == 'alice'
    assert record['command'] == repr(forged) and len(record['args']) == 2


def test_huge_arguments_keep_a_record_bounded_and_count_what_was_left_out():
    params = {'command': 'c' * (10 * 1024 * 1024), 'args': ['\U0001f600' * 100000] * 100000}
    outcome = {'exit_status': 10 ** 5000, 'signal': 'SIGKILL' * 1000}
    record = assert_one_safe_line(audit_line(CALLER, '\x00' * 100000, 'execute', params, outcome, 1.0))
    assert_one_safe_line(audit_line(CALLER, 'g', 'm' * 100000, params, outcome, 1.0))
    assert record['command'].endswith('(10485760 characters)')
    assert record['args'][-1] == '... (100000 arguments)' and 1 < len(record['args']) < 20
    # a text, not the number: on Python 3.11 and later not even its repr (too many digits)
    assert isinstance(record['exit_status'], str) and len(record['exit_status']) <= 64
    assert isinstance(record['signal'], str)


def test_lone_surrogates_from_non_utf8_input_are_written_and_readable():
    params = {'command': '\udc80\udcfe', 'args': ['\ud800']}
    record = assert_one_safe_line(audit_line(CALLER, 'g\udcff', 'execute', params, {'exit_status': 0}, 0.0))
    assert record['command'] == repr('\udc80\udcfe') and record['guest'] == repr('g\udcff')


def test_parameters_of_the_wrong_shape_are_recorded_too():
    not_a_dict: Any = ['not', 'a', 'dict']
    record = assert_one_safe_line(audit_line(CALLER, 'g', 'execute', not_a_dict, None, 0.0))
    assert record['command'] == 'None' and record['args'] == []
    record = assert_one_safe_line(audit_line(CALLER, 'g', 'execute', {'command': 7, 'args': {'a': 1}}, None, 0.0))
    assert record['command'] == '7' and record['args'] == "{'a': 1}"


@settings(max_examples=150, deadline=None)
@given(guest=JSON_VALUES, method=st.text(), command=JSON_VALUES, args=JSON_VALUES, outcome=JSON_VALUES)
def test_whatever_the_caller_sends_a_record_is_one_safe_line(guest, method, command, args, outcome):
    assert_one_safe_line(audit_line(CALLER, guest, 'execute', {'command': command, 'args': args}, outcome, 0.5))
    assert_one_safe_line(audit_line(CALLER, guest, method, {}, outcome, 0.5))


def test_the_file_is_0640_in_a_0750_directory_made_for_it_whatever_the_umask(tmp_path):
    path = str(tmp_path / 'negotiator' / 'audit.log')
    old_umask = os.umask(0o077)
    try:
        log = AuditLog(path)
    finally:
        os.umask(old_umask)
    log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0)
    log.close()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    AuditLog(path).record(CALLER, 'web-2', 'ping', {}, {}, 0.0)  # appends
    assert [record['guest'] for record in read_records(path)] == ['web-1', 'web-2']


def test_a_rotated_file_is_followed_by_a_new_one(tmp_path):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    log.record(CALLER, 'before', 'ping', {}, {}, 0.0)
    os.rename(path, path + '.1')
    log.record(CALLER, 'after', 'ping', {}, {}, 0.0)
    log.close()
    assert [record['guest'] for record in read_records(path + '.1')] == ['before']
    assert [record['guest'] for record in read_records(path)] == ['after']
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_records_written_from_many_threads_never_interleave(tmp_path):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)

    def write_many(number: int) -> None:
        for index in range(50):
            log.record(CALLER, 'guest-%d' % number, 'execute', {'command': 'c', 'args': ['%d' % index, 'x' * 200]},
                       {'exit_status': 0, 'signal': None}, 0.0)

    threads = [threading.Thread(target=write_many, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    records = read_records(path)
    assert len(records) == 400
    assert sorted((r['guest'], int(r['args'][0])) for r in records) == sorted(
        ('guest-%d' % number, index) for number in range(8) for index in range(50))


def test_a_failing_write_is_logged_once_a_minute_and_the_call_goes_on(caplog):
    clock = FakeClock()
    log = AuditLog('/dev/full', clock=clock)
    with caplog.at_level(logging.WARNING):
        assert log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0) is None
        log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0)
        assert len(warnings_of(caplog)) == 1 and '(1 records lost' in warnings_of(caplog)[0]
        clock.now += 61
        log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0)
    messages = warnings_of(caplog)
    assert len(messages) == 2 and '(2 records lost' in messages[1] and '/dev/full' in messages[1]
    log.close()


def test_a_directory_where_the_file_should_be_is_logged_once_and_a_later_file_is_written(tmp_path, caplog):
    path = str(tmp_path / 'audit.log')
    os.mkdir(path)
    with caplog.at_level(logging.WARNING):
        log = AuditLog(path)
        log.record(CALLER, 'lost', 'ping', {}, {}, 0.0)
        log.record(CALLER, 'lost', 'ping', {}, {}, 0.0)
    assert len(warnings_of(caplog)) == 1 and path in warnings_of(caplog)[0]
    os.rmdir(path)
    log.record(CALLER, 'kept', 'ping', {}, {}, 0.0)
    log.close()
    assert [record['guest'] for record in read_records(path)] == ['kept']


def test_a_path_in_a_read_only_place_is_logged_and_the_call_goes_on(caplog):
    with caplog.at_level(logging.WARNING):
        log = AuditLog('/proc/negotiator-audit-test/audit.log')
        log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0)
        log.close()
    assert len(warnings_of(caplog)) >= 1
    assert all('/proc/negotiator-audit-test/audit.log' in message for message in warnings_of(caplog))
    assert not os.path.exists('/proc/negotiator-audit-test')


def test_a_write_cut_short_is_ended_before_the_next_record(tmp_path, monkeypatch):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    real_write = os.write

    def write_half_then_fail(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, 'write', fail)
        return real_write(fd, data[:len(data) // 2])

    def fail(fd: int, data: bytes) -> int:
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'write', write_half_then_fail)
    log.record(CALLER, 'torn', 'ping', {}, {}, 0.0)
    monkeypatch.setattr(os, 'write', real_write)
    log.record(CALLER, 'whole', 'ping', {}, {}, 0.0)
    log.close()
    with open(path, 'rb') as handle:
        torn, whole, end = handle.read().split(b'\n')
    assert torn.startswith(b'{"time": ') and not torn.endswith(b'}') and end == b''
    assert json.loads(whole.decode())['guest'] == 'whole'


def test_a_record_after_close_is_lost_and_logged(tmp_path, caplog):
    path = str(tmp_path / 'audit.log')
    log = AuditLog(path)
    log.close()
    with caplog.at_level(logging.WARNING):
        log.record(CALLER, 'late', 'ping', {}, {}, 0.0)
    assert len(warnings_of(caplog)) == 1 and 'closed' in warnings_of(caplog)[0]
    assert os.path.getsize(path) == 0


def test_no_path_means_no_audit_log(caplog):
    log = AuditLog(None)
    with caplog.at_level(logging.DEBUG):
        log.record(CALLER, 'web-1', 'ping', {}, {}, 0.0)
        log.close()
    assert warnings_of(caplog) == []


@pytest.mark.parametrize('outcome', [None, 'text', 42, ['list']])
def test_an_outcome_that_is_neither_a_result_nor_an_error_records_the_call_alone(outcome):
    record = assert_one_safe_line(audit_line(CALLER, 'g', 'ping', {}, outcome, 0.0))
    assert set(record) == {'time', 'uid', 'user', 'pid', 'guest', 'method', 'seconds'}
