"""Imported by the DataLoader forkserver only (``data.make_loader``'s preload list): the server dies with its parent.

A separate module because importing it has this effect; see docs/processes.md.
"""

from batteries._process import die_with_parent

die_with_parent()  # never imported by the training process, which must not die with its launcher
