"""The network map and the re-attachment rule that keeps the network one tree (issue 9).

Pure data and functions: no sockets, no locks (the state calls them under its one lock), so the
rule can be tested on plain trees, deaths and interleavings. A server is named by its announced
address ``"host:port"`` (the ``-lh`` host and the listening port).

The map
-------
Every server is the only author of its own ``Entry``: the server it dialled and is linked to
(``up``, its parent), the servers that dialled it and are linked (``down``, its children), its
``Lineage`` and a ``version`` = (incarnation, counter). The incarnation is the process's start time
in ms, so a restarted server's entry replaces the old one; the counter grows on every change.
Merging two maps keeps, per server, the entry with the higher version: single writer per entry,
so merging is commutative, associative and idempotent and every server that hears the same
entries ends with the same map. A server sends its neighbours the entries of its own component
(servers reachable over links both ends confirm), riding on SERVER_ANNOUNCE, and re-sends when a
merge changed its map, so a change crosses the tree hop by hop and stops where nothing changes.
An entry outside the component (a dead server, the far side of a cut) is kept for ``EXPIRE_AFTER``
seconds, as an address to try, and then forgotten; since only components are sent, a dead
server's entry is not passed around again by healthy servers.

Lineage and rank
----------------
A server's ``Lineage`` says where it hangs: the path from its fragment's root down to it, and how
senior that root is. Three kinds of root, most senior first:

0. a *settled* root: started with nothing to join (``-rh``/``--join`` absent); dials only when
   left alone (below);
1. an *orphan* root: it lost its parent; its rank is the path it had when it lost it (shorter
   first, then by address), kept while it is a root;
2. a *joining* root: started with servers to join and not attached yet; older processes first.

Every link goes from a root (the dialler) into a fragment whose root is strictly more senior
(``accepts``, checked by the acceptor under its lock). A fragment's root only ever becomes more
senior as fragments join others (a server *alone*, below, may join a junior one, but nothing
hangs below it to be misled), so an acceptor whose knowledge of its root is a little old is, if
anything, stricter than needed; and two roots can never each join the other's fragment. A
server that lost its parent becomes an orphan root at once and tells its subtree (its lineage
rides down on SERVER_ANNOUNCE), so its fragment refuses what it must refuse before anyone dials.

Re-attachment
-------------
A server whose link to its parent broke redials the parent for ``GRACE`` seconds (about the
dead-link detection time); a link that comes back is the end of it. Then it dials, in the order
of ``candidates``: its former ancestors, nearest first; then its configured ``--join``/``-rh``
servers; then every other server it knows outside its own subtree, most senior fragment first.
A refusal or a failed connection moves on to the next; after a full round it starts again with
bounded backoff, forever while it is a root. A root with nothing below it that got through a
whole round without being accepted (every way out is junior to it: say the root died and the
most senior orphan is also cut off from its own child) dials *alone* from then on: it refuses
every server that dials it while its own dial is pending, so the link it makes cannot close a
cycle, and the acceptor waives the rank. A settled root left alone (its children died or were
cut off) seeks too, after ``ALONE_AFTER`` seconds, dialling alone, and so does a joining server
with nothing below it (a plain ``-rh`` join is accepted whatever order servers start in).
Consequences:

- a middle server dies: its children attach to their grandparent (their fragments are junior);
- the root dies: its former children become orphan roots of equal path length, so the one with
  the smallest address is the most senior; it is refused everywhere else and stays root, and the
  others (and orphans below) attach to it;
- several die at once: each orphan walks up its ancestors to the nearest living one; where none
  lives, the same seniority picks the new root;
- a link cut between two live servers: the cut-off side dials its grandparent or any server of the
  other side, whose root is more senior;
- a restarted server is a joining root (new incarnation, the most junior kind): it is accepted as
  a leaf wherever it joins, and its old entry is replaced.

Known gap: when a fragment's only way out starts at a member other than its root (the root
is cut off from every server outside, a member is not), and the other side's root has servers
below it, neither root can link the two until a cut heals. In the simulation that takes two cut
links on top of deaths (about 1 run in 1000 with up to 3 deaths and 2 cuts).

``loops`` is the backstop for views too old to be trusted (a lineage that did not reach part of
a subtree within ``GRACE``): a server that finds itself in its new parent's lineage is in a cycle
and drops that link, becoming an orphan root that tries again.
"""

