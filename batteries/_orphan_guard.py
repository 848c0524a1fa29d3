"""Processes that die with their parent: the DataLoader forkserver and its workers (``data.make_loader``).

Python's forkserver, and the DataLoader workers it forks, stay alive forever when the training
process is killed (``kill -9``, SIGTERM): the server keeps serving, and a worker that sees its
parent gone hangs on exit flushing a queue nobody reads. They hold memory and the caller's output
pipes. On Linux, ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL to a process when its parent
dies: importing this module sets it for the forkserver (whose parent is the training process), and
``data.make_loader``'s worker init for each worker (whose parent is the server), so the whole tree goes.
"""

from batteries.data import die_with_parent

die_with_parent()  # imported by the forkserver only (its preload list), never by the training process
