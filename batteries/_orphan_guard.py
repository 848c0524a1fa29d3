"""Processes that die with their parent: the DataLoader forkserver and its workers (``data.make_loader``).

Python's forkserver, and the DataLoader workers it forks, stay alive forever when the training
process is killed (``kill -9``, SIGTERM): the server keeps serving, and a worker that sees its
parent gone hangs on exit flushing a queue nobody reads. They hold memory and the caller's output
pipes. On Linux, ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL to a process when its parent
dies: importing this module sets it for the forkserver (whose parent is the training process), and
``data.make_loader``'s worker init for each worker (whose parent is the server), so the whole tree goes.
"""

import os

from batteries.data import die_with_parent, ignore_stop_signals

die_with_parent()  # imported by the forkserver only (its preload list), never by the training process
# A signal to the training process's group (Ctrl-C in a terminal, torchrun's shutdown) must not reach the
# server or the workers it forks: a worker that dies makes the next batch raise before the training process
# could finish its step and save (StopOnSignal). Their own process group keeps them out of it; ignoring the
# signals covers the instants before that (and systems where it fails). They end with the training process.
ignore_stop_signals()
try:
    os.setpgid(0, 0)
except OSError:
    pass
