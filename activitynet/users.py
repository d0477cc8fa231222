"""The user directory: registered users and the names blocked network-wide.

Kept in memory; a durable directory (a data directory that survives a restart) can replace it by
offering the same verbs. It does no locking of its own: ``State`` guards it with the state lock,
and the copies returned by ``users()`` and ``blocked()`` are what may leave that lock.

A blocked name was registered twice across a partition with different secrets. It is deleted
everywhere and never accepted again, so the two owners cannot come back and split the name.
"""


class Users:
    """{username: secret} and the blocked names, in memory."""

    def __init__(self, users=None, blocked=()):
        self._users = dict(users or {})
        self._blocked = set(blocked)

    def secret_of(self, username):
        """The user's secret, or None when the name is not registered."""
        return self._users.get(username)

    def add(self, username, secret):
        self._users[username] = secret

    def block(self, username):
        """Delete ``username`` (if known) and refuse it from now on."""
        self._blocked.add(username)
        self._users.pop(username, None)

    def is_blocked(self, username):
        return username in self._blocked

    def users(self):
        return dict(self._users)

    def blocked(self):
        return set(self._blocked)

    def __len__(self):
        return len(self._users)

    def __contains__(self, username):
        return username in self._users


class DurableUsers(Users):
    """The same directory, each change also recorded in a ``store.Store`` (``--data-dir``).

    Recording is an O(1) queue append, fine under the state lock. ``add`` returns the store's
    ``Ticket``: REGISTER_SUCCESS waits for it (see ``State.register_user``)."""

    def __init__(self, store, users=None, blocked=()):
        super().__init__(users, blocked)
        self._store = store

    def add(self, username, secret):
        super().add(username, secret)
        return self._store.add_user(username, secret)

    def block(self, username):
        super().block(username)
        self._store.block_name(username)
