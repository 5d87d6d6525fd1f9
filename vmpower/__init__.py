"""vmpower: keep the recorded power state of libvirt VMs true to the hypervisor, the Salt way.

The package is the library behind the Salt modules in ``_modules/``, ``_beacons/`` and
``_states/``: ``vmpower.core`` holds the pure rules and models, the other modules are the
shells that talk to libvirt, the record store and Salt.
"""

__version__ = "0.1.0"