from dataclasses import dataclass

from .protocol import InvalidMessage, type_name

GRACE = 2.0  # seconds a server redials its lost parent before it re-attaches elsewhere
ALONE_AFTER = 2 * GRACE  # seconds a settled root stays alone before it seeks the others
EXPIRE_AFTER = 300.0  # seconds an entry outside our component is kept as an address to try

SETTLED, ORPHAN, JOINING = 0, 1, 2
# Why a link is refused, the machine field "refused" of the INVALID_MESSAGE (``Refusal.code``): a
# dialler moves on to its next candidate on any of them; the text is for people only.
REFUSED_SELF = "self"  # the dialler is this server
REFUSED_NOT_ROOT = "not-root"  # the dialler hangs below another server
REFUSED_CYCLE = "cycle"  # the dialler is above this server
REFUSED_RANK = "rank"  # the dialler's fragment is more senior: it is ours that attaches
REFUSED_BUSY = "busy"  # this server is dialling alone (see ``dials_alone``)
KINDS = (SETTLED, ORPHAN, JOINING)


@dataclass(frozen=True)
class Lineage:
    """Where a server hangs: its root's kind and identity, and the path below the root."""

    kind: int  # SETTLED, ORPHAN or JOINING (of the root)
    stamp: int  # the root's start time in ms (orders JOINING roots; 0 otherwise)
    root_path: tuple  # the root's identity: (root,) or, for an orphan root, its path when orphaned
    below: tuple = ()  # addresses from the root's child down to this server; () for the root

    @classmethod
    def settled(cls, me):
        return cls(SETTLED, 0, (me,))

    @classmethod
    def joining(cls, me, started_ms):
        return cls(JOINING, started_ms, (me,))

    def address(self):
        """The server this lineage belongs to."""
        return self.below[-1] if self.below else self.root_path[-1]

    def is_root(self):
        return not self.below

    def chain(self):
        """The live path: root first, this server last."""
        return (self.root_path[-1],) + self.below

    def root_rank(self):
        """Smaller is more senior (see the module docstring)."""
        return (self.kind, len(self.root_path), self.stamp, self.root_path)

    def child(self, address):
        """The lineage of ``address`` once it hangs below this server."""
        return Lineage(self.kind, self.stamp, self.root_path, self.below + (address,))

    def orphaned(self):
        """This server's lineage once it lost its parent: an orphan root ranked by its path."""
        if self.is_root():
            return self
        return Lineage(ORPHAN, 0, self.root_path + self.below)

    def to_wire(self):
        return [self.kind, self.stamp, list(self.root_path), list(self.below)]

    @classmethod
    def from_wire(cls, value, where="lineage"):
        if not (isinstance(value, list) and len(value) == 4):
            raise InvalidMessage(f"{where} must be an array [kind, stamp, root path, path below], "
                                 f"not {type_name(value)}")
        kind, stamp, root_path, below = value
        if kind not in KINDS or isinstance(kind, bool):
            raise InvalidMessage(f"{where}[0] (kind) must be 0, 1 or 2")
        if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp < 0:
            raise InvalidMessage(f"{where}[1] (stamp) must be a non-negative integer")
        root_path = _addresses(root_path, f"{where}[2] (root path)")
        if not root_path:
            raise InvalidMessage(f"{where}[2] (root path) must name at least the root")
        return cls(kind, stamp, root_path, _addresses(below, f"{where}[3] (path below)"))


class Refusal(str):
    """Why a link is refused: the text for people, ``code`` (a REFUSED_* constant) for machines."""

    def __new__(cls, code, text):
        refusal = super().__new__(cls, text)
        refusal.code = code
        return refusal


