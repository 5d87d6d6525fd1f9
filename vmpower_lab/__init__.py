"""vmpower's test lab: a real libvirtd with tiny QEMU guests (``lab``) and a private salt-master
and salt-minion (``saltlab``), for the tests, the demo and the benchmarks.

It is a package of its own, next to ``vmpower`` and not inside it, because it kills libvirtd,
edits /etc/libvirt/qemu.conf and adds users: neither the wheel nor the file_roots sync
(``_utils/vmpower``) may carry it to a production minion. Import it from the repository root
(pytest, ``scripts/demo.py`` and ``bench/`` put the root on ``sys.path``).
"""
