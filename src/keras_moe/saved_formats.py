"""The versions of keras-moe's saved variable layout, and reading older ones.

Every keras-moe layer whose variables moved between versions writes
`"format_version": FORMAT_VERSION` into its config. A config without it was
written by keras-moe 0.2.0 or earlier (format 1), where a layer kept the
variables of its expert bank (and, before 0.2.0, of its router) among its
own and packed its routing statistics into two vectors. Such a layer, when
Keras loads it from a `.keras` file, reads its own store in the old layout
and sets its sublayers' variables from it; this module is how it tells its
sublayers what their own stores hold:

- `restored(sublayer)`: its variables were set by its host, its own store
  is empty in such a file;
- `expect_format(sublayer, version)`: its own store is in that older
  format (a 0.2.0 router's store packs its statistics).

A keras-moe layer's `load_own_variables` asks `pending(self)` first. The
state is kept here, keyed weakly by the layer, and each entry is used once.
"""

import weakref

# The layout this version writes (0.3.0: the expert bank, the router and the
# routing statistics are sublayers with variables of their own).
FORMAT_VERSION = 2

RESTORED = "restored"

_PENDING = weakref.WeakKeyDictionary()


def config_format(config):
    """Pops and returns a config's `format_version` (1 when absent)."""
    return config.pop("format_version", 1)


def restored(layer):
    """Marks `layer`'s variables as set by its host: its own store is empty."""
    _PENDING[layer] = RESTORED
    for sublayer in layer._flatten_layers(include_self=False):
        _PENDING[sublayer] = RESTORED


def expect_format(layer, version):
    """Marks `layer`'s own store as written in format `version`."""
    if version < FORMAT_VERSION:
        _PENDING[layer] = version


def pending(layer):
    """`RESTORED`, an older format version, or None (the current format);
    forgets it."""
    return _PENDING.pop(layer, None)


def assign_in_order(store, variables):
    """Assigns the store's arrays, in order, to `variables`; a clear error
    when the counts differ."""
    if len(store.keys()) != len(variables):
        raise ValueError(
            "This keras-moe layer was saved in an older format (its config "
            "has no `format_version`), whose variables do not match this "
            f"layer's configuration: expected {len(variables)} arrays "
            f"({[v.name for v in variables]}). Received: {len(store.keys())} "
            "arrays"
        )
    for i, variable in enumerate(variables):
        variable.assign(store[str(i)])


class LegacyLoading:
    """Mixin of the keras-moe layers that read older formats: their
    `load_own_variables` honours `pending` and calls
    `load_legacy_variables(store, version)` for an older format."""

    def load_own_variables(self, store):
        state = pending(self)
        if state == RESTORED:
            return
        if state is not None:
            self.load_legacy_variables(store, state)
            return
        self.load_current_variables(store)

    def load_current_variables(self, store):
        """Reads a store in the current format (Keras's order by default)."""
        super().load_own_variables(store)

    def load_legacy_variables(self, store, version):
        raise NotImplementedError