def accepts(mine, dialler, alone=False):
    """The acceptor's check on a new link from ``dialler`` (its Lineage); ``mine`` is the
    acceptor's. Returns None to accept, or why not (the link would make a cycle or the dialler's
    fragment outranks ours). ``alone``: the dialler says nothing hangs below it and it refuses
    every link while this dial is pending; such a link cannot close a cycle, so rank is waived.
    A dialler that sends no lineage (another implementation) is not checked: ``mine`` cannot
    judge it."""
    me, them = mine.address(), dialler.address()
    if them == me:
        return Refusal(REFUSED_SELF, f"{them} is this server")
    if not dialler.is_root():
        return Refusal(REFUSED_NOT_ROOT, f"{them} already hangs below {dialler.chain()[-2]}: "
                       "only a fragment's root may attach")
    if them in mine.chain():
        return Refusal(REFUSED_CYCLE, f"{them} is above this server ({' > '.join(mine.chain())}): "
                       "the link would make a cycle")
    if dialler.root_rank() <= mine.root_rank() and not alone:
        return Refusal(REFUSED_RANK, f"{them}'s fragment (root {dialler.chain()[0]}) outranks this one "
                       f"(root {mine.chain()[0]}): this fragment attaches to it, not the other way round")
    return None


def seeks(lineage, has_children, alone_for, alone_after=ALONE_AFTER):
    """Whether a server dials other servers now. Any root that is not settled does (an orphan,
    a joiner). A settled root does once it has been alone (nothing below it) for ``ALONE_AFTER``
    seconds although it knows other servers: its children died or were cut off, and it leaves
    them ``GRACE`` to come back to it first."""
    if not lineage.is_root():
        return False
    if lineage.kind != SETTLED:
        return True
    return not has_children and alone_for >= alone_after


def dials_alone(lineage, has_children, failed_rounds):
    """Whether a root's dials say ``alone`` (see ``accepts``): nothing below it, and either it
    is not an orphan (a settled root outranks every fragment; a joiner with nothing below it is
    a Project 1 ``-rh`` join, always accepted unless it would close a cycle, whatever the order
    the servers were started in) or it is an orphan that went a whole round without being
    accepted (no fragment within reach is more senior). Orphans start by rank, so that the
    orphans of a dead root agree on the new one instead of racing."""
    return not has_children and (lineage.kind != ORPHAN or failed_rounds > 0)


def loops(me, parent_lineage):
    """True if ``me`` is already in the lineage its parent announces: the link closed a cycle."""
    return me in parent_lineage.chain()


@dataclass(frozen=True)
class Entry:
    """One server's own account of its links; only that server writes it."""

    up: object  # address of the server it dialled and is linked to, or None
    down: tuple  # addresses of the servers linked to it that dialled it, sorted
    version: tuple  # (incarnation ms, counter)
    lineage: object = None  # Lineage, or None if not known yet
    monitor: object = None  # "host:port" of its monitor endpoint, if it has one
    resumes: object = None  # (origin, first seq of this run) after a restart with a durable counter

    def to_wire(self):
        wire = {"up": self.up, "down": list(self.down), "v": list(self.version)}
        if self.lineage is not None:
            wire["lineage"] = self.lineage.to_wire()
        if self.monitor is not None:
            wire["monitor"] = self.monitor
        if self.resumes is not None:
            wire["resumes"] = list(self.resumes)
        return wire

    @classmethod
    def from_wire(cls, value, where):
        if not isinstance(value, dict):
            raise InvalidMessage(f"{where} must be an object, not {type_name(value)}")
        up = value.get("up")
        if up is not None and not _is_address(up):
            raise InvalidMessage(f"{where}.up must be null or \"host:port\"")
        down = _addresses(value.get("down", []), f"{where}.down")
        version = value.get("v")
        if not (isinstance(version, list) and len(version) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in version)):
            raise InvalidMessage(f"{where}.v must be [incarnation, counter], two non-negative integers")
        lineage = value.get("lineage")
        if lineage is not None:
            lineage = Lineage.from_wire(lineage, f"{where}.lineage")
        monitor = value.get("monitor")
        if monitor is not None and not _is_address(monitor):
            raise InvalidMessage(f"{where}.monitor must be \"host:port\"")
        resumes = value.get("resumes")
        if resumes is not None and not (isinstance(resumes, list) and len(resumes) == 2
                                        and isinstance(resumes[0], str) and isinstance(resumes[1], int)
                                        and not isinstance(resumes[1], bool) and resumes[1] > 0):
            raise InvalidMessage(f"{where}.resumes must be [origin, first sequence number]")
        return cls(up, tuple(sorted(down)), tuple(version), lineage, monitor,
                   tuple(resumes) if resumes is not None else None)


