"""The functional core: models, the libvirt mapping, settings and the decision rules.

Nothing in here imports Salt or libvirt, so all of it is tested exhaustively in-process.
"""
