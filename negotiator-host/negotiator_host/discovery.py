"""
Discovery: which guests run, and where their channel sockets are.

libvirt gives every ``<channel type='unix'><source mode='bind'/>...`` a UNIX socket on the
host and fills in its path itself. This module finds those sockets cheaply, because every
CLI call starts here:

1. The live status XML that libvirt keeps for each running guest
   (``/var/run/libvirt/qemu/NAME.xml`` for ``qemu:///system``) names every socket exactly
   (``devices/channel/source/@path``) and the guest's id and state. Reading it costs no
   process at all, so a single-guest call usually runs no ``virsh``.
2. The channel directory (``/var/lib/libvirt/qemu/channel/target``): current libvirt uses
   ``domain-ID-SHORTNAME/CHANNEL``, where SHORTNAME is the name cut to 20 characters (or 20
   bytes, depending on libvirtd's locale), so a directory is matched by the guest's id and a
   prefix of its name, never by the prefix alone; older libvirt used ``NAME.CHANNEL``.
3. Only for a single guest whose files say nothing: ``virsh dumpxml NAME`` (one process).

Listing every running guest costs exactly one process (``virsh list``), however many guests
run: the rest comes from the files of steps 1 and 2. The roots of those files are parameters
(:class:`LibvirtPaths`), so tests run against a fake tree and a stand-in ``virsh``.
"""

import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from negotiator_common.channels import HOST_TO_GUEST_CHANNELS, channel_xml
from negotiator_common.errors import ChannelNotFound, GuestNotFound, NegotiatorError

__all__ = (
    'DEFAULT_URI', 'SHORT_NAME_MAX', 'LibvirtUnavailable', 'LibvirtPaths', 'Guest', 'default_uri', 'run_virsh',
    'list_guests', 'find_guest', 'parse_domain_xml', 'parse_virsh_list', 'missing_channel_message',
)

DEFAULT_URI = 'qemu:///system'

SHORT_NAME_MAX = 20
"""libvirt cuts guest names to this many characters in per-domain directory names."""

VIRSH_TIMEOUT = 15.0
"""Seconds a ``virsh`` call may take before discovery gives up on it."""


class LibvirtUnavailable(NegotiatorError):
    """``virsh`` could not talk to libvirt (libvirtd down, wrong URI, no permission)."""


def default_uri() -> str:
    """The libvirt URI to use: ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``."""
    return os.environ.get('LIBVIRT_DEFAULT_URI') or DEFAULT_URI


class LibvirtPaths(object):
    """
    Where libvirt keeps the files that discovery reads.

    :param status_dir: live status XML of running guests (``NAME.xml``); None: do not read it.
    :param channel_dir: the root of the channel sockets; None: do not look there.
    """

    def __init__(self, status_dir: Optional[str], channel_dir: Optional[str]) -> None:
        self.status_dir = status_dir
        self.channel_dir = channel_dir

    @classmethod
    def for_uri(cls, uri: str) -> 'LibvirtPaths':
        """
        libvirt's own directories for a local ``qemu:///system`` or ``qemu:///session`` URI.

        ``$NEGOTIATOR_LIBVIRT_STATUS_DIR`` and ``$NEGOTIATOR_LIBVIRT_CHANNEL_DIR`` override
        them (a libvirt built with another prefix; tests).
        """
        paths = cls._for_uri(uri)
        paths.status_dir = os.environ.get('NEGOTIATOR_LIBVIRT_STATUS_DIR') or paths.status_dir
        paths.channel_dir = os.environ.get('NEGOTIATOR_LIBVIRT_CHANNEL_DIR') or paths.channel_dir
        return paths

    @classmethod
    def _for_uri(cls, uri: str) -> 'LibvirtPaths':
        if re.match(r'^qemu(\+unix)?:///system/?(\?.*)?$', uri):
            return cls('/var/run/libvirt/qemu', '/var/lib/libvirt/qemu/channel/target')
        if re.match(r'^qemu(\+unix)?:///session/?(\?.*)?$', uri):
            runtime = os.environ.get('XDG_RUNTIME_DIR') or os.path.expanduser('~/.cache')
            config = os.environ.get('XDG_CONFIG_HOME') or os.path.expanduser('~/.config')
            return cls(os.path.join(runtime, 'libvirt', 'qemu', 'run'),
                       os.path.join(config, 'libvirt', 'qemu', 'channel', 'target'))
        # A remote or unusual URI: its sockets are not ours to find in files.
        return cls(None, None)

    def __repr__(self) -> str:
        return 'LibvirtPaths(%r, %r)' % (self.status_dir, self.channel_dir)