class NetMap:
    """This server's view of the network; see the module docstring."""

    def __init__(self, me, incarnation, lineage, expire_after=EXPIRE_AFTER):
        self.me = me
        self.expire_after = expire_after
        self.entries = {me: Entry(None, (), (incarnation, 0), lineage)}
        self._outside_since = {}  # address -> when it was first seen outside our component

    @property
    def own(self):
        return self.entries[self.me]

    def set_own(self, up, down, lineage, monitor=None, resumes=None):
        """Record this server's links and lineage; True (and a new version) if they changed."""
        old = self.own
        down = tuple(sorted(down))
        if (up, down, lineage, monitor, resumes) == (old.up, old.down, old.lineage, old.monitor, old.resumes):
            return False
        incarnation, counter = old.version
        self.entries[self.me] = Entry(up, down, (incarnation, counter + 1), lineage, monitor, resumes)
        return True

    def merge(self, wire):
        """Merge a neighbour's map (the wire form); True if ours changed. Our own entry is ours
        alone: what others say about us is ignored."""
        if not isinstance(wire, dict):
            raise InvalidMessage(f"map must be an object of \"host:port\": entry, not {type_name(wire)}")
        changed = False
        for address, value in wire.items():
            if not _is_address(address):
                raise InvalidMessage(f"map key {address[:60]!r} is not \"host:port\"")
            entry = Entry.from_wire(value, f"map[{address!r}]")
            if address == self.me:
                continue
            known = self.entries.get(address)
            if known is None or entry.version > known.version:
                self.entries[address] = entry
                changed = True
        return changed

    def to_wire(self):
        """The entries of our component, for our neighbours."""
        return {address: self.entries[address].to_wire() for address in sorted(self.component())}

    def versions(self):
        """{address: version} of our component: compare to know whether a map is worth sending."""
        return {address: self.entries[address].version for address in self.component()}

    def linked(self, a, b):
        """Whether both ends confirm a link between ``a`` and ``b`` (in either direction)."""
        ea, eb = self.entries.get(a), self.entries.get(b)
        if ea is None or eb is None:
            return False
        return (ea.up == b and a in eb.down) or (eb.up == a and b in ea.down)

    def component(self):
        """Servers reachable from us over confirmed links (ourselves included)."""
        seen, todo = {self.me}, [self.me]
        while todo:
            address = todo.pop()
            entry = self.entries[address]
            for other in ((entry.up,) if entry.up else ()) + entry.down:
                if other not in seen and self.linked(address, other):
                    seen.add(other)
                    todo.append(other)
        return seen

    def subtree(self, root=None):
        """``root`` (default: us) and every server below it, by the parents' own entries: a
        parent is the authority on who hangs below it (a child that left may still claim it, in
        an entry that cannot reach us). A server missing here (a child that attached a moment
        ago) is refused by ``accepts`` if we dial it."""
        root = root or self.me
        seen, todo = {root}, [root]
        while todo:
            entry = self.entries.get(todo.pop())
            for child in entry.down if entry is not None else ():
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    def expire(self, now):
        """Forget entries that stayed outside our component for ``expire_after`` seconds; returns
        the addresses forgotten."""
        inside = self.component()
        for address in inside:
            self._outside_since.pop(address, None)
        gone = []
        for address in list(self.entries):
            if address in inside:
                continue
            since = self._outside_since.setdefault(address, now)
            if now - since >= self.expire_after:
                del self.entries[address]
                del self._outside_since[address]
                gone.append(address)
        return gone


