"""
A warm Python: one interpreter that imports the standard library once, then forks a process
for each program it is given, which runs it as ``python3`` runs a program read from its
standard input.

Why: in an emulated guest that reads its files over 9p, a new interpreter takes seconds to
import what an Ansible module imports (measured here: ``AnsiballZ_ping.py`` took 7.4 s cold,
2.0 s forked from an interpreter that had imported the standard library, 1.4 s with the code
compiled from its zip file kept: :func:`_remember_compiled_sources`). See
:mod:`negotiator_common.warm` for the agent's side and ``docs/protocol.rst`` ("Warm Python").

This module is not imported by the agent: its text is the program of a new interpreter, the
very interpreter the caller named (so that the forked processes have its ``sys.path`` and its
standard library), sent as the first message on its socket to a two-line ``-c`` program that
runs it (``ps`` shows ``PYTHON -c ... negotiator-warm-python``). It imports only the standard library and runs on
CPython 3.6 and later. It talks to the agent on its standard input, a ``SOCK_SEQPACKET`` UNIX
socket, one JSON message per packet:

- it sends ``{"ready": [major, minor], "cache": PATH}`` once its imports are done (``cache``:
  its directory of compiled sources, or null; the agent removes it if the zygote dies);
- the agent sends ``{"id": N, "cwd": PATH, "env": {...}, "mark": NAME}`` with three descriptors (the
  program's standard input, output and error) as ``SCM_RIGHTS``; it forks, and answers
  ``{"id": N, "pid": PID}`` (or ``{"id": N, "error": TEXT}``);
- the agent may instead send ``{"id": N, "preload": {"archive": PATH, "modules": [NAME, ...]}}``
  with one descriptor, a new socket of the same kind: it forks a *zygote of libraries*
  (:func:`_become_a_zygote_of_libraries`), which imports those modules from the archive and
  then serves that socket as this program serves its own; the answer is the same;
- when a process it forked ends, it sends ``{"exited": PID, "status": WAITSTATUS}``;
- at the end of its socket (the agent is gone) it exits; the processes it forked run on.

A forked process starts a session of its own (its pid is its process group's, as a command's
is), makes the three descriptors its standard streams, closes every other descriptor, takes the
working directory and the environment it was sent (and writes the value of the variable that
``mark`` names over the one it inherited, see :func:`_rewrite_initial_variable`), and reads its
program from its standard input to the end, as a cold ``python3`` does. It then runs it as
``__main__`` and ends as the interpreter would: ``SystemExit``'s code, 1 and a traceback for any
other exception, death by SIGINT for an uncaught ``KeyboardInterrupt`` (1 before Python 3.8),
non-daemon threads waited for, ``atexit`` functions run, the streams flushed (120 when that
fails).
"""

import array
import json
import os
import select
import signal
import socket
import sys

PRELOADED = (
    'argparse array ast atexit base64 binascii bisect bz2 codecs collections collections.abc '
    'concurrent.futures configparser contextlib copy ctypes dataclasses datetime decimal dis enum errno '
    'fcntl fnmatch functools getpass gettext glob grp hashlib heapq importlib importlib.machinery '
    'importlib.util inspect io ipaddress itertools json keyword linecache locale logging lzma math '
    'multiprocessing multiprocessing.pool numbers opcode operator pathlib pickle pkgutil platform pwd '
    'queue random re runpy select selectors shlex shutil signal socket ssl stat string stringprep struct '
    'subprocess syslog tempfile termios textwrap threading time token tokenize traceback types typing '
    'unicodedata urllib.parse warnings weakref zipfile zipimport zlib'
).split()
"""
The standard library's modules imported before the first fork: those that Ansible's modules
``ping``, ``command``, ``stat`` and ``setup`` import (``python3 -X importtime``, ansible-core
2.19). Only the standard library: a package from ``site-packages`` could be one that the
program means to import from elsewhere (an Ansible payload puts its own first on ``sys.path``).
A module that this Python lacks is left out.
"""

_MAX_MESSAGE = 1024 * 1024

MAX_COMPILED = 4096
"""How many modules' code the cache of compiled sources holds at most (see :func:`_remember_compiled_sources`)."""

_compiled_cache = None
"""The zygote's directory of compiled sources (None: no cache)."""

_FRESH_MAIN = {name: value for name, value in vars(sys.modules['__main__']).items()
               if name in ('__loader__', '__annotations__')}
"""What this interpreter puts in a new ``__main__`` of its own (read before this program adds to it)."""


def _preload():
    for name in PRELOADED:
        try:
            __import__(name)
        except Exception:  # absent from this Python, or broken: the program will say if it needs it
            pass


def _send(channel, message):
    channel.send(json.dumps(message).encode('utf-8'))


def _receive(channel):
    """One request and its descriptors; None at the end of the socket."""
    fds = array.array('i')
    data, ancillary, flags, _ = channel.recvmsg(_MAX_MESSAGE, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data.decode('utf-8')), list(fds)