class Guest(object):
    """
    One guest as discovery saw it: ``name``, ``id`` (None when not known or not running),
    ``state`` (``running``, ``paused``, ... or ``''`` when not known) and ``channels``, a
    dictionary of channel name to socket path.
    """

    __slots__ = ('name', 'id', 'state', 'channels')

    def __init__(self, name: str, id: Optional[int] = None, state: str = '',
                 channels: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.id = id
        self.state = state
        self.channels = dict(channels or {})

    def socket_for(self, channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS) -> Optional[str]:
        """The socket of the first of ``channel_names`` that the guest has, or None."""
        for channel in channel_names:
            if channel in self.channels:
                return self.channels[channel]
        return None

    def require_socket(self, channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS) -> str:
        """Like :meth:`socket_for`, but raise :class:`ChannelNotFound` with what to do."""
        path = self.socket_for(channel_names)
        if path is None:
            raise ChannelNotFound(missing_channel_message(self.name, channel_names[0]))
        return path

    def to_dict(self) -> Dict[str, object]:
        return {'name': self.name, 'id': self.id, 'state': self.state, 'channels': dict(self.channels)}

    def __repr__(self) -> str:
        return 'Guest(%r, id=%r, state=%r, channels=%r)' % (self.name, self.id, self.state, sorted(self.channels))


def missing_channel_message(name: str, channel: str) -> str:
    """The one-line explanation of a missing channel, with the XML to add."""
    return ("guest %s has no %s channel: add %s to its <devices> (virsh edit %s), then shut the guest"
            " down and start it (a reboot does not add channels)" % (name, channel, channel_xml(channel), name))


# Running virsh.

def run_virsh(uri: str, *args: str, timeout: float = VIRSH_TIMEOUT) -> Tuple[int, bytes, str]:
    """
    Run ``virsh -c URI ARGS...`` (an argv list through executor, never a shell).

    Returns ``(exit status, stdout bytes, stderr text)``; raises :class:`LibvirtUnavailable`
    when ``virsh`` is not installed or does not finish within ``timeout`` seconds.
    """
    import shutil
    import subprocess
    from negotiator_common.external import ExternalProgram  # imported lazily: the fast paths need no process

    virsh = shutil.which('virsh')
    if virsh is None:
        raise LibvirtUnavailable('virsh is not installed (or not on $PATH): install the libvirt client tools'
                                 ' (apt-get install libvirt-clients)')
    program = ExternalProgram([virsh, '-q', '-c', uri] + list(args))
    try:
        process = program.start()
    except OSError as exc:
        program.close()
        raise LibvirtUnavailable('cannot run virsh: %s' % exc) from exc
    try:
        # communicate() has a real timeout (executor's own wait() polls, and may draw a spinner).
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        process.communicate()
        raise LibvirtUnavailable('virsh -c %s %s did not finish within %s seconds: is libvirtd stuck?'
                                 % (uri, ' '.join(args), timeout)) from exc
    finally:
        program.close()
    return process.returncode, stdout or b'', (stderr or b'').decode('utf-8', 'replace').strip()


def _virsh_error(uri: str, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].replace('error: ', '').strip() if lines else 'virsh failed with no message'


def _unavailable(uri: str, stderr: str) -> LibvirtUnavailable:
    return LibvirtUnavailable('cannot reach libvirt at %s (%s): is libvirtd (or virtqemud) running, and may you use'
                              ' it? (systemctl start libvirtd; run as root for qemu:///system)'
                              % (uri, _virsh_error(uri, stderr)))


_STATES = ('running', 'idle', 'paused', 'in shutdown', 'shut off', 'crashed', 'pmsuspended', 'no state', 'blocked')


def _unescape_table(text: str) -> str:
    # virsh's table escapes unprintable bytes (and literal "\x") as \xNN: undo it.
    if '\\x' not in text:
        return text
    raw = re.sub(rb'\\x([0-9a-fA-F]{2})', lambda m: bytes([int(m.group(1), 16)]),
                 text.encode('utf-8', 'surrogateescape'))
    return raw.decode('utf-8', 'surrogateescape')


def parse_virsh_list(output: bytes) -> List[Guest]:
    """
    Parse the table of ``virsh list`` (``Id  Name  State`` rows; the header may be absent).

    Names may hold spaces, hyphens, dots and non-ASCII letters: a row is the id, then the
    name, then one of libvirt's state names at the end of the line.
    """
    guests = []
    for line in output.decode('utf-8', 'surrogateescape').splitlines():
        line = line.strip()
        match = re.match(r'^(\d+|-)\s+(.+?)\s+(%s)$' % '|'.join(_STATES), line)
        if not match:
            continue  # the header, the dashes, blank lines
        id_text, name, state = match.groups()
        guests.append(Guest(_unescape_table(name), None if id_text == '-' else int(id_text), state))
    return guests


# Reading libvirt's files.

class _DomainReader(object):
    """
    The expat handlers of :func:`parse_domain_xml`: they note the domain's id, state, name and
    channels as the elements go by, looking only at the ``<domain>`` at the top (or inside a
    ``<domstatus>``), so that a name or channel elsewhere in the XML is never taken for the guest's.
    """

    def __init__(self) -> None:
        self.state = ''
        self.id_text: Optional[str] = None
        self.domain: Optional[str] = None  # the path of <domain>: 'domain' or 'domstatus/domain'
        self.name: Optional[str] = None
        self.channels: Dict[str, str] = {}
        self._stack: List[str] = []
        self._channel: Dict[str, str] = {}
        self._name_parts: List[str] = []

    def _devices(self) -> str:
        return '\0' if self.domain is None else self.domain + '/devices'

    def start(self, tag: str, attributes: Dict[str, str]) -> None:
        where = '/'.join(self._stack)
        self._stack.append(tag)
        if tag == 'domstatus' and where == '':
            self.state = attributes.get('state', '')
        elif tag == 'domain' and where in ('', 'domstatus'):
            self.id_text = attributes.get('id')
            self.domain = '/'.join(self._stack)
        elif where == self._devices() and tag == 'channel':
            self._channel.clear()
        elif where == self._devices() + '/channel':
            if tag == 'source' and attributes.get('path'):
                self._channel['path'] = attributes['path']
            elif tag == 'target' and attributes.get('name'):
                self._channel['name'] = attributes['name']

    def end(self, tag: str) -> None:
        self._stack.pop()
        where = '/'.join(self._stack)
        if tag == 'channel' and where == self._devices():
            if 'path' in self._channel and 'name' in self._channel:
                self.channels[self._channel['name']] = self._channel['path']
        elif tag == 'name' and where == self.domain:
            self.name = ''.join(self._name_parts)

    def data(self, text: str) -> None:
        if self._stack and self._stack[-1] == 'name' and '/'.join(self._stack[:-1]) == self.domain:
            self._name_parts.append(text)

    def guest(self, fallback_name: Optional[str]) -> Guest:
        """The guest that the XML described (with an id only when it runs)."""
        id_text = self.id_text
        guest_id = int(id_text) if id_text and id_text.isdigit() and int(id_text) > 0 else None
        state = self.state or ('running' if guest_id is not None else 'shut off')
        return Guest(self.name or fallback_name or '', guest_id, state, self.channels)


def parse_domain_xml(text: bytes, fallback_name: Optional[str] = None) -> Guest:
    """
    Read a guest from a domain XML (``virsh dumpxml``) or a status XML (``<domstatus>``).

    Every ``<channel>`` with a ``source/@path`` and a ``target/@name`` becomes an entry of
    :attr:`Guest.channels`. Raises :class:`ValueError` for XML that does not parse. (A few
    lines over expat rather than ElementTree: this runs at every CLI call, and importing
    ElementTree costs more than the parse.)
    """
    from xml.parsers import expat

    reader = _DomainReader()
    parser = expat.ParserCreate()
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.data
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise ValueError('not valid XML: %s' % exc) from exc
    if reader.domain is None:
        raise ValueError('no <domain> element')
    return reader.guest(fallback_name)


def _read_status(paths: LibvirtPaths, name: str) -> Optional[Guest]:
    if not paths.status_dir or '/' in name:
        return None
    try:
        with open(os.path.join(paths.status_dir, name + '.xml'), 'rb') as handle:
            data = handle.read()
    except OSError:
        return None
    try:
        guest = parse_domain_xml(data, name)
    except ValueError:
        return None
    return guest if guest.name == name else None


def _short_name_prefixes(name: str) -> List[str]:
    # libvirt cuts to 20 characters when libvirtd's locale decodes the name, else to 20 bytes.
    prefixes = [name[:SHORT_NAME_MAX]]
    raw = name.encode('utf-8')[:SHORT_NAME_MAX]
    prefixes.append(raw.decode('utf-8', 'surrogateescape'))
    return prefixes


def _listdir(directory: Optional[str]) -> List[str]:
    if not directory:
        return []
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _domain_directories(entries: Iterable[str]) -> Dict[int, List[str]]:
    """``domain-ID-SHORTNAME`` entries by id."""
    found: Dict[int, List[str]] = {}
    for entry in entries:
        match = re.match(r'^domain-(\d+)-(.*)$', entry, re.DOTALL)
        if match:
            found.setdefault(int(match.group(1)), []).append(entry)
    return found


def _channels_in(directory: str) -> Dict[str, str]:
    return {entry: os.path.join(directory, entry) for entry in _listdir(directory)}


def _channels_from_tree(paths: LibvirtPaths, guest: Guest, entries: List[str],
                        by_id: Dict[int, List[str]]) -> Dict[str, str]:
    """Channel sockets of ``guest`` in the channel directory, for both layouts."""
    root = paths.channel_dir
    if not root:
        return {}
    channels = {}
    prefixes = _short_name_prefixes(guest.name)
    candidates = []
    if guest.id is not None:
        # Ids are unique among running guests; the name part must still fit this guest.
        candidates = [e for e in by_id.get(guest.id, []) if e.split('-', 2)[2] in prefixes]
    else:
        # No id: only a directory that carries the whole name, and only one, is safe. A cut
        # name could belong to another guest that shares its first 20 characters.
        matching = [e for ids in by_id.values() for e in ids if e.split('-', 2)[2] == guest.name]
        if len(matching) == 1:
            candidates = matching
    for entry in candidates:
        channels.update(_channels_in(os.path.join(root, entry)))
    # The older flat layout: NAME.CHANNEL, the full name.
    prefix = guest.name + '.'
    for entry in entries:
        if entry.startswith(prefix) and not entry.startswith('domain-'):
            channels.setdefault(entry[len(prefix):], os.path.join(root, entry))
    return channels


# The two public questions.

def list_guests(uri: Optional[str] = None, paths: Optional[LibvirtPaths] = None) -> List[Guest]:
    """
    Every running guest, with the channel sockets that the files of ``paths`` show.

    Costs one ``virsh list`` process however many guests run. Raises
    :class:`LibvirtUnavailable` when libvirt cannot be reached.
    """
    uri = uri or default_uri()
    paths = paths or LibvirtPaths.for_uri(uri)
    status, output, stderr = run_virsh(uri, 'list')
    if status != 0:
        raise _unavailable(uri, stderr)
    guests = parse_virsh_list(output)
    entries = _listdir(paths.channel_dir)
    by_id = _domain_directories(entries)
    for guest in guests:
        live = _read_status(paths, guest.name)
        if live is not None and (guest.id is None or live.id == guest.id):
            guest.channels = live.channels
            guest.state = guest.state or live.state
        else:
            guest.channels = _channels_from_tree(paths, guest, entries, by_id)
    return sorted(guests, key=lambda g: g.name)


def find_guest(name: str, uri: Optional[str] = None, paths: Optional[LibvirtPaths] = None,
               use_virsh: bool = True, timeout: Optional[float] = VIRSH_TIMEOUT) -> Guest:
    """
    One running guest by name, with its channel sockets.

    Reads libvirt's files first (no process); only when they do not show a channel does it
    run one ``virsh dumpxml NAME`` (bounded by ``timeout`` seconds). Raises
    :class:`GuestNotFound` (no such guest, or not running) and :class:`LibvirtUnavailable`.
    """
    uri = uri or default_uri()
    paths = paths or LibvirtPaths.for_uri(uri)
    live = _read_status(paths, name)
    if live is not None and live.channels:
        return live
    if live is None:
        entries = _listdir(paths.channel_dir)
        channels = _channels_from_tree(paths, Guest(name), entries, _domain_directories(entries))
        if channels:
            return Guest(name, None, 'running', channels)
    if not use_virsh:
        if live is not None:
            return live
        raise GuestNotFound('no running guest %s was found in libvirt\'s files' % name)
    status, output, stderr = run_virsh(uri, 'dumpxml', '--', name,
                                       timeout=VIRSH_TIMEOUT if timeout is None else max(0.1, timeout))
    if status != 0:
        message = _virsh_error(uri, stderr)
        if 'failed to get domain' in message or 'not found' in message.lower():
            raise GuestNotFound('there is no guest %s at %s (virsh -c %s list --all shows the guests)'
                                % (name, uri, uri))
        raise _unavailable(uri, stderr)
    try:
        guest = parse_domain_xml(output, name)
    except ValueError as exc:
        raise LibvirtUnavailable('virsh dumpxml %s printed XML that does not parse: %s' % (name, exc)) from exc
    if guest.id is None:
        raise GuestNotFound('guest %s is not running: start it (virsh -c %s start %s)' % (name, uri, name))
    return guest