def candidates(netmap, lost_lineage, dead=(), joins=()):
    """Whom a root dials, in order (see the module docstring).

    ``lost_lineage`` is the lineage this server had before it lost its parent (its own lineage if
    it never had one); ``dead`` are servers known dead or unreachable this round; ``joins`` the
    configured ``--join``/``-rh`` servers. Never this server, never its subtree (by the map)."""
    me = netmap.me
    excluded = netmap.subtree() | set(dead)
    ordered = list(reversed(lost_lineage.chain()[:-1]))  # former ancestors, nearest first
    ordered += list(joins)

    def seniority(address):
        lineage = netmap.entries[address].lineage
        if lineage is None:  # not one of ours, or not heard from: least likely to help
            return (1, (), 0, address)
        return (0, lineage.root_rank(), len(lineage.below), address)

    ordered += sorted((a for a in netmap.entries if a != me), key=seniority)
    result, seen = [], set()
    for address in ordered:
        if address not in excluded and address not in seen:
            seen.add(address)
            result.append(address)
    return result


FIRST_WAIT = 0.1  # seconds between redials of a lost parent at first, then doubling
MAX_WAIT = 1.0  # the longest wait between redials of the parent, and between whole rounds
ROUND_MAX_WAIT = 5.0  # the longest wait between two whole rounds of candidates


class Seeker:
    """Whom a server dials next, and when: the re-attachment schedule, on plain data.

    The caller (the server's one dialling thread) asks ``next_dial``; it answers ``(address,
    alone)`` to dial now, or None to wait ``wait_hint`` seconds and ask again (the map may have
    changed meanwhile), and reports each attempt's ``outcome``. During ``GRACE`` after losing its
    parent only the parent is redialled (waits doubling from ``FIRST_WAIT`` to ``MAX_WAIT``); then
    the ``candidates`` are tried back to back, and a whole round without success waits before the
    next one, doubling up to ``ROUND_MAX_WAIT``."""

    def __init__(self, joins=(), grace=GRACE):
        self.joins = tuple(joins)
        self.grace = grace  # the server's --grace: GRACE unless told otherwise
        self.excluded = set()  # never dialled again (they refused our secret)
        self._alone_since = None
        self._restart(lost_lineage=None, lost_at=None, now=0.0)

    def parent_lost(self, lineage_before, now, dialled=None):
        """The link to our parent broke; ``dialled``: the address we dialled it at, if that is
        not the one it announced (a port forward, a relay): the grace redials use it."""
        self._restart(lineage_before, now, now)
        self.lost_parent = dialled or lineage_before.chain()[-2]

    def attached(self):
        self._restart(None, None, 0.0)

    def _restart(self, lost_lineage, lost_at, now):
        self.lost_lineage = lost_lineage  # our lineage before the parent was lost
        self.lost_at = lost_at
        self.lost_parent = None
        self.tried = set()  # candidates tried in this round
        self.failed_rounds = 0
        self.not_before = now
        self._parent_wait = self._round_wait = FIRST_WAIT

    def next_dial(self, now, netmap, lineage, has_children):
        if has_children:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        alone_for = 0.0 if self._alone_since is None else now - self._alone_since
        if not seeks(lineage, has_children, alone_for, 2 * self.grace) or now < self.not_before:
            return None
        parent = self.lost_parent
        if parent is not None and parent not in self.excluded and now - self.lost_at < self.grace:
            return parent, False
        options = [c for c in candidates(netmap, self.lost_lineage or lineage, self.excluded, self.joins)
                   if c not in self.tried]
        if not options:
            self.tried = set()
            self.failed_rounds += 1
            self.not_before = now + self._round_wait
            self._round_wait = min(2 * self._round_wait, ROUND_MAX_WAIT)
            return None
        self.tried.add(options[0])
        return options[0], dials_alone(lineage, has_children, self.failed_rounds)

    def outcome(self, now, accepted):
        """The last dial's result: accepted (we are attached), or refused / unreachable."""
        if accepted:
            self.attached()
        elif self.lost_at is not None and now - self.lost_at < self.grace:
            self.not_before = now + self._parent_wait
            self._parent_wait = min(2 * self._parent_wait, MAX_WAIT)

    def wait_hint(self, now):
        return max(self.not_before - now, 0.0) or FIRST_WAIT


def _is_address(value):
    if not isinstance(value, str) or len(value) > 300:
        return False
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _addresses(value, where):
    if not isinstance(value, list) or not all(_is_address(a) for a in value):
        raise InvalidMessage(f"{where} must be an array of \"host:port\" strings")
    return tuple(value)