def _become_the_program(request, fds):
    """In the forked process: take the request's place, streams and environment; never returns."""
    status = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf('SC_OPEN_MAX') if hasattr(os, 'sysconf') else 65536)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request['cwd'])
        if request.get('mark'):
            _rewrite_initial_variable(request['mark'], request['env'].get(request['mark'], ''))
        os.environ.clear()
        os.environ.update(request['env'])
        _fresh_state()
        if _compiled_cache is not None:
            _remember_compiled_sources(_compiled_cache)
        status = _run_main()
    except BaseException:  # before the program ran: say why where its caller reads
        try:
            import traceback
            os.write(2, traceback.format_exc().encode('utf-8', 'replace'))
        except BaseException:
            pass
    os._exit(status)


def _rewrite_initial_variable(name, value):
    """
    Give ``name`` the new ``value`` (of the same length) in the environment this process started
    with, in place: that block of memory is what ``/proc/PID/environ`` shows, and what the agent
    reads to find the processes of a run (``negotiator_common.processes``) once they have left
    its process group. A forked process inherits it, so a child that forks without ``exec`` and
    leaves the group still carries the run's marker, as it would under a cold interpreter.
    """
    import ctypes
    wanted = ('%s=' % name).encode('ascii')
    encoded = value.encode('ascii')
    libc = ctypes.CDLL(None)
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, 'environ')
    index = 0
    while environ[index]:
        address = environ[index]
        entry = ctypes.string_at(address)
        if entry.startswith(wanted) and len(entry) == len(wanted) + len(encoded):
            ctypes.memmove(address + len(wanted), encoded, len(encoded))
            return
        index += 1


def _fresh_state():
    """What a new interpreter would have and the zygote's memory does not: streams, argv, seeds, caches."""
    import io
    import importlib
    encoding = 'utf-8'
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, 'r', closefd=False)), encoding=encoding)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, 'w', closefd=False)), encoding=encoding,
                                  line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, 'w', closefd=False)), encoding=encoding,
                                  errors='backslashreplace', line_buffering=True)
    for name in ('stdin', 'stdout', 'stderr'):  # the originals, as the interpreter keeps them
        setattr(sys, '__%s__' % name, getattr(sys, name))
    sys.argv = ['']
    if hasattr(sys, 'orig_argv'):
        sys.orig_argv = [sys.executable]
    random = sys.modules.get('random')
    if random is not None:
        random.seed()  # Python 3.6 does not reseed after a fork (3.7 and later do)
    tempfile = sys.modules.get('tempfile')
    if tempfile is not None:
        tempfile.tempdir = None  # found again from this environment's TMPDIR
    for entry in ('', '.'):  # the working directory changed: forget what was found in the old one
        sys.path_importer_cache.pop(entry, None)
    importlib.invalidate_caches()


def _remember_compiled_sources(directory):
    """
    Keep the code that ``zipimport`` compiles in ``directory``, and take it from there the next
    time the same source comes under the same name inside its archive.

    An Ansible module brings its libraries as sources in a zip file, which ``zipimport``
    compiles at every run (no ``.pyc`` in the archive, none written): two thirds of a warm
    ``ping`` (90 ms of 133 natively). Each run unpacks the archive in a new temporary
    directory, so the cache is keyed by the SHA-256 of the name inside the archive and the
    source, and the code's file names are set to this run's path. The directory is the
    zygote's own (mode 0700, removed when it ends), written only by the processes it forks,
    which run as the agent's user anyway. Where ``zipimport`` is not the pure-Python module of
    3.8 and later (``_compile_source``), nothing is cached.
    """
    import hashlib
    import marshal
    import types
    zipimport = sys.modules.get('zipimport')
    compile_source = getattr(zipimport, '_compile_source', None)
    if compile_source is None or not hasattr(types.CodeType, 'replace') or hasattr(compile_source, 'remembered'):
        return  # nothing to wrap, or wrapped already (in a zygote of libraries)

    def renamed(code, filename):
        consts = tuple(renamed(const, filename) if isinstance(const, types.CodeType) else const
                       for const in code.co_consts)
        return code.replace(co_filename=filename, co_consts=consts)

    def compile_remembered(pathname, source):
        inside = pathname.rpartition('.zip' + os.sep)[2]
        key = hashlib.sha256(inside.encode('utf-8', 'surrogateescape') + b'\0' + source).hexdigest()
        path = os.path.join(directory, key)
        try:
            with open(path, 'rb') as handle:
                return renamed(marshal.load(handle), pathname)
        except (OSError, EOFError, ValueError, TypeError):
            pass
        code = compile_source(pathname, source)
        try:
            if len(os.listdir(directory)) < MAX_COMPILED:
                written = '%s.%d' % (path, os.getpid())
                with open(written, 'wb') as handle:
                    marshal.dump(code, handle)
                os.rename(written, path)
        except OSError:
            pass
        return code

    compile_remembered.remembered = True
    zipimport._compile_source = compile_remembered


def _run_main():
    """Read the program from standard input and run it as ``__main__``; the exit status."""
    import types
    source = sys.stdin.buffer.read()
    main = types.ModuleType('__main__')
    main.__dict__.update(_FRESH_MAIN, __file__='<stdin>', __cached__=None, __builtins__=__builtins__)
    sys.modules['__main__'] = main
    try:
        exec(compile(source, '<stdin>', 'exec', dont_inherit=True), main.__dict__)
    except SystemExit as exc:
        return _finish(_exit_status(exc.code))
    except KeyboardInterrupt:
        _print_exception()
        status = _finish(1)
        if sys.version_info >= (3, 8):  # as the interpreter ends since 3.8: killed by SIGINT (before: 1)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return status
    except BaseException:
        _print_exception()
        return _finish(1)
    return _finish(0)


def _print_exception():
    """The traceback of the exception being handled, from the program's frames on (not this module's)."""
    kind, value, trace = sys.exc_info()
    trace = trace.tb_next if trace is not None else None
    if value is not None:
        value.__traceback__ = trace  # what the interpreter's own hook prints, whatever it is given
    sys.excepthook(kind, value, trace)


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xff
    try:
        sys.stderr.write('%s\n' % (code,))
    except Exception:
        pass
    return 1


def _finish(status):
    """What an interpreter does at its end: wait for threads, run ``atexit``, flush; the status."""
    threading = sys.modules.get('threading')
    if threading is not None and hasattr(threading, '_shutdown'):
        try:
            threading._shutdown()
        except BaseException:
            pass
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            if stream is sys.stdout:
                status = 120
    return status


def _report_exits(channel):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(channel, {'exited': pid, 'status': status})


def _become_a_zygote_of_libraries(preload, fds, parent_channel):
    """
    In the forked process: import ``preload``'s modules from its archive, then serve the socket
    received (``fds[0]``) as a zygote; never returns.

    Its standard streams become ``/dev/null`` and it keeps no descriptor of its parent's: the
    agent reads the end of its parent's socket and standard error when its parent ends, and this
    process must not hold them open. It forms a process group of its own, so that the agent can
    kill it with what it is running. It says why it cannot serve in its ready message.
    """
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=os.dup(fds[0]))
        null = os.open(os.devnull, os.O_RDWR)
        for target in range(3):
            os.dup2(null, target)
        parent_channel.close()
        keep = channel.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf('SC_OPEN_MAX') if hasattr(os, 'sysconf') else 65536)
        if _import_preloaded(preload['archive'], preload['modules']):
            serve(channel)
        else:
            _send(channel, {'ready': None, 'error': 'importing the libraries started a thread'})
    finally:
        os._exit(0)


def _import_preloaded(archive, modules):
    """
    Import ``modules`` from ``archive`` (on ``sys.path`` meanwhile); False if that started a thread.

    A module that fails to import is left out, as the standard library's are (:func:`_preload`):
    a program that needs it imports it itself, and fails as it would in a new interpreter.
    """
    if _compiled_cache is not None:
        _remember_compiled_sources(_compiled_cache)
    sys.path.insert(0, archive)
    try:
        for name in modules:
            try:
                __import__(name)
            except Exception:
                pass
    finally:
        if archive in sys.path:
            sys.path.remove(archive)
    threading = sys.modules.get('threading')
    return threading is None or threading.active_count() == 1


def serve(channel):
    """Serve the agent on ``channel`` until it closes it."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_write)
    _send(channel, {'ready': list(sys.version_info[:2]), 'cache': _compiled_cache})
    while True:
        readable, _, _ = select.select([channel, wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
            _report_exits(channel)
        if channel in readable:
            received = _receive(channel)
            if received is None:
                return
            request, fds = received
            try:
                pid = os.fork()
            except OSError as exc:
                _send(channel, {'id': request.get('id'), 'error': str(exc)})
            else:
                if pid == 0:
                    if 'preload' in request:
                        _become_a_zygote_of_libraries(request['preload'], fds, channel)
                    channel.close()
                    _become_the_program(request, fds)
                _send(channel, {'id': request.get('id'), 'pid': pid})
            for fd in fds:
                os.close(fd)


def main():
    global _compiled_cache
    if sys.version_info < (3, 6):
        sys.exit('a warm Python needs Python 3.6 or later')
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the agent's terminal
    channel = socket.fromfd(0, socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _preload()
    import shutil
    import tempfile
    try:
        _compiled_cache = tempfile.mkdtemp(prefix='negotiator-warm-python-', dir='/tmp')
    except OSError:
        pass  # no cache
    try:
        serve(channel)
    finally:
        if _compiled_cache is not None:
            shutil.rmtree(_compiled_cache, ignore_errors=True)


if __name__ == '__main__':
    main()
